"""Observer cost: forward over 50 batches of 1 M elements, then ``calculate_qparams``.

Each observer's time is a ratio to torch's ``HistogramObserver`` measured in the same process on
the same batches (median of ``--repeats`` runs, observers interleaved so that machine noise
hits all alike). The batches are activations ``[64, 64, 16, 16]`` (1,048,576 values) whose range
grows over the stream (scale 1 -> 2), so range growth and re-binning are exercised; they are
post-ReLU (the common activation) or, with ``--signed``, Gaussian. Per-channel
observers see the same tensors with ``ch_axis=1`` (64 channels).

A second table gives the time of the range search alone (one ``calculate_qparams``) on an
activation and on two weight shapes.

Run: ``.venv/bin/python benchmarks/observers_speed.py [--signed]`` (under a minute on 2 cores).

``--arch resnet50 [--arch convnext_tiny ...]`` times ``zq_plugin.quantize_fx`` (W4A4) on torchvision
architectures instead (random weights, BN warmed on noise; ``tests/conformance.py`` builds them,
torchvision must be installed): each observer pair as a ratio to MinMax in the same process, and
the share of its range searches (activations per tensor, weights per channel). ``--size`` and
``--images`` set the input (default 3x64x64, 16 images); at 224 px this takes minutes per model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from zq_plugin import _compat
from zq_plugin.observers import ao


def batches(n: int, signed: bool, seed: int = 0) -> list[torch.Tensor]:
    """``n`` activation-like batches ``[64, 64, 16, 16]`` with a growing range (post-ReLU unless ``signed``)."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(64, 64, 16, 16, generator=gen) * (1 + i / n) for i in range(n)]
    return out if signed else [x.relu_() for x in out]


def run(factory: Callable[[], Any], data: list[torch.Tensor]) -> float:
    """Seconds for forward over ``data`` plus one ``calculate_qparams``."""
    obs = factory()
    t0 = time.perf_counter()
    for x in data:
        obs(x)
    obs.calculate_qparams()
    return time.perf_counter() - t0


def search_times(data: torch.Tensor, bits: int) -> None:
    """Print the time of one ``calculate_qparams`` (the range search alone) on activations and weights."""
    act = {"dtype": torch.quint8, "quant_min": 0, "quant_max": 2**bits - 1}
    wt = {
        "dtype": torch.qint8,
        "qscheme": torch.per_channel_symmetric,
        "quant_min": -(2 ** (bits - 1)) + 1,
        "quant_max": 2 ** (bits - 1) - 1,
    }
    gen = torch.Generator().manual_seed(1)
    cases = [
        ("activation [64, 64, 16, 16], per tensor", data, act, False),
        (
            "activation [64, 64, 16, 16], 64 channels",
            data,
            {**act, "qscheme": torch.per_channel_affine, "ch_axis": 1},
            True,
        ),
        ("weight [128, 64, 3, 3], per channel", torch.randn(128, 64, 3, 3, generator=gen), wt, True),
        ("weight [64, 1, 3, 3] (depthwise), per channel", torch.randn(64, 1, 3, 3, generator=gen), wt, True),
    ]
    print("\n| tensor | " + " | ".join(f"{stat} search ms" for stat in STATS) + " |")
    print("|---|" + "---|" * len(STATS))
    for label, x, kw, per_channel in cases:
        cells = []
        for stat in STATS:
            obs = ao.observer_class(stat.lower(), per_channel=per_channel)(**kw)
            obs(x)
            t0 = time.perf_counter()
            obs.calculate_qparams()
            cells.append(f"{(time.perf_counter() - t0) * 1e3:.1f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


STATS = ("MSE", "Percentile", "ACIQ", "Entropy")


def arch_times(arch: str, size: int, images: int, bits: int) -> None:
    """Print ``quantize_fx`` seconds per observer pair on a torchvision ``arch``, as ratios to MinMax."""
    import sys
    from pathlib import Path

    import zq_plugin
    from zq_plugin.observers import _core

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conformance import import_torchvision, warm_bn

    models = import_torchvision()
    torch.manual_seed(0)
    shape = (3, size, size)
    model = warm_bn(getattr(models, arch)(num_classes=10), shape)
    data = torch.randn(images, *shape, generator=torch.Generator().manual_seed(0))
    spent = {"act": 0.0, "wt": 0.0}
    original = _core.RangeObserverMixin.calculate_range

    def timed(self: Any) -> Any:
        t0 = time.perf_counter()
        out = original(self)
        spent["wt" if self.per_channel else "act"] += time.perf_counter() - t0
        return out

    _core.RangeObserverMixin.calculate_range = timed  # type: ignore[method-assign]
    pairs: dict[str, tuple[Any, Any]] = {"MinMax (torch)": (None, None)}
    for stat in STATS:
        pairs[stat] = (ao.observer_class(stat.lower()), ao.observer_class(stat.lower(), per_channel=True))
    print(f"\n{arch}, {images} images of {shape}, W{bits}A{bits}, {torch.get_num_threads()} threads")
    print("| observers | quantize_fx s | ratio to MinMax | act search s | weight search s |")
    print("|---|---|---|---|---|")
    zq_plugin.quantize_fx(model, data, w_bits=bits, a_bits=bits)  # warm-up
    base = 0.0
    for name, (act, wt) in pairs.items():
        spent.update(act=0.0, wt=0.0)
        t0 = time.perf_counter()
        zq_plugin.quantize_fx(model, data, w_bits=bits, a_bits=bits, act_observer=act, weight_observer=wt)
        sec = time.perf_counter() - t0
        base = base or sec
        print(f"| {name} | {sec:.2f} | {sec / base:.1f} | {spent['act']:.2f} | {spent['wt']:.2f} |")
    _core.RangeObserverMixin.calculate_range = original  # type: ignore[method-assign]


def main() -> None:
    """Print the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="torchvision architecture(s): time quantize_fx instead")
    parser.add_argument("--size", type=int, default=64, help="input height/width with --arch")
    parser.add_argument("--images", type=int, default=16, help="calibration images with --arch")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--signed", action="store_true", help="Gaussian batches instead of post-ReLU ones")
    args = parser.parse_args()
    if args.arch:
        for arch in args.arch:
            arch_times(arch, args.size, args.images, args.bits)
        return
    torch.manual_seed(0)
    data = batches(args.batches, args.signed)
    kw = {"dtype": torch.quint8, "quant_min": 0, "quant_max": 2**args.bits - 1}
    pc = {**kw, "qscheme": torch.per_channel_affine, "ch_axis": 1}
    observers: dict[str, Callable[[], Any]] = {
        "HistogramObserver (torch, baseline)": lambda: _compat.HistogramObserver(**kw),
        "MinMaxObserver (torch)": lambda: _compat.MinMaxObserver(**kw),
        "MSEObserver": lambda: ao.MSEObserver(**kw),
        "MSEObserver p=2.4": lambda: ao.MSEObserver(p=2.4, **kw),
        "PercentileObserver": lambda: ao.PercentileObserver(**kw),
        "ACIQObserver": lambda: ao.ACIQObserver(**kw),
        "EntropyObserver": lambda: ao.EntropyObserver(**kw),
        "PerChannelMSEObserver (64 ch)": lambda: ao.PerChannelMSEObserver(**pc),
        "PerChannelPercentileObserver (64 ch)": lambda: ao.PerChannelPercentileObserver(**pc),
        "PerChannelACIQObserver (64 ch)": lambda: ao.PerChannelACIQObserver(**pc),
        "PerChannelEntropyObserver (64 ch)": lambda: ao.PerChannelEntropyObserver(**pc),
    }
    for factory in observers.values():  # warm-up
        run(factory, data[:2])
    times: dict[str, list[float]] = {name: [] for name in observers}
    for _ in range(args.repeats):
        for name, factory in observers.items():
            times[name].append(run(factory, data))
    base = statistics.median(times["HistogramObserver (torch, baseline)"])
    kind = "signed (Gaussian)" if args.signed else "post-ReLU"
    print(
        f"{args.batches} {kind} batches of {data[0].numel():,} values, {args.bits}-bit, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; baseline {base:.2f} s"
    )
    print("| observer | seconds | ratio to HistogramObserver |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / base:.2f} |")
    search_times(data[-1], args.bits)


if __name__ == "__main__":
    main()
