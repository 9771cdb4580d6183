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


def main() -> None:
    """Print the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--signed", action="store_true", help="Gaussian batches instead of post-ReLU ones")
    args = parser.parse_args()
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
