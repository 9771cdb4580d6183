"""Retro-Synthesis option sweep: target confidence and the class term, on plain_cnn (no BN) and resnet_s.

256 images, 200 steps, seed 0 (cached under ``zq_out/cache``); MinMax activations, clamping FX
simulation, full Fashion-MNIST test set.

Run: ``.venv/bin/python benchmarks/retro_defaults.py`` (about 4 minutes uncached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.evaluation import accuracy

VARIANTS: dict[str, dict[str, Any]] = {
    "confidence 0.3": {"confidence": 0.3},
    "confidence 0.98 (default)": {},
    "no class term (output_weight 0)": {"output_weight": 0.0},
}


def main() -> None:
    """Print one Markdown row per model and variant."""
    x_test, y_test = datasets.load_fashion_mnist("test")
    print("| model | Retro variant | W8A8 | W4A8 | W4A4 |")
    print("|---|---|---|---|---|")
    for name in ("plain_cnn", "resnet_s"):
        model = zoo.load(name)
        for label, options in VARIANTS.items():
            data = synthesize(
                model,
                "retro",
                num_samples=256,
                input_shape=zoo.INPUT_SHAPE,
                steps=200,
                progress=False,
                cache_dir=Path("zq_out/cache"),
                **options,
            )
            cells = [
                f"{accuracy(quantize_fx(model, data, w_bits=w, a_bits=a), x_test, y_test):.2f}"
                for w, a in ((8, 8), (4, 8), (4, 4))
            ]
            print(f"| {name} | {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
