"""Top-1 of every synthesis method at W8A8, W4A8 and W4A4, with MinMax and with the MSE observer.

For each zoo model (all by default; BN-only methods skip the model without BN): 256 images per
method (``--seed``, each method's default number of steps unless ``--steps`` is given, cached
under ``zq_out/cache`` keyed by model, method, options and the method's code), real training
images as the reference; the clamping FX simulation with first/last layers at 8 bits; the full
Fashion-MNIST test set. MSE is the best observer of the observers work (docs/results.md,
"Observers").

Generation time is that of an uncached run. Results are merged into ``zq_out/synthesis.json``
after every source, so runs can be split (``--methods genie`` after the pixel methods) or
resumed; a source served from the cache keeps the time recorded when it was generated.

Run: ``.venv/bin/python benchmarks/synthesis_methods.py --methods noise zeroq dsg retro genie``;
writes ``zq_out/synthesis.json`` and ``zq_out/synthesis.md``.
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
from zq_plugin.demo import real_subset
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
    parser.add_argument("--steps", type=int, default=None, help="override every method's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x_test, y_test = datasets.load_fashion_mnist("test")
    suffix = "" if args.seed == 0 else f"-seed{args.seed}"
    path = args.out / f"synthesis{suffix}.json"
    setting = {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed}
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if {k: results.get(k) for k in setting} != setting:
        results = {**setting, "models": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models or zoo.available():
        model = zoo.load(name)
        entry = results["models"].setdefault(name, {"fp32": accuracy(model, x_test, y_test), "sources": {}})
        sources = ["real", *(m for m in args.methods if zoo.has_batchnorm(name) or not get_method(m).needs_batchnorm)]
        for src in sources:
            t0 = time.perf_counter()
            if src == "real":
                data: Any = real_subset(args.num_samples, args.seed)
            else:
                options = {"steps": args.steps} if args.steps and src in OPTIMIZING else {}
                data = synthesize(
                    model,
                    src,
                    num_samples=args.num_samples,
                    input_shape=zoo.INPUT_SHAPE,
                    seed=args.seed,
                    cache_dir=None if args.no_cache else args.out / "cache",
                    **options,
                )
            seconds = round(time.perf_counter() - t0, 1)
            previous = entry["sources"].get(src, {}).get("generation_s", 0.0)
            row: dict[str, Any] = {"generation_s": seconds if seconds >= 1.0 or src == "real" else previous or seconds}
            for obs_name, (act, wt) in OBSERVERS.items():
                for w_bits, a_bits in BITS:
                    sim = quantize_fx(model, data, w_bits=w_bits, a_bits=a_bits, act_observer=act, weight_observer=wt)
                    row[f"W{w_bits}A{a_bits} {obs_name}"] = accuracy(sim, x_test, y_test)
            entry["sources"][src] = row
            logging.info("%s %s %s", name, src, row)
            path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"synthesis{suffix}.md").write_text(markdown(results))
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
            seconds = "–" if src == "real" else f"{row['generation_s']:.0f}"
            lines.append(f"| {name} | {entry['fp32']:.2f} | {src} | {cells} | {seconds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
