"""Measure ZeroQ's options on the zoo to choose its defaults (docs/results.md, "ZeroQ defaults").

For each zoo model with BN and each combination of statistics granularity (per-sample /
batch), initialization (ZeroQ's tiny uniform / Gaussian) and input clamp (the model's
input_range / none), synthesize ``--num-samples`` images and report W8A8 and W4A4 top-1 on the
full Fashion-MNIST test set (clamping FX simulation, MinMax activations), plus synthesis
time. Usage::

    python benchmarks/zeroq_defaults.py [--num-samples 256] [--steps 200] [--models resnet_s]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import zq_plugin
from zq_plugin import datasets, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[n for n in zoo.available() if zoo.has_batchnorm(n)])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    x_test, y_test = datasets.load_fashion_mnist("test")
    rows = []
    print("| model | statistics | init | clamp | W8A8 | W4A4 | synth s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        grid = itertools.product(("per_sample", "batch"), ("uniform", "gaussian"), (True, False))
        for statistics, init, clamp in grid:
            t = time.perf_counter()
            data = zq_plugin.synthesize(
                model, "zeroq", num_samples=args.num_samples, input_shape=zoo.INPUT_SHAPE, seed=args.seed,
                steps=args.steps, statistics=statistics, init=init, input_range="auto" if clamp else None,
                progress=False,
            )  # fmt: skip
            seconds = time.perf_counter() - t
            acc = {
                bits: zq_plugin.accuracy(zq_plugin.quantize_fx(model, data, w_bits=w, a_bits=a), x_test, y_test)
                for bits, (w, a) in {"W8A8": (8, 8), "W4A4": (4, 4)}.items()
            }
            row = dict(model=name, statistics=statistics, init=init, clamp=clamp, seconds=round(seconds, 1), **acc)
            rows.append(row)
            cells = f"{acc['W8A8']:.2f} | {acc['W4A4']:.2f} | {seconds:.0f}"
            print(f"| {name} | {statistics} | {init} | {clamp} | {cells} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
