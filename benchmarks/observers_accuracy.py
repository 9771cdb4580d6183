"""Top-1 of every activation observer at W4A8 and W4A4, on ZeroQ synthetic and on real calibration data.

For each zoo model with BatchNorm: the clamping FX simulation (``quantize_fx``), first/last layer
8-bit, 256 calibration images (ZeroQ, 200 steps, seed 0: the demo's data, cached under
``zq_out/cache``; or 256 real training images), evaluated on the 10,000 Fashion-MNIST test
images. Weights are per-channel symmetric; "act" rows keep torch's PerChannelMinMaxObserver for
weights so that only the activation observer changes, "act+wt" rows use the per-channel
version of the same statistic for the weights too.

Run: ``.venv/bin/python benchmarks/observers_accuracy.py`` (about 6 minutes on 2 cores);
writes ``zq_out/observers.json`` and ``zq_out/observers.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from zq_plugin import _compat, datasets, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.demo import DEMO_STEPS, cached_synthesize, real_subset
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao

OBSERVERS: dict[str, tuple[Any, Any]] = {
    "MinMax (torch)": (_compat.MinMaxObserver, None),
    "Histogram (torch)": (_compat.HistogramObserver, None),
    "MSE": (ao.MSEObserver, ao.PerChannelMSEObserver),
    "Lp p=2.4": (ao.MSEObserver.with_args(p=2.4), ao.PerChannelMSEObserver.with_args(p=2.4)),
    "Percentile 99.99": (ao.PercentileObserver, ao.PerChannelPercentileObserver),
    "ACIQ Laplace": (ao.ACIQObserver, ao.PerChannelACIQObserver),
    "Entropy (KL)": (ao.EntropyObserver, ao.PerChannelEntropyObserver),
}
BITS = ((4, 8), (4, 4))


def main() -> None:
    """Run the sweep and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("zq_out"))
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--num-samples", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x_test, y_test = datasets.load_fashion_mnist("test")
    models = args.models or [n for n in zoo.available() if zoo.has_batchnorm(n)]
    results: dict[str, Any] = {"num_samples": args.num_samples, "zeroq_steps": DEMO_STEPS, "models": {}}
    for name in models:
        model = zoo.load(name)
        sources = {
            "zeroq": cached_synthesize(
                model, "zeroq", args.out / "cache", num_samples=args.num_samples, seed=0, steps=DEMO_STEPS
            ),
            "real": real_subset(args.num_samples, 0),
        }
        entry: dict[str, Any] = {"fp32": accuracy(model, x_test, y_test), "rows": []}
        for obs_name, (act, wt) in OBSERVERS.items():
            for scope in ("act", "act+wt") if wt is not None else ("act",):
                for w_bits, a_bits in BITS:
                    row: dict[str, Any] = {"observer": obs_name, "scope": scope, "bits": f"W{w_bits}A{a_bits}"}
                    for src, data in sources.items():
                        t0 = time.perf_counter()
                        sim = quantize_fx(
                            model,
                            data,
                            w_bits=w_bits,
                            a_bits=a_bits,
                            act_observer=act,
                            weight_observer=wt if scope == "act+wt" else None,
                        )
                        row[f"{src}_calibration_s"] = round(time.perf_counter() - t0, 2)
                        row[src] = accuracy(sim, x_test, y_test)
                    entry["rows"].append(row)
                    logging.info("%s %s %s %s", name, obs_name, scope, row)
        results["models"][name] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "observers.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "observers.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """One table per bit width: rows observer/scope, columns model x data source."""
    models = list(results["models"])
    lines = []
    for bits in (f"W{w}A{a}" for w, a in BITS):
        head = " | ".join(f"{m} ZeroQ | {m} real" for m in models)
        lines += [f"**{bits}**", "", f"| observer | applied to | {head} |", "|---|---|" + "---|" * (2 * len(models))]
        keys = [(r["observer"], r["scope"]) for r in results["models"][models[0]]["rows"] if r["bits"] == bits]
        for obs, scope in keys:
            cells = []
            for m in models:
                row = next(
                    r
                    for r in results["models"][m]["rows"]
                    if r["bits"] == bits and r["observer"] == obs and r["scope"] == scope
                )
                cells += [f"{row['zeroq']:.2f}", f"{row['real']:.2f}"]
            lines.append(f"| {obs} | {scope} | " + " | ".join(cells) + " |")
        lines.append("")
    fp32 = ", ".join(f"{m} {e['fp32']:.2f}" for m, e in results["models"].items())
    lines.append(f"FP32: {fp32}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
