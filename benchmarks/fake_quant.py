"""Benchmark: FastFakeQuantize's inference path vs torch's FakeQuantize, same process, same tensor.

Prints the median time of each on an activation-sized tensor and the speed ratio (torch / ours).
Usage::

    python benchmarks/fake_quant.py [--shape 250 64 7 7] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.ao.quantization import FakeQuantize, MinMaxObserver

from zq_plugin.fake_quant import FastFakeQuantize


def median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[250, 64, 7, 7])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    x = torch.randn(*args.shape).relu_()
    kw = {"observer": MinMaxObserver, "quant_min": 0, "quant_max": 15, "dtype": torch.quint8}
    ref, fast = FakeQuantize(**kw), FastFakeQuantize(**kw)
    ref(x), fast(x)
    ref.disable_observer(), fast.disable_observer()
    with torch.no_grad():
        assert torch.equal(ref(x), fast(x))
    t_ref, t_fast = median_ms(ref, x, args.repeats), median_ms(fast, x, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {tuple(args.shape)}")
    print(f"FakeQuantize {t_ref:.3f} ms, FastFakeQuantize {t_fast:.3f} ms, speed-up {t_ref / t_fast:.2f}x")


if __name__ == "__main__":
    main()
