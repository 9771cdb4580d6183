"""Where a ZeroQ synthesis step spends its time, phase by phase, against a bare forward+backward.

For each model, on one batch of 64 and the frozen model, interleaved step by step (so both
sides see the same machine speed), medians over ``--steps`` steps:

* bare: ``model(x)`` (forward) then ``.sum().backward()`` (backward);
* ZeroQ step: forward with the BN-sum hooks, the loss on the concatenated sums, its backward,
  then Adam, the plateau scheduler and the clamp (optimizer).

Also the cost of the two reductions each hook adds (``sum`` and ``vector_norm`` over H·W of every
BN input), timed alone on tensors of the same shapes. Run:
``.venv/bin/python benchmarks/synth_phases.py [--models resnet_s mobilenetv2_s] [--steps 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zq_plugin import zoo
from zq_plugin.synth.hooks import batchnorm_layers, bn_sums, bn_targets, capture_inputs, frozen
from zq_plugin.synth.losses import MomentTargets, _partial_sums, moment_distance


def phases(name: str, steps: int) -> dict[str, float]:
    model = zoo.load(name)
    bns = batchnorm_layers(model)
    targets = MomentTargets.build(bn_targets(bns), input_channels=zoo.INPUT_SHAPE[0])
    weights = targets.expand([1.0] * (len(bns) + 1))
    x = torch.randn(64, *zoo.INPUT_SHAPE).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100)
    clock = time.perf_counter
    rec: dict[str, list[float]] = {k: [] for k in ("bare fwd", "bare bwd", "fwd", "loss", "bwd", "optimizer")}
    with frozen(model):
        with capture_inputs(dict(bns)) as feats, torch.no_grad():
            model(x)
            shapes = [f.shape for f in feats.values()]
        for _ in range(steps):
            t0 = clock()
            x.grad = None
            out = model(x)
            t1 = clock()
            out.sum().backward()
            t2 = clock()
            rec["bare fwd"].append(t1 - t0)
            rec["bare bwd"].append(t2 - t1)
            with bn_sums(dict(bns)) as stats:
                t0 = clock()
                opt.zero_grad(set_to_none=True)
                model(x)
                t1 = clock()
                loss = moment_distance(*targets.collect(stats, x, "batch"), targets, weights)
                value = float(loss.detach())
                t2 = clock()
                loss.backward()
                t3 = clock()
                opt.step()
                sched.step(value)
                with torch.no_grad():
                    x.clamp_(-1.0, 2.0)
                t4 = clock()
            for key, seconds in zip(
                ("fwd", "loss", "bwd", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
            ):
                rec[key].append(seconds)
    result = {k: statistics.median(v[5:]) * 1e3 for k, v in rec.items()}
    fs = [torch.randn(s) for s in shapes]
    alone = []
    for _ in range(30):
        t0 = clock()
        for f in fs:
            _partial_sums(f)
        alone.append(clock() - t0)
    result["reductions alone"] = statistics.median(alone) * 1e3
    result["bn layers"] = float(len(fs))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet_s", "mobilenetv2_s"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    keys = ["bare fwd", "bare bwd", "fwd", "loss", "bwd", "optimizer", "reductions alone"]
    print("| model | BN layers | " + " | ".join(f"{k} ms" for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name in args.models:
        r = phases(name, args.steps)
        print(f"| {name} | {int(r['bn layers'])} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
