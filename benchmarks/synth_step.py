"""Benchmark: cost of one synthesis step relative to a bare forward+backward of the frozen model.

For each model, in the same process and on a batch of the same size:

* baseline: the model frozen (eval, parameters without grad), input with ``requires_grad``,
  ``model(x).sum().backward()``: the least a pixel-optimization step can cost. Each call is
  timed on its own;
* method step: the library's own loop of each method (``make_batch`` of the registry: forward
  with the BN hooks, the method's loss, backward to the pixels, Adam, plateau scheduler, clamp),
  timed step by step: the loop appends each step's loss to ``ctx.loss_log``, and a list that
  stamps the clock on every append gives the duration of each full step.

The speed of this VM drifts by up to 25 % within seconds, so the two are measured in many short
paired rounds (baseline steps, then method steps, alternating); each round gives the ratio of
the two medians, and the reported ratio is the median over rounds, with the spread (lowest and
highest round). Goal: <= 1.10 for the pixel methods. BN-only methods skip the model without BN.
Models: the zoo's by name, and torchvision architectures as ``tv:NAME`` (e.g. ``tv:resnet18``,
random weights with BN warmed on noise, built by ``tests/conformance.py`` at ``--size`` px), the
conformance matrix's rows with their in-place ops. Usage::

    python benchmarks/synth_step.py [--models ... tv:resnet18 ...] [--methods zeroq dsg retro genie]
        [--batch 64] [--steps 12] [--rounds 12] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _models import load

from zq_plugin import zoo
from zq_plugin.synth.api import resolve_input_range
from zq_plugin.synth.hooks import batchnorm_layers, frozen
from zq_plugin.synth.registry import BatchContext, get_method


class StampedLog(list):  # type: ignore[type-arg]
    """A loss log that records the clock at every append (one append per optimization step)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []

    def append(self, value: float) -> None:
        self.stamps.append(time.perf_counter())
        super().append(value)

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]


def bench(name: str, method: str, batch: int, steps: int, rounds: int, size: int) -> tuple[float, float, list[float]]:
    """Median seconds of a bare forward+backward and of one step of ``method``, and the per-round ratios."""
    model, shape = load(name, size)
    spec = get_method(method)
    box = resolve_input_range(model, "auto")
    x = torch.randn(batch, *shape).requires_grad_(True)

    def method_steps() -> list[float]:
        log = StampedLog()
        ctx = BatchContext(
            batch_size=batch,
            input_shape=shape,
            input_range=box,
            generator=torch.Generator().manual_seed(0),
            loss_log=log,
        )
        spec.make_batch(model, spec.config({"steps": steps + 2}), ctx)
        return log.durations()[1:]  # the first steps warm the allocator

    def baseline_steps() -> list[float]:
        times = []
        for _ in range(steps + 2):
            t = time.perf_counter()
            x.grad = None
            model(x).sum().backward()
            times.append(time.perf_counter() - t)
        return times[2:]

    base: list[float] = []
    step: list[float] = []
    ratios: list[float] = []
    with frozen(model):
        for _ in range(rounds):  # paired rounds: both see the same machine speed
            b, m = baseline_steps(), method_steps()
            base += b
            step += m
            ratios.append(statistics.median(m) / statistics.median(b))
    return statistics.median(base), statistics.median(step), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=zoo.available())
    parser.add_argument("--methods", nargs="*", default=["zeroq", "dsg", "retro"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--size", type=int, default=32, help="input size of tv: models")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| model | method | fwd+bwd ms | step ms | ratio (median of rounds) | lowest-highest round |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for method in args.methods:
            if get_method(method).needs_batchnorm and not batchnorm_layers(load(name, args.size)[0]):
                continue
            base, step, ratios = bench(name, method, args.batch, args.steps, args.rounds, args.size)
            print(
                f"| {name} | {method} | {base * 1e3:.2f} | {step * 1e3:.2f} | {statistics.median(ratios):.3f} | "
                f"{min(ratios):.2f}-{max(ratios):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
