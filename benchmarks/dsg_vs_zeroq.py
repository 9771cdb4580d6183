"""DSG against ZeroQ over several seeds: W4A4 top-1 with MinMax and with the MSE observer.

One calibration set of 256 images per (model, method, seed), each method at its default
number of steps (cached under ``zq_out/cache``); the clamping FX simulation with first/last
layers at 8 bits; the full Fashion-MNIST test set. Prints each seed's figures and the mean and
standard deviation per model and method: a single seed moves W4A4 top-1 by up to a few points
on the depthwise model, so "DSG beats ZeroQ" is only claimed on the mean.

Run: ``.venv/bin/python benchmarks/dsg_vs_zeroq.py [--seeds 0 1 2] [--variants zeroq dsg dsg+sci]``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "zeroq": ("zeroq", {}),
    "dsg": ("dsg", {}),
    "dsg+sci": ("dsg", {"sci_weight": 0.1}),
    "dsg per-sample+batch": ("dsg", {"statistics": "per_sample", "batch_weight": 1.0}),
}
COLUMNS = {"W4A4 MinMax": (None, None), "W4A4 MSE": (ao.MSEObserver, ao.PerChannelMSEObserver)}


def main() -> None:
    """Print per-seed rows and a mean +- std summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet_s", "mobilenetv2_s"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=["zeroq", "dsg"], choices=list(VARIANTS))
    args = parser.parse_args()
    x_test, y_test = datasets.load_fashion_mnist("test")
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    print("| model | method | seed | " + " | ".join(COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for name in args.models:
        model = zoo.load(name)
        for variant in args.variants:
            method, options = VARIANTS[variant]
            for seed in args.seeds:
                data = synthesize(
                    model,
                    method,
                    num_samples=256,
                    input_shape=zoo.INPUT_SHAPE,
                    seed=seed,
                    progress=False,
                    cache_dir=Path("zq_out/cache"),
                    **options,
                )
                cells = []
                for column, (act, wt) in COLUMNS.items():
                    sim = quantize_fx(model, data, w_bits=4, a_bits=4, act_observer=act, weight_observer=wt)
                    top1 = accuracy(sim, x_test, y_test)
                    scores.setdefault((name, variant), {}).setdefault(column, []).append(top1)
                    cells.append(f"{top1:.2f}")
                print(f"| {name} | {variant} | {seed} | {' | '.join(cells)} |", flush=True)
    print(f"\nMean +- std over seeds {args.seeds}:\n")
    print("| model | method | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for (name, variant), cols in scores.items():
        cells = [f"{statistics.mean(v):.2f} ± {statistics.pstdev(v):.2f}" for v in cols.values()]
        print(f"| {name} | {variant} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
