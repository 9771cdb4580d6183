"""Why zero-shot images fall behind real ones on a net: each quantized input's range, zero data against real.

For one zoo model and one ``W/A`` pair (first/last layer 8-bit), the clamping FX simulation is
calibrated twice with the same MSE observers, once on the recipe's synthetic images (ZeroQ,
256, seed 0, cached under ``--cache``) and once on 256 real training images; the weights are the
same (their steps depend on the weights only). Then, per weight layer:

* the input step from zero data over the one from real data (> 1: the synthetic range is wider);
* the 99.99th percentile of the layer's input on each image set (float model);
* the producer of the input (the op the quantizer reads: ``hardswish``, ``mul`` of a
  squeeze-excite gate, ``add`` of a residual, ...);
* the top-1 gained on the 10,000 test images when only that layer's input step is replaced by
  the real-data one in the zero-data simulation.

Printed as a table, worst first, with both simulations' top-1. This is calibration only (no
reconstruction): it isolates what the images change, the ranges.

Run: ``.venv/bin/python benchmarks/data_gap.py --model mobilenetv3_s --bits W4A4`` (about 4 minutes with one thread).
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from pathlib import Path

import torch

VIEWS = ("flatten", "reshape", "view")


def _bits(text: str) -> tuple[int, int]:
    w, a = text.upper().lstrip("W").split("A")
    return int(w), int(a)


def _producer(node: torch.fx.Node, sim: torch.fx.GraphModule) -> str:
    """The op in front of a layer's input quantizer, by its short name."""
    source = node.args[0] if node.args else None
    while isinstance(source, torch.fx.Node):
        if source.op == "call_module":
            module = sim.get_submodule(str(source.target))
            if "FakeQuantize" in type(module).__name__:
                source = source.args[0]
                continue
            return type(module).__name__
        if source.op in ("call_function", "call_method"):
            name = getattr(source.target, "__name__", str(source.target))
            if name in VIEWS:
                source = source.args[0]
                continue
            return name
        return source.op
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_s")
    parser.add_argument("--bits", type=_bits, default=(4, 4), metavar="WxAy")
    parser.add_argument("--cache", type=Path, default=Path("zq_out/cache"))
    parser.add_argument("--observer", default="mse")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    import zq_plugin
    from zq_plugin import datasets, zoo
    from zq_plugin.backends.fx.sim import input_fake_quant, weight_nodes
    from zq_plugin.demo import cached_synthesize, real_subset
    from zq_plugin.observers.ao import observer_class
    from zq_plugin.recipe import BEST_NUM_SAMPLES, BEST_SYNTHESIZER
    from zq_plugin.reconstruct.engine import float_teacher
    from zq_plugin.reconstruct.graph import node_values

    x_test, y_test = datasets.load_fashion_mnist("test")
    model = zoo.load(args.model)
    zero = cached_synthesize(model, BEST_SYNTHESIZER, args.cache, num_samples=BEST_NUM_SAMPLES, seed=0,
                             progress=False, input_range=model.input_range).images  # fmt: skip
    real = real_subset(256)
    w_bits, a_bits = args.bits
    observers = {
        "act_observer": observer_class(args.observer),
        "weight_observer": observer_class(args.observer, per_channel=True),
    }
    sims = {
        source: zq_plugin.quantize_fx(model, images, w_bits=w_bits, a_bits=a_bits, fold=False, **observers)
        for source, images in (("zero", zero), ("real", real))
    }
    top1 = {source: zq_plugin.accuracy(sim, x_test, y_test) for source, sim in sims.items()}
    fp32 = zq_plugin.accuracy(model, x_test, y_test)

    def quantizers(sim: torch.fx.GraphModule) -> dict[str, tuple[torch.fx.Node, torch.nn.Module]]:
        modules = dict(sim.named_modules())
        out = {}
        for name, node in weight_nodes(sim):
            fq = input_fake_quant(node, sim, modules)
            if fq is not None and name not in out:
                out[name] = (node, fq)
        return out

    zero_q, real_q = quantizers(sims["zero"]), quantizers(sims["real"])
    teacher = float_teacher(sims["real"])
    fake_quants = {name for name, m in sims["zero"].named_modules() if "FakeQuantize" in type(m).__name__}
    rows = []
    for name, (node, fq) in zero_q.items():
        real_fq = real_q[name][1]
        ratio = float(fq.scale.reshape(-1)[0] / real_fq.scale.reshape(-1)[0])
        source = node.args[0]  # walk back past the input quantizer (and flatten-like views) to the float value
        while isinstance(source, torch.fx.Node) and (
            str(source.target) in fake_quants or getattr(source.target, "__name__", source.target) in VIEWS
        ):
            source = source.args[0]
        tails = []
        for images in (zero, real):
            with torch.no_grad():
                value = torch.cat(node_values(teacher, str(source), list(images.split(64))))
            tails.append(float(torch.quantile(value.flatten().abs()[::7].float(), 0.9999)))
        trial = copy.deepcopy(sims["zero"])
        trial_fq = quantizers(trial)[name][1]
        with torch.no_grad():
            trial_fq.scale.copy_(real_fq.scale)
            trial_fq.zero_point.copy_(real_fq.zero_point)
        gain = zq_plugin.accuracy(trial, x_test, y_test) - top1["zero"]
        rows.append((gain, name, _producer(node, sims["zero"]), ratio, tails[0], tails[1]))
    print(f"{args.model} W{w_bits}A{a_bits}, {args.observer} observers, calibration only: FP32 {fp32:.2f}, "
          f"zero data {top1['zero']:.2f}, real {top1['real']:.2f}")  # fmt: skip
    print("| layer | input from | zero step / real step | |x| p99.99 zero | real | top-1 gained with the real step |")
    print("|---|---|---|---|---|---|")
    for gain, name, producer, ratio, zt, rt in sorted(rows, reverse=True):
        print(f"| {name} | {producer} | {ratio:.2f} | {zt:.3g} | {rt:.3g} | {gain:+.2f} |")


if __name__ == "__main__":
    main()
