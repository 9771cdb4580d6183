"""The ``zq demo`` experiment: zero-shot vs real-data calibration on the zoo, as data and a table.

The command line (``zq demo``) only prints and writes what :func:`run_demo` and
:func:`demo_markdown` return.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zq_plugin import datasets, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.data import SyntheticDataset, model_fingerprint
from zq_plugin.evaluation import accuracy
from zq_plugin.synth import synthesize

logger = logging.getLogger("zq_plugin.demo")

DEMO_BITS = ((8, 8), (4, 8), (4, 4))
# "noise" is the standard Gaussian-noise baseline (N(0, 1) pixels, as the "random data" row of
# ZeroQ's comparison); "noise_box" is the same noise clamped to the model's valid input box.
DEMO_SOURCES = ("real", "noise", "noise_box", "zeroq")
DEMO_STEPS = 200


def real_subset(num_samples: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` Fashion-MNIST training images ``[n, 1, 28, 28]``, picked by a seeded permutation."""
    images, _ = datasets.load_fashion_mnist("train")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return images[idx]


def cached_synthesize(
    model: nn.Module,
    method: str,
    cache_dir: Path | None,
    *,
    num_samples: int,
    seed: int,
    progress: bool = True,
    **options: Any,
) -> SyntheticDataset:
    """:func:`synthesize` with a file cache keyed by the model's weights, the method and its options."""
    key_src = json.dumps({"m": method, "n": num_samples, "seed": seed, **options}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    path = cache_dir / f"{method}-{model_fingerprint(model)}-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        logger.info("using cached %s data %s", method, path)
        return SyntheticDataset.load(path, model)
    data = synthesize(
        model, method, num_samples=num_samples, input_shape=zoo.INPUT_SHAPE, seed=seed, progress=progress, **options
    )
    if path is not None:
        data.save(path)
    return data


def run_demo(
    out: Path,
    models: list[str],
    num_samples: int,
    steps: int,
    seed: int,
    use_cache: bool,
) -> dict[str, Any]:
    """FP32 and W8A8/W4A8/W4A4 top-1 for each calibration source in :data:`DEMO_SOURCES`; returns the results."""
    x_test, y_test = datasets.load_fashion_mnist("test")
    real = real_subset(num_samples, seed)
    cache = out / "cache" if use_cache else None
    results: dict[str, Any] = {
        "num_samples": num_samples,
        "zeroq_steps": steps,
        "seed": seed,
        "test_images": len(x_test),
        "models": {},
    }
    for name in models:
        t0 = time.perf_counter()
        model = zoo.load(name)
        entry: dict[str, Any] = {"fp32": accuracy(model, x_test, y_test), "rows": {}}
        t_synth = time.perf_counter()
        sources: dict[str, torch.Tensor | SyntheticDataset] = {
            "real": real,
            "noise": cached_synthesize(
                model, "noise", None, num_samples=num_samples, seed=seed, progress=False, input_range=None
            ),
            "noise_box": cached_synthesize(model, "noise", None, num_samples=num_samples, seed=seed, progress=False),
            "zeroq": cached_synthesize(model, "zeroq", cache, num_samples=num_samples, seed=seed, steps=steps),
        }
        entry["synthesis_seconds"] = round(time.perf_counter() - t_synth, 1)
        for w_bits, a_bits in DEMO_BITS:
            row = {}
            for src, data in sources.items():
                sim = quantize_fx(model, data, w_bits=w_bits, a_bits=a_bits)
                row[src] = accuracy(sim, x_test, y_test)
            entry["rows"][f"W{w_bits}A{a_bits}"] = row
            logger.info("%s W%dA%d %s", name, w_bits, a_bits, {k: round(v, 2) for k, v in row.items()})
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["models"][name] = entry
    return results


def demo_markdown(results: dict[str, Any]) -> str:
    """The demo's results as a Markdown table."""
    lines = [
        f"Top-1 (%) on the {results['test_images']} Fashion-MNIST test images; "
        f"{results['num_samples']} calibration images per source, ZeroQ {results['zeroq_steps']} steps, "
        "clamping FX simulation (prepare_qat_fx + FakeQuantize), MinMax activations, per-channel weights, "
        "first/last layer 8-bit.",
        "",
        "| model | FP32 | bits | real data | Gaussian noise N(0,1) | noise in input box | ZeroQ synthetic |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["models"].items():
        for bits, row in entry["rows"].items():
            cells = " | ".join(f"{row[src]:.2f}" for src in DEMO_SOURCES)
            lines.append(f"| {name} | {entry['fp32']:.2f} | {bits} | {cells} |")
    return "\n".join(lines) + "\n"
