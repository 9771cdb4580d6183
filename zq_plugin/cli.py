"""The ``zq`` command: ``zq demo``, ``zq synthesize``, ``zq quantize``, ``zq finetune``, ``zq plan``.

Run ``zq <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from zq_plugin import datasets, zoo
from zq_plugin._utils import model_device_dtype, select_output
from zq_plugin.backends.fx import convert_int8_fx, export_sim, quantize_fx
from zq_plugin.data import SyntheticDataset, atomic_write, iter_batches
from zq_plugin.demo import DEMO_MODELS, DEMO_STEPS, demo_markdown, real_subset, run_demo
from zq_plugin.errors import ConfigError, DataMismatchError, ZQError
from zq_plugin.evaluation import accuracy
from zq_plugin.mixed_precision.report import chosen_index, plot_frontier, points_to_measure
from zq_plugin.observers.ao import NAMES
from zq_plugin.qparams import check_bits
from zq_plugin.report import describe
from zq_plugin.synth import synthesize
from zq_plugin.synth.store import SynthesisInterrupted

logger = logging.getLogger("zq_plugin.cli")


# --------------------------------------------------------------------------- helpers
def load_model(name: str | None, arch: str | None, checkpoint: str | None) -> nn.Module:
    """A zoo model by name, or ``arch`` ("package.module:Class") with a state_dict ``checkpoint``."""
    if name:
        return zoo.load(name)
    if not arch or not checkpoint:
        raise ConfigError("give --model NAME (a zoo model) or both --arch package.module:Class and --checkpoint FILE.")
    module_name, _, cls_name = arch.partition(":")
    if not cls_name:
        raise ConfigError(f"--arch {arch!r} must look like package.module:ClassName.")
    cwd = os.getcwd()
    if cwd not in sys.path:  # a package in the current folder is found, as with `python -m`
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {arch!r}: {exc}. Check the module path and class name.") from exc
    try:
        model = cls()
    except TypeError as exc:
        raise ConfigError(
            f"--arch {arch!r} cannot be constructed without arguments ({exc}). Point --arch at a class or "
            "function that builds the model with no arguments, e.g. a small subclass or factory in your package."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--arch {arch!r} built a {type(model).__name__}, not a torch.nn.Module.")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint {checkpoint} does not exist.") from exc
    except Exception as exc:  # a truncated zip, a pickled module, a file of another kind
        raise ConfigError(
            f"checkpoint {checkpoint} is not a readable state_dict ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "--checkpoint takes a file written by torch.save(model.state_dict(), path); a whole pickled model is "
            "not loaded (weights_only=True, for safety): save its state_dict instead."
        ) from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {checkpoint} holds a {type(state).__name__}, not a state_dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit {arch}: {str(exc).splitlines()[0]} ({str(exc).count(chr(10))} "
            "more lines). Check that --arch builds the same architecture the weights were saved from."
        ) from exc
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` -> ``(1, 28, 28)``."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--input-shape {text!r} must be comma-separated ints, e.g. 1,28,28.") from exc
    if len(shape) < 2 or min(shape) < 1:
        raise ConfigError(f"--input-shape {text!r} must be one input's shape, channels first, e.g. 1,28,28 or 3,32,32.")
    return shape


def _shape_text(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def checked_input(model: nn.Module, args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    """``--input-shape`` (default: the zoo's 1,28,28) checked against the model, and the model's class count.

    Cheap, so it runs before any long work: a zoo model takes only :data:`zoo.INPUT_SHAPE`; any
    model must run one forward on one all-zero input of that shape.
    """
    shape = parse_shape(args.input_shape) if args.input_shape else zoo.INPUT_SHAPE
    if args.model and shape != zoo.INPUT_SHAPE:
        raise ConfigError(
            f"--input-shape {_shape_text(shape)} does not fit the zoo model {args.model}, which takes "
            f"{_shape_text(zoo.INPUT_SHAPE)} (one Fashion-MNIST image); drop --input-shape."
        )
    try:
        classes = _probe_classes(model, shape)
    except ZQError:
        raise
    except Exception as exc:  # whatever the user's forward raises on the wrong shape
        default = "" if args.input_shape else " (the default, for the zoo's models)"
        raise ConfigError(
            f"the model cannot run on one input of shape {_shape_text(shape)}{default}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Pass --input-shape C,H,W, the shape of one input "
            "of your model, e.g. 3,32,32."
        ) from exc
    return shape, classes


def _probe_classes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """The size of the last dimension of the logits for one all-zero input of ``shape``."""
    device, dtype = model_device_dtype(model)
    with torch.no_grad():
        logits = select_output(model(torch.zeros(1, *shape, device=device, dtype=dtype)))
    return int(logits.shape[-1]) if logits.dim() else 1


def require_fashion_mnist(model: nn.Module, args: argparse.Namespace, flag: str) -> None:
    """Refuse ``flag`` (``--evaluate``, ``--data real``) for a model that is not a Fashion-MNIST classifier.

    Cheap (one forward), so it runs before any long work.
    """
    shape = parse_shape(args.input_shape) if args.input_shape else zoo.INPUT_SHAPE
    if shape != zoo.INPUT_SHAPE:
        what = f"takes {_shape_text(shape)} inputs"
    else:
        try:
            classes = _probe_classes(model, shape)
        except Exception:  # the model does not take Fashion-MNIST images at all
            what = f"does not run on {_shape_text(shape)} inputs"
        else:
            if classes == 10:
                return
            what = f"returns {classes} classes"
    instead = {
        "--data real": "Calibrate with --data FILE (from 'zq synthesize'), --data noise or a synthesis method "
        "(--data zeroq, dsg, ...) instead, or pass your own images to zq_plugin.quantize_fx in Python.",
    }.get(
        flag,
        "Evaluate in Python on your own test set instead: zq_plugin.accuracy(model, x_test, y_test) (README, "
        "Usage step 4); zq quantize --out FILE saves the quantized model for that.",
    )
    raise ConfigError(f"{flag} uses Fashion-MNIST (1x28x28 images, 10 classes), but this model {what}. {instead}")


def check_writable(path: Path | None, flag: str, *, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or a folder with ``folder``) cannot be written.

    Tries a scratch file (removed at once) in the nearest folder that exists: nothing is left
    behind, missing folders included (the writers create them later).
    """
    if path is None:
        return
    where = (path if folder else path.parent).absolute()
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file, not a folder")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".zq-write-check."):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path} cannot be written ({exc.strerror or exc}); choose a writable path.") from exc


def nonnegative_int(text: str) -> int:
    """Argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def parse_input_range(text: str | None) -> tuple[float, float] | str | None:
    """``--input-range``: ``"lo,hi"`` -> ``(lo, hi)``, ``"none"`` -> ``None``, absent -> ``"auto"``."""
    if text is None:
        return "auto"
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--input-range {text!r} must be lo,hi (two numbers, e.g. -0.81,2.02) or none.") from exc
    return (lo, hi)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["steps=200", "statistics=batch"]`` -> ``{"steps": 200, "statistics": "batch"}``.

    Values are parsed as JSON when they can be, else kept as strings.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r} must look like name=value.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def route_options(items: list[str], groups: dict[str, tuple[str, set[str]]]) -> dict[str, dict[str, Any]]:
    """``--option NAME=VALUE`` routed to the configs that take ``NAME``: ``{group: options}``.

    ``groups`` maps a prefix (``"synth"``, ``"reconstruct"``, ``"game"``) to ``(what it is for, its
    field names)``; ``PREFIX.NAME=`` says which group when several take ``NAME``.

    Raises:
        ConfigError: a name no group has, a name several have without a prefix, an unknown prefix.
    """
    routed: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for key, value in parse_options(items).items():
        where, _, name = key.rpartition(".")
        if where and where not in groups:
            raise ConfigError(f"--option {key}: the prefix is one of {', '.join(g + '.' for g in groups)}")
        takers = [g for g, (_, fields) in groups.items() if name in fields and where in ("", g)]
        if len(takers) > 1:
            spelled = " or ".join(f"{g}.{name}=" for g in takers)
            raise ConfigError(f"--option {key}: {' and '.join(takers)} all take {name!r}; write {spelled}.")
        if not takers:
            known = sorted(set().union(*(fields for _, fields in groups.values())))
            raise ConfigError(
                f"--option {key}: not an option of "
                + (", ".join(what for what, _ in groups.values()) or "anything this command runs")
                + (f"; known: {', '.join(known)}." if known else ".")
            )
        routed[takers[0]][name] = value
    return routed


def _fields(config_cls: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(config_cls)}


def split_options(items: list[str], data: str, reconstruction: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--option NAME=VALUE`` of ``zq quantize`` / ``zq plan``: ``(synthesis options, reconstruction options)``.

    A name belongs to the synthesizer's config (when ``--data`` is a method) or to the
    reconstruction's (:class:`~zq_plugin.reconstruct.ReconstructConfig`); ``synth.NAME`` /
    ``reconstruct.NAME`` say which when both have it. Checked before the model loads.

    Raises:
        ConfigError: a name neither has, a name both have without a prefix, a value of the wrong kind.
    """
    import dataclasses

    from zq_plugin.reconstruct import METHODS as RECONSTRUCTIONS
    from zq_plugin.synth import METHODS as SYNTHESIZERS

    groups: dict[str, tuple[str, set[str]]] = {}
    if data in SYNTHESIZERS:
        groups["synth"] = (f"--data {data}", _fields(SYNTHESIZERS[data].config_cls))
    if reconstruction:
        groups["reconstruct"] = (f"--reconstruct {reconstruction}", _fields(RECONSTRUCTIONS["genie-m"]))
    if not groups:
        groups["synth"] = (f"--data {data} (it synthesizes nothing and reconstructs nothing)", set())
    routed = route_options(items, groups)
    synth, recon = routed.get("synth", {}), routed.get("reconstruct", {})
    if synth:
        SYNTHESIZERS[data].config(dict(synth))  # bad values named now, before the model loads
    if recon:
        dataclasses.replace(RECONSTRUCTIONS[reconstruction or "genie-m"], **recon)
    return synth, recon


def parse_normalization(text: str) -> tuple[list[float], list[float]]:
    """``--normalization``: ``"MEAN/STD"`` with per-channel comma lists, or ``"MEAN,STD"`` for one channel.

    ``"0.485,0.456,0.406/0.229,0.224,0.225"`` -> ``([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])``.
    """
    try:
        if "/" in text:
            mean_text, _, std_text = text.partition("/")
            mean, std = [float(v) for v in mean_text.split(",")], [float(v) for v in std_text.split(",")]
        else:
            mean_value, std_value = (float(v) for v in text.split(","))
            mean, std = [mean_value], [std_value]
    except ValueError as exc:
        raise ConfigError(
            f"--normalization {text!r} must be MEAN,STD (one channel, e.g. 0.2860,0.3530) or per-channel "
            "MEANS/STDS (e.g. 0.485,0.456,0.406/0.229,0.224,0.225)."
        ) from exc
    if len(mean) != len(std) or min(std) <= 0:
        raise ConfigError(f"--normalization {text!r} needs as many means as stds, and every std > 0.")
    return mean, std


def input_range_arg(args: argparse.Namespace, channels: int) -> tuple[float, float] | str | None:
    """The input box from ``--input-range`` or ``--normalization`` (not both); ``"auto"`` with neither.

    With ``--normalization``, pixels ``[0, 1]`` normalized per channel give the box
    ``((0 - mean) / std, (1 - mean) / std)``; synthesis takes one ``(lo, hi)`` pair for all channels, so
    per-channel boxes are merged into the widest one (logged).
    """
    text = getattr(args, "normalization", None)
    if text is None:
        return parse_input_range(args.input_range)
    if args.input_range is not None:
        raise ConfigError("give --input-range or --normalization, not both (--normalization computes the range).")
    mean, std = parse_normalization(text)
    if len(mean) not in (1, channels):
        raise ConfigError(
            f"--normalization has {len(mean)} channels but the input has {channels}: give one MEAN,STD or {channels}."
        )
    lows = [(0.0 - m) / s for m, s in zip(mean, std, strict=True)]
    highs = [(1.0 - m) / s for m, s in zip(mean, std, strict=True)]
    box = (min(lows), max(highs))
    if len(mean) > 1:
        logger.info(
            "--normalization: per-channel input boxes %s; synthesis clamps every channel to the widest, (%.4g, %.4g)",
            ", ".join(f"({lo:.4g}, {hi:.4g})" for lo, hi in zip(lows, highs, strict=True)),
            *box,
        )
    return box


def package_version() -> str:
    """The installed version of the ``zq-plugin`` distribution (``zq_plugin.__version__`` if not installed)."""
    try:
        return importlib.metadata.version("zq-plugin")
    except importlib.metadata.PackageNotFoundError:
        import zq_plugin

        return str(getattr(zq_plugin, "__version__", "unknown"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse help that shows ``(default: X)`` for options with a real default (not None/False/[])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return action.help
        if "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _export(qmodel: nn.Module, example: torch.Tensor, backend: str) -> tuple[Any, Any, str]:
    """``(saved object, its loaded callable, format)`` for :func:`save_quantized`."""
    if backend == "brevitas":  # Brevitas layers do not torch.export (data-dependent checks); they trace
        traced = torch.jit.trace(qmodel, example, check_trace=False)
        return traced, traced, "TorchScript: torch.jit.load(FILE)"
    if backend == "pt2e":
        from zq_plugin.backends.pt2e import export_program

        program = export_program(cast(torch.fx.GraphModule, qmodel), example)
        fmt = "torch.export program: import torchao.quantization.pt2e; torch.export.load(FILE).module()"
        return program, program.module(), fmt
    program = export_sim(qmodel, example)
    return program, program.module(), "torch.export program: torch.export.load(FILE).module()"


def save_quantized(qmodel: nn.Module, example: torch.Tensor, path: Path, backend: str) -> str:
    """Write the calibrated model for use without zq_plugin; returns the format's name.

    FX: the clamping simulation as a ``torch.export`` program (``torch.export.load(path).module()``),
    its FakeQuantize modules frozen to their calibrated parameters, any batch size. Brevitas: a
    TorchScript trace (``torch.jit.load(path)``); its QCDQ ONNX is ``--onnx-out``. The saved model is
    checked against ``qmodel`` on ``example`` before the file is written (atomically).
    """
    with torch.no_grad():
        expected = select_output(qmodel(example))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit/export's tracer and deprecation notes
            saved, loaded, fmt = _export(qmodel, example, backend)
            with torch.no_grad():
                got = select_output(loaded(example))
    except Exception as exc:  # an export failure of torch's, for a construct the exporter does not take
        raise ConfigError(
            f"--out: the quantized model could not be exported ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). "
            + ("Use --onnx-out for QCDQ ONNX." if backend == "brevitas" else "Use the model from Python (quantize_fx).")
        ) from exc
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise ConfigError(
            f"--out: the exported model differs from the calibrated one by {float((got - expected).abs().max()):.3g}; "
            "nothing was written. Use the model from Python instead."
        )
    with warnings.catch_warnings():  # torch.jit.save's note: DeprecationWarning in torch 2.13, FutureWarning in 2.15
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.save")
        if backend == "brevitas":
            atomic_write(path, lambda f: torch.jit.save(saved, f))
        else:
            atomic_write(path, lambda f: torch.export.save(saved, f))
    return fmt


@contextlib.contextmanager
def torchrun_group() -> Iterator[int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): a gloo process group for the block; yields this rank (0 alone).

    On leaving, every rank waits for the others (none tears the group down while another still
    uses it) and the group is destroyed, also on error.
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # started by torchrun: CPU processes
    try:
        yield torch.distributed.get_rank() if distributed else 0
        if distributed:
            torch.distributed.barrier()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """``zq demo``."""
    models = args.models or list(DEMO_MODELS)
    if args.test_images is not None and args.test_images < 1:
        raise ConfigError(f"--test-images {args.test_images}: give at least 1 (or leave it out for all 10,000).")
    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"--iterations {args.iterations}: give the reconstruction steps per unit, >= 1.")
    start = time.perf_counter()
    results = run_demo(
        args.out, models, args.num_samples, args.steps, args.seed, not args.no_cache, num_test=args.test_images,
        iterations=args.iterations,
    )  # fmt: skip
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    table = demo_markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.md").write_text(table)
    (args.out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    md, js = (args.out / "demo.md").resolve(), (args.out / "demo.json").resolve()
    print(f"total {results['total_seconds']} s; wrote {md} and {js}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    """``zq synthesize``."""
    check_writable(args.out, "--out")  # before synthesis, which takes a while
    model = load_model(args.model, args.arch, args.checkpoint)
    shape, _ = checked_input(model, args)
    input_range = input_range_arg(args, shape[0])
    # without --cache-dir, finished batches go to OUT.cache (removed once OUT is written): Ctrl-C, rerun, resume
    cache_dir = args.cache_dir if args.cache_dir is not None else Path(f"{args.out}.cache")
    with torchrun_group() as rank:
        data = synthesize(
            model,
            args.method,
            num_samples=args.num_samples,
            input_shape=shape,
            seed=args.seed,
            batch_size=args.batch_size,
            cache_dir=cache_dir,
            input_range=input_range,  # type: ignore[arg-type]
            **parse_options(args.option),
        )
        if rank == 0:
            data.save(args.out)
            if args.cache_dir is None:
                shutil.rmtree(cache_dir, ignore_errors=True)
            print(f"wrote {data} to {args.out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """``zq quantize``."""
    check_writable(args.int8_out, "--int8-out")
    check_writable(args.onnx_out, "--onnx-out")
    if args.out is not None and args.backend in ("fx", "pt2e") and args.out.suffix != ".pt2":
        raise ConfigError(
            f"--out {args.out}: the {args.backend.upper()} model is a torch.export program, "
            "whose file name ends in .pt2."
        )
    check_writable(args.out, "--out")
    if not args.plan:  # before the model, the data and the calibration, which take a while
        for flag, bits in (("--w-bits", args.w_bits), ("--a-bits", args.a_bits)):
            check_bits(bits, flag)
    if args.budget:
        from zq_plugin.mixed_precision.bops import parse_bops_budget

        parse_bops_budget(args.budget)
    if args.first_last_bits is not None:
        check_bits(args.first_last_bits, "--first-last-bits")
    method = args.reconstruct or ("genie-m" if args.recipe == "best" else None)
    synth_options, args.reconstruct_options = split_options(args.option, args.data, method)  # before the model
    model = load_model(args.model, args.arch, args.checkpoint)
    if args.evaluate:  # before the data and the calibration, which take a while
        require_fashion_mnist(model, args, "--evaluate")
    data = load_data(model, args, synth_options)
    report: dict[str, Any] = {"data": args.data}
    if args.option:
        report["options"] = {**synth_options, **args.reconstruct_options}
    if not args.plan and not args.budget:
        report.update(w_bits=args.w_bits, a_bits=args.a_bits)
    plan = None
    if args.budget:
        from zq_plugin.mixed_precision.bops import bops_plan

        if args.plan or (args.w_bits, args.a_bits) != (8, 8):  # the parser's defaults
            raise ConfigError("--budget chooses every layer's bits: drop --plan, --w-bits and --a-bits.")
        chosen = bops_plan(model, data, budget=args.budget, first_last_bits=args.first_last_bits, progress=False)
        plan = chosen.plan
        report.update(budget=args.budget, budget_bops=chosen.budget_bops, bops=chosen.bops)
    if args.plan:
        from zq_plugin.mixed_precision import BitPlan

        if not args.plan.is_file():
            raise ConfigError(
                f"--plan {args.plan} does not exist: write one with 'zq plan ... --out DIR' (DIR/plan.json)."
            )
        plan = BitPlan.load(args.plan).with_params(model)
        report["plan"] = str(args.plan)  # its figures, not the unused uniform --w-bits/--a-bits
        report["average_w_bits"] = round(plan.average_w_bits(), 3)
    sim = _quantize(model, data, plan, method, args, report)
    built = describe(sim).to_dict()  # what the model applies, read from it (not from the request)
    report.update(
        layers_by_w_bits=built["layers_by_bits"]["w_bits"], layers_by_a_bits=built["layers_by_bits"]["a_bits"]
    )
    report["model"] = built
    if args.evaluate:
        x_test, y_test = datasets.load_fashion_mnist("test")
        report["fp32_top1"] = accuracy(model, x_test, y_test)
        report["quantized_top1"] = accuracy(sim, x_test, y_test)
    if args.int8_out:
        if args.plan or args.budget or args.backend != "fx":
            raise ConfigError("--int8-out is the FX int8 model of uniform W8A8: drop --plan, --budget and --backend.")
        if (args.w_bits, args.a_bits) != (8, 8):
            raise ConfigError(
                "--int8-out needs --w-bits 8 --a-bits 8: torch's int8 kernels do not clamp to fewer bits."
            )
        int8 = convert_int8_fx(model, data)
        example = next(iter(iter_batches(data, 1)))[:1]
        traced = torch.jit.trace(int8, example)
        atomic_write(args.int8_out, lambda f: torch.jit.save(traced, f))  # folders created, no half file
        report["int8_out"] = str(args.int8_out)
    if args.out:
        example = next(iter(iter_batches(data, 2)))[:2]  # two: a batch of one would fix the batch size
        report["out_format"] = save_quantized(sim, example, args.out, args.backend)
        report["out"] = str(args.out)
    print(json.dumps(report, indent=2))
    return 0


def _reconstruct_config(method: str, args: argparse.Namespace, report: dict[str, Any]) -> Any:
    """The method's configuration with ``--iterations``, noted in the report."""
    import dataclasses

    from zq_plugin.reconstruct import METHODS

    if args.iterations is not None and args.iterations < 1:
        raise ConfigError(f"--iterations {args.iterations}: give the reconstruction steps per unit, >= 1.")
    config = dataclasses.replace(METHODS[method], **getattr(args, "reconstruct_options", {}))
    if args.iterations is not None:
        config = dataclasses.replace(config, iterations=args.iterations)
    report.update(reconstruction=method, iterations=config.iterations)
    return config


def _quantize(
    model: nn.Module, data: Any, plan: Any, method: str | None, args: argparse.Namespace, report: dict[str, Any]
) -> nn.Module:
    """``zq quantize``: one request through the pipeline (calibrate or reconstruct, then the backend).

    Brevitas's own tools (``--gptq``, ``--bias-correction``) run on the carried model; ``--onnx-out``
    writes its QCDQ ONNX.
    """
    from zq_plugin.pipeline import Request, run

    if args.act_stats is not None:
        raise ConfigError(
            f"--act-stats {args.act_stats}: the statistic is chosen by --observer on every backend "
            "(e.g. --observer mse; docs/observers.md)."
        )
    if args.backend != "brevitas" and (args.bias_correction or args.gptq):
        raise ConfigError(
            f"--bias-correction and --gptq are Brevitas's own tools: they belong to --backend brevitas "
            f"(not --backend {args.backend})."
        )
    if method is not None and args.gptq:
        raise ConfigError("--gptq would overwrite the reconstructed rounding: use one of --gptq, --reconstruct.")
    if method is None and args.iterations is not None:
        raise ConfigError("--iterations sets the reconstruction's steps: give --reconstruct METHOD or --recipe best.")
    observer = args.observer or ("mse" if method is not None else "minmax")
    config = _reconstruct_config(method, args, report) if method is not None else None
    request = Request(
        w_bits=args.w_bits, a_bits=args.a_bits, first_last_bits=args.first_last_bits, plan=plan,
        stage="reconstruct" if method is not None else "calibrate", backend=args.backend, observer=observer,
        weight_observer=args.weight_observer, reconstruction=method or "genie-m", reconstruction_config=config,
    )  # fmt: skip
    report.update(
        backend=args.backend, stage=request.stage, observer=observer, weight_observer=request.weight_statistic
    )
    started = time.perf_counter()
    qmodel = run(model, data, request, cache_dir=args.cache_dir, progress=sys.stderr.isatty())
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.backend == "brevitas":
        from zq_plugin.backends import brevitas as zb

        if args.gptq:
            zb.gptq(qmodel, data)
        if args.bias_correction:
            zb.bias_correct(qmodel, data)
        report.update(gptq=args.gptq, bias_correction=args.bias_correction)
    if args.onnx_out:  # one ONNX export per backend; each loads in onnxruntime alone
        example = next(iter(iter_batches(data, 2)))[:2]
        report["onnx_out"] = write_onnx(qmodel, example, args.onnx_out, args.backend)
    return qmodel


def cmd_finetune(args: argparse.Namespace) -> int:
    """``zq finetune``: the pipeline's fine-tuning stage on a generator's stream or on ``--data``, on ``--backend``."""
    import dataclasses

    from zq_plugin.pipeline import Request, run
    from zq_plugin.reconstruct import METHODS as RECONSTRUCTIONS
    from zq_plugin.synth import METHODS as SYNTHESIZERS
    from zq_plugin.synth import get_method

    if args.out is not None and args.backend in ("fx", "pt2e") and args.out.suffix != ".pt2":
        raise ConfigError(
            f"--out {args.out}: the fine-tuned {args.backend.upper()} model is a torch.export program, "
            "whose name ends in .pt2."
        )
    for path, flag in ((args.out, "--out"), (args.generator_out, "--generator-out"), (args.onnx_out, "--onnx-out")):
        check_writable(path, flag)
    generator = None if args.generator == "none" else args.generator
    if generator is None and args.data is None:
        raise ConfigError("--generator none needs --data (a 'zq synthesize' file, real, noise or a method).")
    if generator is None and args.generator_out is not None:
        raise ConfigError("--generator-out saves the trained generator: give --generator adadfq or gdfq.")
    for flag, bits in (("--w-bits", args.w_bits), ("--a-bits", args.a_bits)):
        check_bits(bits, flag)
    first_last = None if args.all_layers else args.first_last_bits
    if first_last is not None:
        check_bits(first_last, "--first-last-bits")
    game = get_method(generator or "adadfq")
    groups = {"game": (f"--generator {args.generator} (docs/finetune.md)", _fields(game.config_cls))}
    if args.data in SYNTHESIZERS:
        groups["synth"] = (f"--data {args.data}", _fields(SYNTHESIZERS[args.data].config_cls))
    if args.init == "reconstruct":
        groups["reconstruct"] = ("--init reconstruct (Genie-M)", _fields(RECONSTRUCTIONS["genie-m"]))
    routed = route_options(args.option, groups)  # every option checked before the model is loaded
    config = game.config(routed["game"])
    if routed.get("synth"):
        SYNTHESIZERS[args.data].config(dict(routed["synth"]))
    options: dict[str, Any] = {}
    if args.init == "reconstruct":
        options["reconstruct_config"] = dataclasses.replace(RECONSTRUCTIONS["genie-m"], **routed["reconstruct"])
    model = load_model(args.model, args.arch, args.checkpoint)
    if args.evaluate:  # before the data and the training, which take a while
        require_fashion_mnist(model, args, "--evaluate")
    shape, _ = checked_input(model, args)
    input_range = input_range_arg(args, shape[0])
    data = load_data(model, args, routed.get("synth")) if args.data is not None else None
    # without --cache-dir, checkpoints go to OUT.cache (removed once OUT is written): Ctrl-C, rerun, resume
    cache_dir = args.cache_dir
    if cache_dir is None and args.out is not None:
        cache_dir = Path(f"{args.out}.cache")
    report: dict[str, Any] = {
        "data": args.data,
        "generator": generator,
        "backend": args.backend,
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "first_last_bits": first_last,
        "init": args.init,
    }
    if args.option:
        report["options"] = {group: values for group, values in routed.items() if values}
    request = Request(
        w_bits=args.w_bits, a_bits=args.a_bits, first_last_bits=first_last, stage="finetune", backend=args.backend,
        seed=args.seed, finetune_options={
            "generator": generator, "steps": args.steps, "config": config, "init": args.init, "input_shape": shape,
            "input_range": input_range, "batch_size": args.batch_size, "calibration_samples": args.num_samples,
            **options,
        },
    )  # fmt: skip
    with torchrun_group() as rank:
        qmodel = run(model, data, request, cache_dir=cache_dir, progress=sys.stderr.isatty())
        if rank != 0:
            return 0
        info = cast(dict[str, Any], qmodel.zq_build.stage_report)  # type: ignore[union-attr]
        report.update(steps=info["config"]["steps"], seconds=round(info["seconds"], 1), last_losses=info["last_losses"])
        built = describe(qmodel).to_dict()
        report.update(
            layers_by_w_bits=built["layers_by_bits"]["w_bits"], layers_by_a_bits=built["layers_by_bits"]["a_bits"]
        )
        report["model"] = built
        if args.evaluate:
            x_test, y_test = datasets.load_fashion_mnist("test")
            report["fp32_top1"] = accuracy(model, x_test, y_test)
            report["quantized_top1"] = accuracy(qmodel, x_test, y_test)
        if args.generator_out is not None:
            cast(Any, qmodel.zq_generator).save(args.generator_out)
            report["generator_out"] = str(args.generator_out)
        if args.out is not None or args.onnx_out is not None:
            if data is not None:
                example = next(iter(iter_batches(data, 2)))[:2]
            else:
                example = next(iter(cast(Any, qmodel.zq_generator)))[0][:2]
            if args.onnx_out is not None:
                report["onnx_out"] = write_onnx(qmodel, example, args.onnx_out, args.backend)
            if args.out is not None:
                report["out_format"] = save_quantized(qmodel, example, args.out, args.backend)
                report["out"] = str(args.out)
        if args.cache_dir is None and cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        print(json.dumps(report, indent=2))
    return 0


def write_onnx(qmodel: nn.Module, example: torch.Tensor, path: Path, backend: str) -> str:
    """``--onnx-out``: the backend's one ONNX export (each loads in onnxruntime alone); returns the path."""
    from zq_plugin.backends import brevitas, fx, pt2e

    export = {"brevitas": brevitas.export_onnx, "pt2e": pt2e.export_onnx, "fx": fx.export_onnx}
    return str(export[backend](qmodel, example, path))  # type: ignore[arg-type]


def load_data(model: nn.Module, args: argparse.Namespace, options: dict[str, Any] | None = None) -> Any:
    """``--data``: a file from ``zq synthesize``, ``real`` (training images), ``noise``, or a method to run now.

    ``options``: the synthesizer's options (``--option``), for a method run now.
    """
    from zq_plugin.synth import METHODS

    if args.data == "real":
        require_fashion_mnist(model, args, "--data real")
        return real_subset(args.num_samples, args.seed)
    if args.data not in ("noise", *METHODS):
        return _load_data_file(model, args)
    shape, _ = checked_input(model, args)  # before synthesis, which takes a while
    input_range = input_range_arg(args, shape[0])
    if args.data == "noise":
        return synthesize(
            model,
            "noise",
            num_samples=args.num_samples,
            input_shape=shape,
            seed=args.seed,
            input_range=input_range,  # type: ignore[arg-type]
            **(options or {}),
        )
    return synthesize(
        model,
        args.data,
        num_samples=args.num_samples,
        input_shape=shape,
        seed=args.seed,
        cache_dir=getattr(args, "cache_dir", None),
        input_range=input_range,  # type: ignore[arg-type]
        **(options or {}),
    )


def _load_data_file(model: nn.Module, args: argparse.Namespace) -> SyntheticDataset:
    """``--data FILE``; its images give the input shape (``--input-shape``, if given, must agree)."""
    from zq_plugin.synth import METHODS

    if not Path(args.data).exists() and not Path(args.data).suffix:
        raise ConfigError(
            f"--data {args.data!r} is neither a file nor a data source: use a file from 'zq synthesize', "
            f"'real', 'noise' or a synthesis method: {', '.join(sorted(METHODS))}."
        )
    shape = checked_input(model, args)[0] if args.input_shape else None
    try:
        data = SyntheticDataset.load(args.data, model, allow_mismatch=getattr(args, "allow_mismatch", False))
    except DataMismatchError as exc:  # the library's hint names the keyword; a CLI user has a flag
        raise DataMismatchError(str(exc).replace("allow_mismatch=True", "--allow-mismatch")) from exc
    found = tuple(data.images.shape[1:])
    if shape is not None and shape != found:
        raise ConfigError(
            f"--input-shape {_shape_text(shape)} does not match the images of {args.data} ({_shape_text(found)}); "
            "drop --input-shape or make the data for this shape."
        )
    input_range_arg(args, found[0])  # the flags are checked even though a file needs no box
    return data


def cmd_plan(args: argparse.Namespace) -> int:
    """``zq plan``."""
    from zq_plugin.mixed_precision import Budget, hybrid_plan, pareto_plan

    budget = Budget.parse(args.budget)  # before the data and the measurement, which take a while
    check_writable(args.out, "--out", folder=True)
    synth_options, _ = split_options(args.option, args.data, None)  # a plan reconstructs nothing
    model = load_model(args.model, args.arch, args.checkpoint)
    if args.evaluate:  # an explicit --evaluate K on a model that is not a Fashion-MNIST classifier
        require_fashion_mnist(model, args, "--evaluate")
    data = load_data(model, args, synth_options)
    result = pareto_plan(model, data, budget=budget, bits=args.bits, a_bits=args.a_bits, grid=args.grid, progress=True)
    plan = result.plan
    if args.hybrid_threshold is not None:
        plan, _ = hybrid_plan(model, data, plan, threshold=args.hybrid_threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    plan.save(args.out / "plan.json")
    rows = result.frontier_rows()
    budget_average_bits = result.budget_bits / sum(result.sensitivity.params)
    measured: list[dict[str, Any]] = []
    evaluate = args.evaluate if args.evaluate is not None else (4 if args.model else 0)
    if evaluate:
        x_test, y_test = datasets.load_fashion_mnist("test")
        picks = points_to_measure(rows, budget_average_bits, evaluate)  # around the budget, and the ends
        points: list[tuple[Any, Any]] = [(result.frontier[i], result.plan_at(result.frontier[i])) for i in picks]
        points.append((None, plan))  # the chosen plan (hybrid: not a frontier point of its own)
        for point, p in points:
            sim = quantize_fx(model, data, plan=p)
            entry = {
                "average_bits": p.average_w_bits(),
                "bytes": p.weight_bytes(),
                "top1": accuracy(sim, x_test, y_test),
                "chosen": point is None,
            }
            measured.append(entry)
            logger.info("plan of %.2f average bits: top-1 %.2f", entry["average_bits"], entry["top1"])
    chosen = {
        "average_bits": plan.average_w_bits(),
        "bytes": plan.weight_bytes(),
        "sensitivity": rows[chosen_index(rows, budget_average_bits)]["sensitivity"],
        "top1": next((m["top1"] for m in measured if m["chosen"]), None),
    }
    doc = {
        "budget": args.budget,
        "budget_bits": result.budget_bits,
        "budget_average_bits": budget_average_bits,
        "chosen": chosen,
        "frontier": rows,
        "measured": measured,
        "sensitivity": result.sensitivity.to_dict(),
    }
    (args.out / "frontier.json").write_text(json.dumps(doc, indent=2) + "\n")
    png = (args.out / "frontier.png").resolve()
    if not args.no_plot:
        name = args.model or args.arch
        title = f"{name}: {args.budget}, candidates {{{','.join(map(str, sorted(set(args.bits))))}}}"
        plot_frontier(png, rows, measured, title, budget_average_bits=budget_average_bits, budget_label=args.budget)
    print(plan.table())
    print(f"wrote {(args.out / 'plan.json').resolve()} and {(args.out / 'frontier.json').resolve()}")
    if not args.no_plot:
        print(f"frontier plot: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``zq``."""
    parser = argparse.ArgumentParser(prog="zq", description="Zero-shot quantization for PyTorch CNNs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="zero-shot vs real-data calibration on the zoo models with BatchNorm")
    demo.add_argument("--out", type=Path, default=Path("zq_out"), help="output folder (tables, cache)")
    demo.add_argument(
        "--models", nargs="*", help=f"zoo models (default: {' '.join(DEMO_MODELS)}; any of {zoo.available()})"
    )
    demo.add_argument("--num-samples", type=int, default=256)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help="ZeroQ Adam steps per batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-cache", action="store_true", help="re-synthesize even if cached data exist")
    demo.add_argument(
        "--test-images", type=int, metavar="N", help="evaluate on the first N test images (default: all 10,000)"
    )
    demo.add_argument("--iterations", type=int, help="the best recipe's reconstruction steps per unit (default: 200)")
    demo.set_defaults(func=cmd_demo)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", choices=zoo.available(), help="a zoo model (Fashion-MNIST, 1x28x28, 10 classes)")
        p.add_argument(
            "--arch",
            help="your model instead: package.module:Class, or a function, built without arguments; the current "
            "folder is searched first, as with 'python -m' (no PYTHONPATH=. needed)",
        )
        p.add_argument("--checkpoint", help="state_dict file for --arch (loaded with weights_only=True)")
        p.add_argument(
            "--input-shape",
            help="one input's shape, channels first, e.g. 3,32,32; checked with one forward before the work "
            "(default: 1,28,28, the zoo's)",
        )
        p.add_argument(
            "--input-range",
            help="the box of valid inputs synthesis clamps to, lo,hi in the model's input space, or 'none'; write "
            "--input-range=-0.81,2.02 (with '=' when lo is negative; that is pixels [0, 1] after Fashion-MNIST's "
            "normalization) (default: the model's input_range attribute)",
        )
        p.add_argument(
            "--normalization",
            metavar="MEAN,STD",
            help="instead of --input-range: the model's input normalization, from which the box of pixels [0, 1] is "
            "computed; one channel MEAN,STD (0.2860,0.3530) or per channel MEANS/STDS "
            "(0.485,0.456,0.406/0.229,0.224,0.225; synthesis clamps all channels to the widest box)",
        )
        p.add_argument("--num-samples", type=int, default=256, help="calibration images to make or use")
        p.add_argument("--seed", type=int, default=0, help="seed of synthesis (the same seed gives the same images)")

    syn = sub.add_parser("synthesize", help="write a synthetic calibration dataset file", formatter_class=HelpFormatter)
    add_model_args(syn)
    syn.add_argument(
        "--method",
        default="zeroq",
        help="zeroq, dsg, retro, genie, noise, adadfq or gdfq (docs/synthesis.md, docs/finetune.md)",
    )
    syn.add_argument("--batch-size", type=int, default=64, help="images optimized together")
    syn.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method option, e.g. steps=200 (repeatable; docs/synthesis.md lists them)",
    )
    syn.add_argument("--out", type=Path, required=True, help="the dataset file to write (atomically)")
    syn.add_argument(
        "--cache-dir",
        type=Path,
        help="keep finished batches here, and keep them; a rerun resumes from them (and torchrun ranks share it) "
        "(default: OUT.cache, removed once OUT is written: after Ctrl-C the same command resumes)",
    )
    syn.set_defaults(func=cmd_synthesize)

    qua = sub.add_parser(
        "quantize",
        help="calibrate an FX simulation or Brevitas layers (and save them)",
        formatter_class=HelpFormatter,
    )
    add_model_args(qua)
    qua.add_argument(
        "--data",
        default="zeroq",
        help="a dataset file from 'zq synthesize', 'real' (Fashion-MNIST training images), 'noise', or a method to "
        "run now (zeroq, dsg, ...; zeroq is what zq_plugin.quantize synthesizes)",
    )
    qua.add_argument("--allow-mismatch", action="store_true", help="use a dataset file made for other weights")
    qua.add_argument("--w-bits", type=int, default=8, help="weight bits of all but the first and last layer")
    qua.add_argument("--a-bits", type=int, default=8, help="activation bits of all but the first and last layer")
    qua.add_argument("--first-last-bits", type=int, default=8, help="weight and activation bits of the first and last")
    qua.add_argument(
        "--observer",
        "--act-observer",
        dest="observer",
        choices=NAMES,
        help="range statistic, one meaning on every backend (docs/observers.md; default: minmax, mse with "
        "--recipe best / --reconstruct)",
    )
    qua.add_argument(
        "--weight-observer",
        choices=[n for n in NAMES if n != "histogram"],
        help="per-channel weight statistic (default: --observer's; minmax for histogram)",
    )
    qua.add_argument(
        "--evaluate", action="store_true", help="report top-1 on the Fashion-MNIST test set (Fashion-MNIST models)"
    )
    qua.add_argument(
        "--out",
        type=Path,
        help="save the calibrated model, loadable without zq_plugin: FX (any bits): a torch.export program FILE.pt2, "
        "load with torch.export.load(FILE).module(); PT2E: the same, after import torchao.quantization.pt2e; "
        "Brevitas: TorchScript, torch.jit.load(FILE) (QCDQ ONNX: "
        "--onnx-out)",
    )
    qua.add_argument("--int8-out", type=Path, help="also write a TorchScript int8 model (W8A8 only)")
    qua.add_argument("--plan", type=Path, help="a BitPlan JSON (e.g. from 'zq plan') instead of uniform bits")
    qua.add_argument(
        "--budget",
        help="instead of uniform bits: spend the bit operations of a uniform plan (e.g. W4A4) on each layer's "
        "weight and input bits where the sensitivities say they pay (zq_plugin.mixed_precision.bops_plan)",
    )
    qua.add_argument(
        "--backend",
        choices=["fx", "pt2e", "brevitas"],
        default="fx",
        help="FX simulation, torchao PT2E (torch.export, prepare_pt2e, convert_pt2e) or Brevitas layers",
    )
    qua.add_argument(
        "--recipe",
        choices=["plain", "best"],
        default="plain",
        help="best: the measured-best pipeline, MSE observers then Genie-M reconstruction (docs/reconstruction.md)",
    )
    qua.add_argument(
        "--reconstruct",
        choices=["adaround", "brecq", "qdrop", "genie-m"],
        help="after calibration with the MSE observers, reconstruct unit by unit (in the FX simulation, carried "
        "into --backend brevitas / pt2e; default: none)",
    )
    qua.add_argument("--iterations", type=int, help="reconstruction steps per unit (default: 500)")
    qua.add_argument(
        "--cache-dir", type=Path, help="keep synthesized batches and reconstruction checkpoints here (resume)"
    )
    qua.add_argument("--act-stats", help=argparse.SUPPRESS)  # replaced by --observer: refused by name
    qua.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the synthesizer (--data METHOD, e.g. steps=200) or of the reconstruction (e.g. "
        "drop_prob=0.5); synth.NAME= / reconstruct.NAME= when both have it; repeatable",
    )
    qua.add_argument("--bias-correction", action="store_true", help="Brevitas bias correction after calibration")
    qua.add_argument("--gptq", action="store_true", help="Brevitas GPTQ after calibration")
    qua.add_argument(
        "--onnx-out",
        type=Path,
        help="also write ONNX: Brevitas and PT2E as QCDQ (integer ranges kept), FX as the simulation's float ops; "
        "run with onnxruntime alone",
    )
    qua.set_defaults(func=cmd_quantize)

    fin = sub.add_parser(
        "finetune",
        help="fine-tune a quantized FX simulation by distillation on a generator (AdaDFQ, GDFQ) or a fixed set",
        formatter_class=HelpFormatter,
    )
    add_model_args(fin)
    fin.add_argument(
        "--generator",
        choices=["adadfq", "gdfq", "none"],
        default="adadfq",
        help="train this generator against the student and fine-tune on its stream; none: on --data alone "
        "(docs/finetune.md)",
    )
    fin.add_argument(
        "--data",
        help="images that calibrate the student (and, with --generator none, the fixed fine-tuning set): a file "
        "from 'zq synthesize', real, noise or a method to run now (default: the generator's first --num-samples)",
    )
    fin.add_argument("--allow-mismatch", action="store_true", help="use a dataset file made for other weights")
    fin.add_argument("--w-bits", type=int, default=4, help="weight bits of all but the first and last layer")
    fin.add_argument("--a-bits", type=int, default=4, help="activation bits of all but the first and last layer")
    fin.add_argument("--first-last-bits", type=int, default=8, help="weight and activation bits of the first and last")
    fin.add_argument(
        "--all-layers", action="store_true", help="first and last layer at --w-bits/--a-bits too (the papers' setting)"
    )
    fin.add_argument("--steps", type=int, help="iterations (default: the generator's config, 400)")
    fin.add_argument(
        "--init",
        choices=["calibrate", "reconstruct"],
        default="calibrate",
        help="the student before fine-tuning: MSE observers, or Genie-M reconstruction on the calibration images",
    )
    fin.add_argument("--batch-size", type=int, default=64, help="images per iteration (all torchrun ranks together)")
    fin.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a game or student option, e.g. warmup=50, lr_student=3e-4, margin=[0.1,0.8] (docs/finetune.md lists "
        "them; with --generator none the student's options are AdaDFQ's config fields), of the synthesizer "
        "(--data METHOD) or of the reconstruction (--init reconstruct, e.g. iterations=200); game.NAME= / "
        "synth.NAME= / reconstruct.NAME= when several take NAME; repeatable",
    )
    fin.add_argument(
        "--evaluate", action="store_true", help="report top-1 on the Fashion-MNIST test set (Fashion-MNIST models)"
    )
    fin.add_argument(
        "--out",
        type=Path,
        help="save the fine-tuned model, loadable without zq_plugin: FX and PT2E a torch.export program FILE.pt2 "
        "(torch.export.load(FILE).module(); PT2E after import torchao.quantization.pt2e), Brevitas TorchScript",
    )
    fin.add_argument(
        "--generator-out", type=Path, help="save the trained generator (zq_plugin.GeneratorStream.load streams it)"
    )
    fin.add_argument(
        "--backend",
        choices=["fx", "pt2e", "brevitas"],
        default="fx",
        help="deploy the fine-tuned simulation as: the FX simulation, a converted PT2E model or Brevitas layers "
        "(every weight and step carried)",
    )
    fin.add_argument("--onnx-out", type=Path, help="also write the backend's QDQ/QCDQ ONNX, run with onnxruntime alone")
    fin.add_argument(
        "--cache-dir",
        type=Path,
        help="keep checkpoints here, and keep them; a rerun resumes from them (default: OUT.cache, removed once "
        "OUT is written: after Ctrl-C the same command resumes)",
    )
    fin.set_defaults(func=cmd_finetune)

    pla = sub.add_parser("plan", help="mixed-precision plan from data: sensitivity, Pareto frontier, plot")
    add_model_args(pla)
    pla.add_argument("--budget", required=True, help="MP4 / 4bit (size of a uniform 4-bit model), 4.5avg, 120KB")
    pla.add_argument(
        "--data", default="zeroq", help="zeroq/dsg/retro/... (synthesized now), a 'zq synthesize' file, real, noise"
    )
    pla.add_argument("--cache-dir", type=Path, help="cache of synthesized batches")
    pla.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the synthesizer (--data METHOD, e.g. steps=200); repeatable",
    )
    pla.add_argument("--allow-mismatch", action="store_true", help="use a dataset file made for other weights")
    pla.add_argument(
        "--bits",
        type=int,
        nargs="+",
        default=list(range(2, 9)),
        help="candidate weight bits (default: 2 3 4 5 6 7 8; ZeroQ's paper used 2 4 8)",
    )
    pla.add_argument("--a-bits", type=int, default=8, help="activation bits of every layer")
    pla.add_argument("--grid", choices=["uniform", "nonuniform"], default="uniform")
    pla.add_argument("--hybrid-threshold", type=float, help="also choose per-tensor weights within this KL")
    pla.add_argument(
        "--evaluate",
        type=nonnegative_int,
        metavar="K",
        help="measure top-1 on the Fashion-MNIST test set at the chosen plan and K frontier points around the "
        "budget and at the ends (default: 4 for zoo models, else 0)",
    )
    pla.add_argument("--no-plot", action="store_true")
    pla.add_argument("--out", type=Path, default=Path("zq_out/plan"))
    pla.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zq`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except ZQError as exc:
        print(f"zq: error: {exc}", file=sys.stderr)
        return 2
    except SynthesisInterrupted as exc:
        print(
            f"zq: interrupted: {exc.cached} of {exc.total} batches are cached in {exc.folder}; run the same command "
            "again to resume from them.",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print("zq: interrupted; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
