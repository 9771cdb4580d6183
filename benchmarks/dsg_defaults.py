"""DSG option sweep on the zoo: statistics granularity and the added batch term, and the margins.

256 images, 200 steps, seed 0 (cached under ``zq_out/cache``); top-1 at W8A8 and W4A4 with MinMax,
and W4A4 with the MSE observer, on the full Fashion-MNIST test set. A second table compares, for
every BN layer of resnet_s, DSG's per-sample margins (epsilon = 0.9) with the 0.9-quantile of the
per-sample deviation of 256 real training images' BN-input statistics.

Run: ``.venv/bin/python benchmarks/dsg_defaults.py`` (about 5 minutes uncached).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.demo import real_subset
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao
from zq_plugin.synth.dsg import statistic_margins
from zq_plugin.synth.hooks import batchnorm_layers, bn_targets, capture_inputs
from zq_plugin.synth.losses import feature_stats

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


def margins_vs_real(name: str = "resnet_s") -> None:
    """Print DSG's per-sample margins next to the per-sample spread of real BN-input statistics."""
    model = zoo.load(name)
    layers = batchnorm_layers(model)
    targets = bn_targets(layers)
    print(f"\n| {name} BN layer | real mean dev q90 | margin delta | real std dev q90 | margin gamma |")
    print("|---|---|---|---|---|")
    with capture_inputs(dict(layers)) as feats, torch.no_grad():
        model(real_subset(256, 0))
        for layer, feat in feats.items():
            mu, sigma = targets[layer]
            mean, std = feature_stats(feat, "per_sample")  # [N, C] each
            real_m = float((mean - mu).abs().flatten().quantile(0.9))
            real_s = float((std - sigma).abs().flatten().quantile(0.9))
            delta, gamma = statistic_margins(sigma, math.prod(feat.shape[2:]), 0.9)
            print(f"| {layer} | {real_m:.3f} | {delta:.3f} | {real_s:.3f} | {gamma:.3f} |")


if __name__ == "__main__":
    main()
    margins_vs_real()
