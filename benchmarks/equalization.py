"""Cross-layer equalization (``zq_plugin.preprocess.equalize``) before quantization: top-1 with and without.

For each zoo model with BatchNorm: the clamping FX simulation at W4A4 (first/last layer 8-bit),
calibrated on the demo's 256 ZeroQ images (200 steps, seed 0, cached under ``zq_out/cache``),
with MinMax or MSE observers and per-channel or per-tensor weights, on the float model and on
its equalized copy (same function), evaluated on the 10,000 Fashion-MNIST test images.

Run: ``.venv/bin/python benchmarks/equalization.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from zq_plugin import _compat, datasets, zoo
from zq_plugin.backends.fx import qconfig, quantize_fx, uniform_qconfig_mapping
from zq_plugin.demo import DEMO_STEPS, cached_synthesize
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao
from zq_plugin.preprocess import equalize

OBSERVERS = {"MinMax": (_compat.MinMaxObserver, None), "MSE": (ao.MSEObserver, ao.PerChannelMSEObserver)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[n for n in zoo.available() if zoo.has_batchnorm(n)])
    parser.add_argument("--bits", type=int, nargs=2, default=[4, 4], metavar=("W", "A"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    x_test, y_test = datasets.load_fashion_mnist("test")
    w_bits, a_bits = args.bits
    print(f"| model | observers | weights | W{w_bits}A{a_bits} plain | W{w_bits}A{a_bits} equalized |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        data = cached_synthesize(model, "zeroq", Path("zq_out/cache"), num_samples=256, seed=0, steps=DEMO_STEPS)
        t = time.perf_counter()
        eq = equalize(model)
        seconds = time.perf_counter() - t
        for obs, (act, wt) in OBSERVERS.items():
            for granularity in ("per_channel", "per_tensor"):
                row = []
                for m in (model, eq):
                    mapping = uniform_qconfig_mapping(m, w_bits, a_bits, act_observer=act, weight_observer=wt)
                    if granularity == "per_tensor":
                        tensor_wt = None if wt is None else ao.MSEObserver
                        mapping.set_global(
                            qconfig(
                                w_bits,
                                a_bits,
                                act_observer=act,
                                granularity="per_tensor",
                                tensor_weight_observer=tensor_wt,
                            )
                        )
                    row.append(accuracy(quantize_fx(m, data, mapping=mapping), x_test, y_test))
                print(f"| {name} | {obs} | {granularity} | {row[0]:.2f} | {row[1]:.2f} |", flush=True)
        print(f"({name}: equalize took {seconds:.2f} s, {len(eq.zq_equalized_pairs)} pairs)")


if __name__ == "__main__":
    main()
