"""Low bits through ``zq_plugin.quantize``: zero data against real images, per model and bit width (issue 30).

For each zoo model (default: ``mobilenetv3_s``, ``mobilenetv2_s``, ``resnet_s``) and each
``W/A`` pair (default W4A4, W3A3, W2A4; first and last layer at 8 bits), the recipe's defaults
run twice through the one pipeline, differing only in the calibration images:

* **zero data**: ``zq_plugin.quantize(model, w_bits=w, a_bits=a)``'s own images (ZeroQ, 256,
  seed 0, the model's input box), made once per model and cached under ``--cache``;
* **real**: 256 Fashion-MNIST training images (``zq_plugin.demo.real_subset``, seed 0),
  ``zq_plugin.quantize(model, data=real, ...)``.

``--budget`` replaces the uniform bits by ``budget="WxAy"`` (:func:`zq_plugin.mixed_precision.bops_plan`:
the same bit operations, spent per layer where the sensitivities say they pay).

Everything else is the default recipe (MSE observers, Genie-M at its default iterations, the
FX simulation; ``--stage calibrate`` skips reconstruction). Printed: FP32 top-1, each top-1
on the 10,000 test images, zero data minus FP32 and minus real, and the wall seconds of the
zero-data recipe (synthesis once per model, then each bit width's calibration and
reconstruction) on this machine.

``--seed`` sets the synthesis seed, the real images' draw and the reconstruction seed together;
``--num-samples`` the number of images of both columns; ``--iterations`` and ``--schedule``
replace the reconstruction's :class:`zq_plugin.ReconstructConfig` fields (defaults: the
config's own).

Run: ``.venv/bin/python benchmarks/low_bits.py`` (about 30 minutes per model on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import warnings
from pathlib import Path


def _bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_s", "mobilenetv2_s", "resnet_s"])
    parser.add_argument("--bits", nargs="+", type=_bits, default=[(4, 4), (3, 3), (2, 4)], metavar="WxAy")
    parser.add_argument("--stage", choices=["reconstruct", "calibrate"], default="reconstruct")
    parser.add_argument("--cache", type=Path, default=Path("zq_out/cache"))
    parser.add_argument("--no-real", action="store_true", help="skip the real-image column")
    parser.add_argument(
        "--budget", action="store_true", help="spend each W/A pair's bit operations with bops_plan (budget=) instead"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthesis, real-image draw and reconstruction seed")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration images (default: the recipe's)")
    parser.add_argument("--iterations", type=int, default=None, help="reconstruction iterations per unit")
    parser.add_argument("--schedule", choices=["uniform", "error"], default=None, help="reconstruction schedule")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    import zq_plugin
    from zq_plugin import datasets, zoo
    from zq_plugin.demo import cached_synthesize, real_subset
    from zq_plugin.recipe import BEST_NUM_SAMPLES, BEST_SYNTHESIZER

    num_samples = args.num_samples or BEST_NUM_SAMPLES
    config = zq_plugin.ReconstructConfig()
    changes = {k: v for k, v in (("iterations", args.iterations), ("schedule", args.schedule)) if v is not None}
    config = dataclasses.replace(config, **changes)
    x_test, y_test = datasets.load_fashion_mnist("test")
    real = real_subset(num_samples, seed=args.seed)
    plan = "bops_plan at each pair's bit operations" if args.budget else "uniform bits"
    print(f"stage: {args.stage}; {plan}; zero data: {BEST_SYNTHESIZER}, {num_samples} images, seed {args.seed}; "
          f"reconstruction: {config.iterations} iterations per unit, schedule {config.schedule}")  # fmt: skip
    print("| model | FP32 | bits | zero data | real | zero − FP32 | zero − real | zero-data seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        fp32 = zq_plugin.accuracy(model, x_test, y_test)
        started = time.perf_counter()
        data = cached_synthesize(model, BEST_SYNTHESIZER, args.cache, num_samples=num_samples, seed=args.seed,
                                 progress=False, input_range=model.input_range)  # fmt: skip
        synth_seconds = time.perf_counter() - started
        print(f"| {name} | {fp32:.2f} | synthesis | | | | | {synth_seconds:.0f} |", flush=True)
        for w_bits, a_bits in args.bits:
            started = time.perf_counter()
            bits: dict[str, object] = (
                {"budget": f"W{w_bits}A{a_bits}"} if args.budget else {"w_bits": w_bits, "a_bits": a_bits}
            )
            bits["seed"] = args.seed
            if args.stage == "reconstruct":  # quantize refuses config= with a stage that does not use it
                bits["config"] = config
            zero = zq_plugin.quantize(model, data=data, stage=args.stage, progress=False, **bits)
            seconds = time.perf_counter() - started
            zero_top1 = zq_plugin.accuracy(zero, x_test, y_test)
            cells = [f"{zero_top1:.2f}", "", f"{zero_top1 - fp32:+.2f}", ""]
            if not args.no_real:
                qreal = zq_plugin.quantize(model, data=real, stage=args.stage, progress=False, **bits)
                real_top1 = zq_plugin.accuracy(qreal, x_test, y_test)
                cells[1], cells[3] = f"{real_top1:.2f}", f"{zero_top1 - real_top1:+.2f}"
            print(f"| {name} | {fp32:.2f} | W{w_bits}A{a_bits} | {' | '.join(cells)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
