"""One request, one model: ``zq_plugin.quantize`` on FX, PT2E and Brevitas with the same data and seed.

For each zoo model, each request (uniform W4A4 and W3A3 with the first and last layer at 8 bits,
and a mixed plan: W4A4 with every 3x3 convolution's input at 3 bits and every other layer's at
5) and each stage (``calibrate``: MSE observers; ``reconstruct``: Genie-M, 500 iterations per
unit, seed 0; the reconstruction is cached, so it runs once per request), the request runs
through the pipeline on the three backends. Printed per row: top-1 on the 10,000 Fashion-MNIST
test images on each backend, the largest top-1 gap between backends, the largest logit
difference from the FX simulation over the test set, and how many steps each carrier carried
out of how many it has (``zq_plugin.describe``).

Calibration (the same images on every backend): 256 Fashion-MNIST training images (``--data real``,
the default: parity does not depend on where the images come from, and it saves the synthesis), or
the demo's ZeroQ images (``--data zeroq``: 200 steps, seed 0, cached under ``zq_out/cache``; Retro's
for ``plain_cnn``, which has no BN).

Run: ``.venv/bin/python benchmarks/backend_parity.py [--models ...] [--stages ...]``
(about 25 minutes on 2 cores for everything with real images).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 500]) for i in range(0, len(images), 500)])


def _mixed_plan(model: torch.nn.Module) -> object:
    from zq_plugin.mixed_precision import BitPlan

    plan = BitPlan.uniform(model, w_bits=4, a_bits=4)
    modules = dict(model.named_modules())
    ends = {name for name, b in plan.layers.items() if b.w_bits == 8}
    for name in plan.layers:
        if name in ends:
            continue
        kernel = getattr(modules[name], "kernel_size", (1,))
        plan = plan.replace_layer(name, a_bits=3 if max(kernel) >= 3 else 5)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet_s", "mobilenetv2_s", "plain_cnn"])
    parser.add_argument("--requests", nargs="+", default=["W4A4", "W3A3", "mixed"])
    parser.add_argument("--stages", nargs="+", default=["calibrate", "reconstruct"])
    parser.add_argument("--data", choices=["real", "zeroq"], default="real")
    parser.add_argument("--cache", type=Path, default=Path("zq_out/cache"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    import zq_plugin
    from zq_plugin import datasets, zoo
    from zq_plugin.demo import DEMO_STEPS, cached_synthesize, real_subset

    x_test, y_test = datasets.load_fashion_mnist("test")
    print("| model | request | stage | FX | PT2E | Brevitas | top-1 gap | max logit diff | carried PT2E / Brevitas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        if args.data == "real":
            data = real_subset(256)
        else:
            method = "zeroq" if zoo.has_batchnorm(name) else "retro"
            options = {"steps": DEMO_STEPS} if method == "zeroq" else {}
            data = cached_synthesize(model, method, args.cache, num_samples=256, seed=0, progress=False, **options)
        with tempfile.TemporaryDirectory() as recon_cache:
            for request in args.requests:
                bits = {"plan": _mixed_plan(model)} if request == "mixed" else {}
                if request != "mixed":
                    w, a = (int(c) for c in request[1:].split("A"))
                    bits = {"w_bits": w, "a_bits": a}
                for stage in args.stages:
                    top1, logits, carried = {}, {}, {}
                    for backend in ("fx", "pt2e", "brevitas"):
                        q = zq_plugin.quantize(
                            model, data=data, backend=backend, stage=stage, cache_dir=recon_cache,
                            progress=False, **bits,
                        )  # fmt: skip
                        logits[backend] = _logits(q, x_test)
                        top1[backend] = 100 * float((logits[backend].argmax(1) == y_test).float().mean())
                        report = zq_plugin.describe(q)
                        steps = [s for r in report.layers for s in (r.weight_step, r.input_step) if s != "float"]
                        carried[backend] = f"{sum(s == 'carried' for s in steps)}/{len(steps)}"
                    gap = max(top1.values()) - min(top1.values())
                    diff = max(float((logits[b] - logits["fx"]).abs().max()) for b in ("pt2e", "brevitas"))
                    cells = [name, request, stage, *(f"{top1[b]:.2f}" for b in ("fx", "pt2e", "brevitas"))]
                    cells += [f"{gap:.2f}", f"{diff:.2g}", f"{carried['pt2e']} / {carried['brevitas']}"]
                    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
