"""DSG option sweep on the zoo: statistics granularity and the added batch term.

256 images, 200 steps, seed 0 (cached under ``zq_out/cache``); top-1 at W8A8 and W4A4 with MinMax,
and W4A4 with the MSE observer, on the full Fashion-MNIST test set.

Run: ``.venv/bin/python benchmarks/dsg_defaults.py`` (about 5 minutes uncached).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao

VARIANTS: dict[str, dict[str, Any]] = {
    "paper: per-sample slack + LSE": {"statistics": "per_sample"},
    "per-sample slack + LSE + batch term": {"statistics": "per_sample", "batch_weight": 1.0},
    "batch slack (default)": {"statistics": "batch"},
}


def main() -> None:
    """Print one Markdown row per model and variant."""
    x_test, y_test = datasets.load_fashion_mnist("test")
    print("| model | DSG variant | W8A8 MinMax | W4A4 MinMax | W4A4 MSE | generation (s) |")
    print("|---|---|---|---|---|---|")
    for name in ("resnet_s", "mobilenetv2_s"):
        model = zoo.load(name)
        for label, options in VARIANTS.items():
            t0 = time.perf_counter()
            data = synthesize(
                model,
                "dsg",
                num_samples=256,
                input_shape=zoo.INPUT_SHAPE,
                steps=200,
                progress=False,
                cache_dir=Path("zq_out/cache"),
                **options,
            )
            seconds = time.perf_counter() - t0
            cells = []
            for w, a, obs in ((8, 8, False), (4, 4, False), (4, 4, True)):
                act, wt = (ao.MSEObserver, ao.PerChannelMSEObserver) if obs else (None, None)
                sim = quantize_fx(model, data, w_bits=w, a_bits=a, act_observer=act, weight_observer=wt)
                cells.append(f"{accuracy(sim, x_test, y_test):.2f}")
            print(f"| {name} | {label} | {' | '.join(cells)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
