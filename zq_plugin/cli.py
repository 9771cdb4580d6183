"""The ``zq`` command: ``zq demo``, ``zq synthesize``, ``zq quantize``, ``zq plan``.

Run ``zq <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zq_plugin import datasets, zoo
from zq_plugin.backends.fx import convert_int8_fx, quantize_fx
from zq_plugin.data import SyntheticDataset, atomic_write, iter_batches
from zq_plugin.demo import DEMO_STEPS, demo_markdown, real_subset, run_demo
from zq_plugin.errors import ConfigError, DataMismatchError, ZQError
from zq_plugin.evaluation import accuracy
from zq_plugin.mixed_precision.report import plot_frontier
from zq_plugin.observers.ao import NAMES, observer_class
from zq_plugin.synth import synthesize

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
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--input-shape {text!r} must be comma-separated ints, e.g. 1,28,28.") from exc


def check_writable(path: Path | None, flag: str, *, folder: bool = False) -> None:
    """Fail before any work when ``path`` (a file, or a folder with ``folder``) cannot be written.

    Creates the missing parent folders (or the folder), as the writers do, and tries a scratch file.
    """
    if path is None:
        return
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".zq-write-check."):
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


# --------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """``zq demo``."""
    models = args.models or [n for n in zoo.available() if zoo.has_batchnorm(n)]
    start = time.perf_counter()
    results = run_demo(args.out, models, args.num_samples, args.steps, args.seed, not args.no_cache)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    table = demo_markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.md").write_text(table)
    (args.out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"total {results['total_seconds']} s; wrote {args.out / 'demo.md'} and {args.out / 'demo.json'}")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    """``zq synthesize``."""
    check_writable(args.out, "--out")  # before synthesis, which takes a while
    model = load_model(args.model, args.arch, args.checkpoint)
    shape = parse_shape(args.input_shape) if args.input_shape else zoo.INPUT_SHAPE
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # started by torchrun: CPU processes
    try:
        data = synthesize(
            model,
            args.method,
            num_samples=args.num_samples,
            input_shape=shape,
            seed=args.seed,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            input_range=parse_input_range(args.input_range),  # type: ignore[arg-type]
            **parse_options(args.option),
        )
        if not distributed or torch.distributed.get_rank() == 0:
            data.save(args.out)
            print(f"wrote {data} to {args.out}")
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """``zq quantize``."""
    check_writable(args.int8_out, "--int8-out")
    check_writable(args.onnx_out, "--onnx-out")
    model = load_model(args.model, args.arch, args.checkpoint)
    data = load_data(model, args)
    report: dict[str, Any] = {"w_bits": args.w_bits, "a_bits": args.a_bits, "data": args.data}
    plan = None
    if args.plan:
        from zq_plugin.mixed_precision import BitPlan

        if not args.plan.is_file():
            raise ConfigError(
                f"--plan {args.plan} does not exist: write one with 'zq plan ... --out DIR' (DIR/plan.json)."
            )
        plan = BitPlan.load(args.plan).with_params(model)
        report["plan"] = str(args.plan)
        report["average_w_bits"] = round(plan.average_w_bits(), 3)
    if args.backend == "brevitas":
        sim = _quantize_brevitas(model, data, plan, args, report)
    else:
        if args.onnx_out or args.bias_correction or args.gptq:
            raise ConfigError("--onnx-out, --bias-correction and --gptq belong to --backend brevitas.")
        report["act_observer"], report["weight_observer"] = args.act_observer, args.weight_observer
        act, wt = observer_class(args.act_observer), observer_class(args.weight_observer, per_channel=True)
        mapping = None
        if plan is not None:
            from zq_plugin.mixed_precision.emit import to_qconfig_mapping

            example = next(iter(iter_batches(data, 1)))[:1]
            mapping = to_qconfig_mapping(plan, model, (example,), act_observer=act, weight_observer=wt)
        sim = quantize_fx(
            model,
            data,
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            first_last_bits=args.first_last_bits,
            act_observer=act,
            weight_observer=wt,
            mapping=mapping,
        )
    if args.evaluate:
        x_test, y_test = datasets.load_fashion_mnist("test")
        report["fp32_top1"] = accuracy(model, x_test, y_test)
        report["quantized_top1"] = accuracy(sim, x_test, y_test)
    if args.int8_out:
        if args.plan or args.backend != "fx":
            raise ConfigError("--int8-out is the FX int8 model of uniform W8A8: drop --plan and --backend brevitas.")
        if (args.w_bits, args.a_bits) != (8, 8):
            raise ConfigError(
                "--int8-out needs --w-bits 8 --a-bits 8: torch's int8 kernels do not clamp to fewer bits."
            )
        int8 = convert_int8_fx(model, data)
        example = next(iter(iter_batches(data, 1)))[:1]
        traced = torch.jit.trace(int8, example)
        atomic_write(args.int8_out, lambda f: torch.jit.save(traced, f))  # folders created, no half file
        report["int8_out"] = str(args.int8_out)
    print(json.dumps(report, indent=2))
    return 0


def _quantize_brevitas(
    model: nn.Module, data: Any, plan: Any, args: argparse.Namespace, report: dict[str, Any]
) -> nn.Module:
    """``zq quantize --backend brevitas``: Brevitas layers, calibration, bias correction / GPTQ, ONNX."""
    from zq_plugin.backends import brevitas as zb

    qmodel = zb.to_brevitas(
        model,
        plan,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        first_last_bits=args.first_last_bits,
        act_stats=args.act_stats,
    )
    zb.calibrate(qmodel, data)
    if args.gptq:
        zb.gptq(qmodel, data)
    if args.bias_correction:
        zb.bias_correct(qmodel, data)
    report.update(backend="brevitas", act_stats=args.act_stats, gptq=args.gptq, bias_correction=args.bias_correction)
    if args.onnx_out:
        example = next(iter(iter_batches(data, 1)))[:1]
        report["onnx_out"] = str(zb.export_onnx(qmodel, example, args.onnx_out))
    return qmodel


def load_data(model: nn.Module, args: argparse.Namespace) -> Any:
    """``--data``: a file from ``zq synthesize``, ``real`` (training images), ``noise``, or a method to run now."""
    from zq_plugin.synth import METHODS

    shape = parse_shape(args.input_shape) if args.input_shape else zoo.INPUT_SHAPE
    if args.data == "real":
        return real_subset(args.num_samples, args.seed)
    if args.data == "noise":
        return synthesize(
            model,
            "noise",
            num_samples=args.num_samples,
            input_shape=shape,
            seed=args.seed,
            input_range=parse_input_range(args.input_range),  # type: ignore[arg-type]
        )
    if args.data not in METHODS and not Path(args.data).exists() and not Path(args.data).suffix:
        raise ConfigError(
            f"--data {args.data!r} is neither a file nor a data source: use a file from 'zq synthesize', "
            f"'real', 'noise' or a synthesis method: {', '.join(sorted(METHODS))}."
        )
    if args.data in METHODS:
        return synthesize(
            model,
            args.data,
            num_samples=args.num_samples,
            input_shape=shape,
            seed=args.seed,
            cache_dir=getattr(args, "cache_dir", None),
            input_range=parse_input_range(args.input_range),  # type: ignore[arg-type]
        )
    try:
        return SyntheticDataset.load(args.data, model, allow_mismatch=getattr(args, "allow_mismatch", False))
    except DataMismatchError as exc:  # the library's hint names the keyword; a CLI user has a flag
        raise DataMismatchError(str(exc).replace("allow_mismatch=True", "--allow-mismatch")) from exc


def cmd_plan(args: argparse.Namespace) -> int:
    """``zq plan``."""
    from zq_plugin.mixed_precision import Budget, hybrid_plan, pareto_plan
    from zq_plugin.mixed_precision.emit import to_qconfig_mapping

    budget = Budget.parse(args.budget)  # before the data and the measurement, which take a while
    check_writable(args.out, "--out", folder=True)
    model = load_model(args.model, args.arch, args.checkpoint)
    data = load_data(model, args)
    result = pareto_plan(model, data, budget=budget, bits=args.bits, a_bits=args.a_bits, grid=args.grid, progress=True)
    plan = result.plan
    if args.hybrid_threshold is not None:
        plan, _ = hybrid_plan(model, data, plan, threshold=args.hybrid_threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    plan.save(args.out / "plan.json")
    rows = result.frontier_rows()
    measured: list[dict[str, Any]] = []
    evaluate = args.evaluate if args.evaluate is not None else (4 if args.model else 0)
    if evaluate:
        x_test, y_test = datasets.load_fashion_mnist("test")
        example = next(iter(iter_batches(data, 1)))[:1]
        picks = sorted({round(i * (len(result.frontier) - 1) / max(evaluate - 1, 1)) for i in range(evaluate)})
        points: list[tuple[Any, Any]] = [(result.frontier[i], result.plan_at(result.frontier[i])) for i in picks]
        points.append((None, plan))  # the chosen plan, no frontier point of its own
        for point, p in points:
            sim = quantize_fx(model, data, mapping=to_qconfig_mapping(p, model, (example,)))
            entry = {
                "average_bits": p.average_w_bits(),
                "bytes": p.weight_bytes(),
                "top1": accuracy(sim, x_test, y_test),
                "chosen": point is None,
            }
            measured.append(entry)
            logger.info("plan of %.2f average bits: top-1 %.2f", entry["average_bits"], entry["top1"])
    doc = {
        "budget": args.budget,
        "budget_bits": result.budget_bits,
        "frontier": rows,
        "measured": measured,
        "sensitivity": result.sensitivity.to_dict(),
    }
    (args.out / "frontier.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not args.no_plot:
        name = args.model or args.arch
        plot_frontier(
            args.out / "frontier.png", rows, [m for m in measured if not m["chosen"]], f"{name}: {args.budget}"
        )
    print(plan.table())
    print(f"wrote {args.out / 'plan.json'}, {args.out / 'frontier.json'}" + ("" if args.no_plot else ", frontier.png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``zq``."""
    parser = argparse.ArgumentParser(prog="zq", description="Zero-shot quantization for PyTorch CNNs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="zero-shot vs real-data calibration on the zoo models with BatchNorm")
    demo.add_argument("--out", type=Path, default=Path("zq_out"), help="output folder (tables, cache)")
    demo.add_argument("--models", nargs="*", help=f"zoo models (default: those with BN among {zoo.available()})")
    demo.add_argument("--num-samples", type=int, default=256)
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help="ZeroQ Adam steps per batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-cache", action="store_true", help="re-synthesize even if cached data exist")
    demo.set_defaults(func=cmd_demo)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", choices=zoo.available(), help="a zoo model")
        p.add_argument("--arch", help="your model class, package.module:Class (constructed without arguments)")
        p.add_argument("--checkpoint", help="state_dict file for --arch (loaded with weights_only=True)")
        p.add_argument("--input-shape", help="one input's shape, e.g. 1,28,28 (default: the zoo's)")
        p.add_argument(
            "--input-range",
            help="the box of valid inputs synthesis clamps to, lo,hi in the model's input space, or 'none'; write "
            "--input-range=-0.81,2.02 (with '=' when lo is negative; that is pixels [0, 1] after Fashion-MNIST's "
            "normalization); default: the model's input_range attribute",
        )
        p.add_argument("--num-samples", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)

    syn = sub.add_parser("synthesize", help="write a synthetic calibration dataset file")
    add_model_args(syn)
    syn.add_argument("--method", default="zeroq")
    syn.add_argument("--batch-size", type=int, default=64)
    syn.add_argument("--option", action="append", default=[], help="method option name=value (repeatable)")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument(
        "--cache-dir",
        type=Path,
        help="keep finished batches here; a rerun resumes from them (and torchrun ranks share it)",
    )
    syn.set_defaults(func=cmd_synthesize)

    qua = sub.add_parser("quantize", help="calibrate an FX simulation (and optionally an int8 model)")
    add_model_args(qua)
    qua.add_argument(
        "--data", required=True, help="a dataset file from 'zq synthesize', 'real', 'noise', or a method to run now"
    )
    qua.add_argument("--allow-mismatch", action="store_true", help="use a dataset file made for other weights")
    qua.add_argument("--w-bits", type=int, default=8)
    qua.add_argument("--a-bits", type=int, default=8)
    qua.add_argument("--first-last-bits", type=int, default=8)
    qua.add_argument("--act-observer", default="minmax", choices=NAMES, help="activation observer (docs/observers.md)")
    qua.add_argument(
        "--weight-observer",
        default="minmax",
        choices=[n for n in NAMES if n != "histogram"],
        help="per-channel weight observer",
    )
    qua.add_argument("--evaluate", action="store_true", help="report top-1 on the Fashion-MNIST test set")
    qua.add_argument("--int8-out", type=Path, help="also write a TorchScript int8 model (W8A8 only)")
    qua.add_argument("--plan", type=Path, help="a BitPlan JSON (e.g. from 'zq plan') instead of uniform bits")
    qua.add_argument("--backend", choices=["fx", "brevitas"], default="fx", help="FX simulation or Brevitas layers")
    qua.add_argument(
        "--act-stats",
        default="max",
        choices=["max", "percentile", "mse", "zq-mse", "zq-percentile", "zq-aciq", "zq-entropy"],
        help="Brevitas activation statistic (docs/brevitas.md)",
    )
    qua.add_argument("--bias-correction", action="store_true", help="Brevitas bias correction after calibration")
    qua.add_argument("--gptq", action="store_true", help="Brevitas GPTQ after calibration")
    qua.add_argument("--onnx-out", type=Path, help="write the Brevitas model as QCDQ ONNX")
    qua.set_defaults(func=cmd_quantize)

    pla = sub.add_parser("plan", help="mixed-precision plan from data: sensitivity, Pareto frontier, plot")
    add_model_args(pla)
    pla.add_argument("--budget", required=True, help="MP4 / 4bit (size of a uniform 4-bit model), 4.5avg, 120KB")
    pla.add_argument(
        "--data", default="zeroq", help="zeroq/dsg/retro/... (synthesized now), a 'zq synthesize' file, real, noise"
    )
    pla.add_argument("--cache-dir", type=Path, help="cache of synthesized batches")
    pla.add_argument("--allow-mismatch", action="store_true", help="use a dataset file made for other weights")
    pla.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8], help="candidate weight bits")
    pla.add_argument("--a-bits", type=int, default=8, help="activation bits of every layer")
    pla.add_argument("--grid", choices=["uniform", "nonuniform"], default="uniform")
    pla.add_argument("--hybrid-threshold", type=float, help="also choose per-tensor weights within this KL")
    pla.add_argument(
        "--evaluate",
        type=nonnegative_int,
        metavar="K",
        help="measure top-1 on the Fashion-MNIST test set at K frontier points (default: 4 for zoo models, else 0)",
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


if __name__ == "__main__":
    sys.exit(main())
