"""Benchmark: cost of one synthesis step relative to a bare forward+backward of the frozen model.

For each model, in the same process and on a batch of the same size:

* baseline: the model frozen (eval, parameters without grad), input with ``requires_grad``,
  ``model(x).sum().backward()``: the least a pixel-optimization step can cost;
* zeroq step: the library's own ZeroQ loop (``zq_plugin.synth.zeroq.make_zeroq``: forward
  with BN-input hooks, BN-statistics loss, backward to the pixels, Adam, plateau scheduler,
  clamp). Its per-step time is ``(t(2k steps) - t(k steps)) / k``, which cancels the one-off
  setup (targets, initialization, hooks).

Prints the median time of each and their ratio (goal: <= 1.10). Usage::

    python benchmarks/synth_step.py [--models resnet_s mobilenetv2_s] [--batch 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zq_plugin import zoo
from zq_plugin.synth.api import resolve_input_range
from zq_plugin.synth.hooks import frozen
from zq_plugin.synth.registry import BatchContext
from zq_plugin.synth.zeroq import ZeroQConfig, make_zeroq


def bench(name: str, batch: int, steps: int, repeats: int = 3) -> tuple[float, float]:
    model = zoo.load(name)
    box = resolve_input_range(model, "auto")
    x = torch.randn(batch, *zoo.INPUT_SHAPE).requires_grad_(True)

    def zeroq_run(n: int) -> float:
        ctx = BatchContext(
            batch_size=batch, input_shape=zoo.INPUT_SHAPE, input_range=box, generator=torch.Generator().manual_seed(0)
        )
        t = time.perf_counter()
        make_zeroq(model, ZeroQConfig(steps=n), ctx)
        return time.perf_counter() - t

    def baseline_run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            x.grad = None
            model(x).sum().backward()
        return time.perf_counter() - t

    with frozen(model):
        baseline_run(3)
        zeroq_run(3)
        base, step = [], []
        for _ in range(repeats):  # interleaved, to share any drift in machine load
            base.append(baseline_run(steps) / steps)
            step.append((zeroq_run(2 * steps) - zeroq_run(steps)) / steps)
    return statistics.median(base), statistics.median(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[n for n in zoo.available() if zoo.has_batchnorm(n)])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<16}{'fwd+bwd ms':>12}{'zeroq step ms':>15}{'ratio':>8}")
    for name in args.models:
        base, step = bench(name, args.batch, args.steps)
        print(f"{name:<16}{base * 1e3:>12.2f}{step * 1e3:>15.2f}{step / base:>8.3f}")


if __name__ == "__main__":
    main()
