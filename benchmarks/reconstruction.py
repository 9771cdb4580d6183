"""Reconstruction (``zq_plugin.reconstruct``): top-1 and time per model, method and bit width.

For each zoo model, calibration source (``--source``) and ``W/A`` pair: the clamping FX
simulation with the MinMax and the MSE observers (no reconstruction; ``--equalize`` adds the MSE
observers on the cross-layer-equalized model), then each reconstruction method; first/last layer
8-bit. Calibration: 256 images, synthetic ones made with 200 steps and seed 0 (ZeroQ: the demo's
data), cached under ``zq_out/cache``, or 256 real training images (``real``); BN-statistics
synthesizers skip a model without BN. Evaluated on the 10,000 Fashion-MNIST test images.
``--iterations`` overrides every method's steps per unit. Times are wall seconds on this
machine, for the whole call (folding, calibration and every unit).

``--brevitas`` also carries the last method's result into Brevitas layers
(``reconstruct_brevitas``, resumed from the same checkpoints), exports it to QCDQ ONNX and gives
its top-1 in PyTorch and in onnxruntime and how many test images the two agree on.

``--step-ratio`` instead times, on every unit of each model, one reconstruction step (forward
with the learned quantizers, backward, Adam) against a bare forward and backward of the same
unit in float with plain parameters, in the same process, and prints the ratio per unit and
the time per unit at the default iterations.

Run: ``.venv/bin/python benchmarks/reconstruction.py`` (about 20 minutes on 2 cores at 500
iterations); ``--step-ratio`` about 1 minute.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _models import load
from torch.fx.experimental.optimization import fuse

from zq_plugin import datasets, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.demo import DEMO_STEPS, cached_synthesize, real_subset
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao
from zq_plugin.reconstruct import engine, find_blocks
from zq_plugin.reconstruct.graph import block_module, node_values


def _bits(text: str) -> tuple[int, int]:
    w, a = text.split("/")
    return int(w), int(a)


def brevitas_cells(model, data, w_bits, a_bits, config, cache, x_test, y_test) -> list[str]:
    """The reconstruction carried into Brevitas (resumed from ``cache``), and its ONNX file in onnxruntime."""
    import tempfile

    import zq_plugin
    from zq_plugin.backends import brevitas as zb

    qmodel = zq_plugin.reconstruct_brevitas(
        model, data, w_bits=w_bits, a_bits=a_bits, config=config, cache_dir=cache, progress=False
    )
    with torch.no_grad():
        ours = torch.cat([qmodel(x) for x in x_test.split(500)]).argmax(1)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = zb.run_onnx(zb.export_onnx(qmodel, x_test[:1], Path(tmp) / "m.onnx"), x_test).argmax(1)
    top1 = 100 * float((ours == y_test).float().mean())
    onnx_top1 = 100 * float((onnx == y_test).float().mean())
    return [f"{top1:.2f}", f"{onnx_top1:.2f}", f"{100 * float((ours == onnx).float().mean()):.2f}"]


def calibration_images(model: torch.nn.Module, source: str, num_samples: int) -> torch.Tensor:
    """256 real training images, or ``source``'s synthetic images (200 steps, seed 0; cached under ``zq_out/cache``)."""
    if source == "real":
        return real_subset(num_samples)
    return cached_synthesize(
        model, source, Path("zq_out/cache"), num_samples=num_samples, seed=0, steps=DEMO_STEPS, progress=False
    ).images


def accuracy_table(args: argparse.Namespace) -> None:
    import tempfile

    from zq_plugin.preprocess import equalize
    from zq_plugin.synth import get_method

    x_test, y_test = datasets.load_fashion_mnist("test")
    extra = ["Brevitas", "ONNX (onnxruntime)", "agree %"] if args.brevitas else []
    plain = ["MinMax", "MSE", *(["MSE + CLE"] if args.equalize else [])]
    print(f"| model | data | W/A | {' | '.join([*plain, *args.methods, *extra])} |")
    print("|---|---|---|" + "---|" * (len(plain) + len(args.methods) + len(extra)))
    for name in args.models:
        model = zoo.load(name)
        equalized = equalize(model) if args.equalize else None
        for source in args.source:
            if source != "real" and get_method(source).needs_batchnorm and not zoo.has_batchnorm(name):
                continue  # a BN-statistics synthesizer on a model without BN
            t = time.perf_counter()
            data = calibration_images(model, source, args.num_samples)
            logging.getLogger(__name__).warning("%s %s data: %.0f s", name, source, time.perf_counter() - t)
            for w_bits, a_bits in args.bits:
                cells = []
                for act, wt in [(None, None), (ao.MSEObserver, ao.PerChannelMSEObserver)]:
                    sim = quantize_fx(model, data, w_bits=w_bits, a_bits=a_bits, act_observer=act, weight_observer=wt)
                    cells.append(f"{accuracy(sim, x_test, y_test):.2f}")
                if equalized is not None:
                    sim = quantize_fx(
                        equalized, data, w_bits=w_bits, a_bits=a_bits,
                        act_observer=ao.MSEObserver, weight_observer=ao.PerChannelMSEObserver,
                    )  # fmt: skip
                    cells.append(f"{accuracy(sim, x_test, y_test):.2f}")
                for method in args.methods:
                    config = engine.METHODS[method]
                    if args.iterations is not None:
                        config = dataclasses.replace(config, iterations=args.iterations)
                    t = time.perf_counter()
                    with tempfile.TemporaryDirectory() as cache:
                        sim = engine.reconstruct_fx(
                            model, data, w_bits=w_bits, a_bits=a_bits, config=config, progress=False, cache_dir=cache
                        )
                        seconds = time.perf_counter() - t
                        cells.append(f"{accuracy(sim, x_test, y_test):.2f} ({seconds:.0f} s)")
                        if args.brevitas and method == args.methods[-1]:
                            cells += brevitas_cells(model, data, w_bits, a_bits, config, cache, x_test, y_test)
                print(f"| {name} | {source} | W{w_bits}A{a_bits} | {' | '.join(cells)} |", flush=True)


def step_ratio(args: argparse.Namespace) -> None:
    """One reconstruction step vs a bare float forward+backward of the same unit, per unit, in paired rounds.

    Per unit and round: ``--steps`` bare float steps (median), then the unit reconstructed with
    ``--steps`` iterations, whose mean step the engine times itself (``step_seconds``: batch,
    masks, forward, backward, Adam; the caching of the unit's inputs and the checks excluded).
    The unit's ratio is the median over ``--rounds`` rounds of step / bare (this VM's speed
    drifts within seconds); "all steps against all float steps" weighs the units by their time.
    """
    torch.manual_seed(0)
    config = dataclasses.replace(engine.METHODS[args.methods[0]], checks=1, holdout=0.0)
    for name in args.models:
        model, shape = load(name, args.size)
        data = real_subset(256) if not name.startswith("tv:") else torch.randn(256, *shape)
        folded = fuse(copy.deepcopy(model).eval())
        sim = quantize_fx(
            folded, data, w_bits=4, a_bits=4, fold=False,
            act_observer=ao.MSEObserver, weight_observer=ao.PerChannelMSEObserver,
        )  # fmt: skip
        teacher = engine.float_teacher(sim)
        ratios, unit_seconds, float_seconds, steps_total = [], [], [], []
        for block in find_blocks(sim):
            bare = block_module(teacher, block)
            for p in bare.parameters():
                p.requires_grad_(True)
            x = node_values(teacher, block.input, [data[: config.batch_size]])[0]
            steps = args.steps

            def float_step(bare: torch.nn.Module = bare, x: torch.Tensor = x) -> float:
                t = time.perf_counter()
                bare.zero_grad(set_to_none=True)
                bare(x).pow(2).sum().backward()
                return time.perf_counter() - t

            def unit_run(
                iterations: int, block: Any = block, sim: Any = sim, data: Any = data, teacher: Any = teacher
            ) -> dict[str, float]:
                timed = dataclasses.replace(config, iterations=iterations)
                return engine.reconstruct_unit(copy.deepcopy(sim), block, data, timed, teacher=teacher)

            for _ in range(3):
                float_step()
            rounds = []
            for _ in range(args.rounds):
                bare_step = statistics.median(float_step() for _ in range(steps))
                rounds.append((unit_run(steps)["step_seconds"], bare_step))
            step_seconds = statistics.median(r[0] for r in rounds)
            bare_seconds = statistics.median(r[1] for r in rounds)
            ratios.append(statistics.median(r[0] / r[1] for r in rounds))
            once = unit_run(1)
            overhead = once["seconds"] - once["step_seconds"]  # caching the unit's inputs and the checks
            unit_seconds.append(overhead + step_seconds * config.iterations)
            float_seconds.append(bare_seconds * config.iterations)
            steps_total.append(step_seconds * config.iterations)
            print(
                f"{name} {block.name or '(residual)':24s} step {1e3 * step_seconds:6.2f} ms, "
                f"float fwd+bwd {1e3 * bare_seconds:6.2f} ms, ratio {ratios[-1]:5.2f}, "
                f"unit at {config.iterations} iterations {unit_seconds[-1]:5.1f} s",
                flush=True,
            )
        print(
            f"{name}: median ratio {statistics.median(ratios):.2f}, all steps against all float steps "
            f"{sum(steps_total) / max(sum(float_seconds), 1e-12):.2f}, {len(ratios)} units, "
            f"{sum(unit_seconds):.0f} s per model at {config.iterations} iterations",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.available()))
    parser.add_argument("--bits", nargs="*", type=_bits, default=[(4, 4), (3, 3), (2, 4), (4, 8)], metavar="W/A")
    parser.add_argument("--methods", nargs="*", default=list(engine.METHODS), choices=list(engine.METHODS))
    parser.add_argument(
        "--source", nargs="*", choices=["zeroq", "dsg", "genie", "retro", "real"], default=["zeroq"],
        help="calibration data; BN-statistics synthesizers skip models without BN",
    )  # fmt: skip
    parser.add_argument("--equalize", action="store_true", help="add an MSE column on the equalized model (CLE)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=None, help="steps per unit (default: each method's)")
    parser.add_argument(
        "--brevitas", action="store_true", help="also carry the last method's result into Brevitas and ONNX"
    )
    parser.add_argument("--step-ratio", action="store_true", help="time one step against a bare fwd+bwd")
    parser.add_argument("--steps", type=int, default=30, help="steps timed per unit and round with --step-ratio")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per unit with --step-ratio")
    parser.add_argument("--size", type=int, default=32, help="input size of tv:NAME models with --step-ratio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.step_ratio:
        step_ratio(args)
    else:
        accuracy_table(args)


if __name__ == "__main__":
    main()
