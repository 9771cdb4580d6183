"""Retro-Synthesis option sweep: the target confidence, on every zoo model (plain_cnn: the BN-free path).

256 images, the default 500 steps, seed 0 (cached under ``zq_out/cache``); MinMax activations,
clamping FX simulation, full Fashion-MNIST test set. Also prints the largest logit the images
produce (real training images reach about 20).

Run: ``.venv/bin/python benchmarks/retro_defaults.py`` (about 15 minutes uncached on 2 cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.evaluation import accuracy

VARIANTS: dict[str, dict[str, Any]] = {
    "confidence 0.3": {"confidence": 0.3},
    "confidence 0.98": {"confidence": 0.98},
    "confidence 0.9999 (default)": {},
    "hard labels (confidence 1)": {"confidence": 1.0},
}


def main() -> None:
    """Print one Markdown row per model and variant."""
    x_test, y_test = datasets.load_fashion_mnist("test")
    print("| model | Retro variant | W8A8 | W4A8 | W4A4 | largest logit |")
    print("|---|---|---|---|---|---|")
    for name in ("plain_cnn", "resnet_s", "mobilenetv2_s"):
        model = zoo.load(name)
        for label, options in VARIANTS.items():
            data = synthesize(
                model,
                "retro",
                num_samples=256,
                input_shape=zoo.INPUT_SHAPE,
                progress=False,
                cache_dir=Path("zq_out/cache"),
                **options,
            )
            cells = [
                f"{accuracy(quantize_fx(model, data, w_bits=w, a_bits=a), x_test, y_test):.2f}"
                for w, a in ((8, 8), (4, 8), (4, 4))
            ]
            with torch.no_grad():
                top = float(model(data.images).max())
            print(f"| {name} | {label} | {' | '.join(cells)} | {top:.1f} |", flush=True)


if __name__ == "__main__":
    main()
