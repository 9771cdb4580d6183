"""Top-1 of every synthesis method at W8A8, W4A8 and W4A4, with MinMax and with the MSE observer.

For each zoo model (all by default; BN-only methods skip the model without BN): 256 images per
method (seed 0, ``--steps`` steps for the optimizing methods, cached under ``zq_out/cache``
keyed by model, method and options), real training images as the reference; the clamping FX
simulation with first/last layers at 8 bits; the full Fashion-MNIST test set. Generation time is
that of an uncached run (0 when the data came from the cache: rerun with ``--no-cache``).

Run: ``.venv/bin/python benchmarks/synthesis_methods.py --methods noise zeroq dsg``; writes
``zq_out/synthesis.json`` and ``zq_out/synthesis.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from zq_plugin import datasets, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.cli import real_subset
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao
from zq_plugin.synth import get_method, synthesize

BITS = ((8, 8), (4, 8), (4, 4))
OBSERVERS = {"MinMax": (None, None), "MSE": (ao.MSEObserver, ao.PerChannelMSEObserver)}
OPTIMIZING = {"zeroq", "dsg", "retro", "genie"}


def main() -> None:
    """Run the sweep and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("zq_out"))
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=["noise", "zeroq", "dsg"])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x_test, y_test = datasets.load_fashion_mnist("test")
    results: dict[str, Any] = {"num_samples": args.num_samples, "steps": args.steps, "models": {}}
    for name in args.models or zoo.available():
        model = zoo.load(name)
        entry: dict[str, Any] = {"fp32": accuracy(model, x_test, y_test), "sources": {}}
        sources: dict[str, Any] = {"real": (real_subset(args.num_samples, 0), 0.0)}
        for method in args.methods:
            if get_method(method).needs_batchnorm and not zoo.has_batchnorm(name):
                continue
            options = {"steps": args.steps} if method in OPTIMIZING else {}
            t0 = time.perf_counter()
            data = synthesize(
                model,
                method,
                num_samples=args.num_samples,
                input_shape=zoo.INPUT_SHAPE,
                seed=0,
                cache_dir=None if args.no_cache else args.out / "cache",
                **options,
            )
            sources[method] = (data, round(time.perf_counter() - t0, 1))
        for src, (data, seconds) in sources.items():
            row: dict[str, Any] = {"generation_s": seconds}
            for obs_name, (act, wt) in OBSERVERS.items():
                for w_bits, a_bits in BITS:
                    sim = quantize_fx(model, data, w_bits=w_bits, a_bits=a_bits, act_observer=act, weight_observer=wt)
                    row[f"W{w_bits}A{a_bits} {obs_name}"] = accuracy(sim, x_test, y_test)
            entry["sources"][src] = row
            logging.info("%s %s %s", name, src, row)
        results["models"][name] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthesis.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "synthesis.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """One row per model and source."""
    cols = [f"W{w}A{a} {o}" for o in OBSERVERS for w, a in BITS]
    lines = [
        "| model | FP32 | data | " + " | ".join(cols) + " | generation (s) |",
        "|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for name, entry in results["models"].items():
        for src, row in entry["sources"].items():
            cells = " | ".join(f"{row[c]:.2f}" for c in cols)
            lines.append(f"| {name} | {entry['fp32']:.2f} | {src} | {cells} | {row['generation_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
