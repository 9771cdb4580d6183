"""Benchmark: cost of one synthesis step relative to a bare forward+backward of the frozen model.

For each model, in the same process and on a batch of the same size:

* baseline: the model frozen (eval, parameters without grad), input with ``requires_grad``,
  ``model(x).sum().backward()``: the least a pixel-optimization step can cost;
* method step: the library's own loop of each method (``make_batch`` of the registry: forward
  with BN-input hooks, the method's loss, backward to the pixels, Adam, plateau scheduler,
  clamp). Its per-step time is ``(t(2k steps) - t(k steps)) / k``, which cancels the one-off
  setup (targets, margins, initialization, hooks).

Prints the median time of each and their ratio (goal: <= 1.10 for the pixel methods). BN-only
methods skip the model without BN. Usage::

    python benchmarks/synth_step.py [--models ...] [--methods zeroq dsg retro] [--batch 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zq_plugin import zoo
from zq_plugin.synth.api import resolve_input_range
from zq_plugin.synth.hooks import frozen
from zq_plugin.synth.registry import BatchContext, get_method


def bench(name: str, method: str, batch: int, steps: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of a bare forward+backward and of one step of ``method``."""
    model = zoo.load(name)
    spec = get_method(method)
    box = resolve_input_range(model, "auto")
    x = torch.randn(batch, *zoo.INPUT_SHAPE).requires_grad_(True)

    def method_run(n: int) -> float:
        ctx = BatchContext(
            batch_size=batch, input_shape=zoo.INPUT_SHAPE, input_range=box, generator=torch.Generator().manual_seed(0)
        )
        t = time.perf_counter()
        spec.make_batch(model, spec.config({"steps": n}), ctx)
        return time.perf_counter() - t

    def baseline_run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            x.grad = None
            model(x).sum().backward()
        return time.perf_counter() - t

    with frozen(model):
        baseline_run(3)
        method_run(3)
        base, step = [], []
        for _ in range(repeats):  # interleaved, to share any drift in machine load
            base.append(baseline_run(steps) / steps)
            step.append((method_run(2 * steps) - method_run(steps)) / steps)
    return statistics.median(base), statistics.median(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=zoo.available())
    parser.add_argument("--methods", nargs="*", default=["zeroq", "dsg", "retro"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| model | method | fwd+bwd ms | step ms | ratio |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for method in args.methods:
            if get_method(method).needs_batchnorm and not zoo.has_batchnorm(name):
                continue
            base, step = bench(name, method, args.batch, args.steps)
            print(f"| {name} | {method} | {base * 1e3:.2f} | {step * 1e3:.2f} | {step / base:.3f} |", flush=True)


if __name__ == "__main__":
    main()
