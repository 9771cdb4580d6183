"""Benchmark: cost of one synthesis step relative to a bare forward+backward of the frozen model.

For each model, in the same process and on the same batch:

* baseline: the model frozen (eval, parameters without grad), input with ``requires_grad``,
  ``model(x).sum().backward()`` — the least a pixel-optimization step can cost;
* zeroq step: one iteration of ZeroQ's loop (forward with BN-input hooks, BN-statistics loss,
  backward to the pixels, Adam step, plateau scheduler, clamp to the input box).

Prints the median step time of each and their ratio (goal: <= 1.10). Usage::

    python benchmarks/synth_step.py [--models resnet_s mobilenetv2_s] [--batch 64] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zq_plugin import zoo
from zq_plugin.synth.api import resolve_input_range
from zq_plugin.synth.hooks import batchnorm_layers, bn_targets, capture_inputs, frozen
from zq_plugin.synth.losses import bn_statistics_loss, stats_loss


def median_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, batch: int, repeats: int) -> tuple[float, float]:
    model = zoo.load(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *zoo.INPUT_SHAPE, generator=gen).requires_grad_(True)
    box = resolve_input_range(model, "auto")
    with frozen(model):
        def baseline() -> None:
            x.grad = None
            model(x).sum().backward()

        bns = batchnorm_layers(model)
        targets = bn_targets(bns)
        opt = torch.optim.Adam([x], lr=0.01)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100)
        zeros, ones = torch.zeros(1), torch.ones(1)
        with capture_inputs(dict(bns)) as feats:
            def zeroq_step() -> None:
                opt.zero_grad(set_to_none=True)
                model(x)
                loss = bn_statistics_loss(feats, targets, "per_sample") + stats_loss(x, zeros, ones, "per_sample")
                value = float(loss.detach())
                loss.backward()
                opt.step()
                sched.step(value)
                with torch.no_grad():
                    x.clamp_(*box)

            # interleave to share any drift in machine load
            base_t, step_t = [], []
            for _ in range(3):
                base_t.append(median_time(baseline, repeats // 3))
                step_t.append(median_time(zeroq_step, repeats // 3))
    return statistics.median(base_t), statistics.median(step_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[n for n in zoo.available() if zoo.has_batchnorm(n)])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<16}{'fwd+bwd ms':>12}{'zeroq step ms':>15}{'ratio':>8}")
    for name in args.models:
        base, step = bench(name, args.batch, args.repeats)
        print(f"{name:<16}{base * 1e3:>12.2f}{step * 1e3:>15.2f}{step / base:>8.3f}")


if __name__ == "__main__":
    main()
