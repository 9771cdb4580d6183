"""A reconstruction carried into PT2E: ``reconstruct_fx`` vs ``reconstruct_pt2e`` on one plan and one image set.

For each zoo model and uniform plan (first and last layer at 8 bits), Genie-M (500 iterations
per unit, seed 0) reconstructs the clamping FX simulation under the plan; ``reconstruct_pt2e``
carries the same result (the reconstruction is cached, so it runs once) into a converted
torchao PT2E model. Printed: both top-1 on the 10,000 Fashion-MNIST test images, the difference,
the share of images with the same predicted class, the steps carried, and the PT2E model's
top-1 with plain MSE calibration (``quantize_pt2e``, no reconstruction) for reference.

Calibration: the demo's ZeroQ images (200 steps, seed 0; cached under ``zq_out/cache``) for a
model with BN, Retro's for ``plain_cnn`` (no BN), as in ``benchmarks/pt2e_parity.py``.

Run: ``.venv/bin/python benchmarks/pt2e_reconstruction.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from zq_plugin import datasets, reconstruct_pt2e, zoo
from zq_plugin.backends.pt2e import quantize_pt2e
from zq_plugin.mixed_precision import BitPlan
from zq_plugin.observers import pt2e as zp
from zq_plugin.reconstruct import reconstruct_fx


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i : i + 250]).argmax(1) for i in range(0, len(images), 250)])


def _top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float((pred == labels).float().mean())


def main() -> None:
    from pt2e_parity import _calibration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    parser.add_argument("--bits", nargs="+", default=["4/4", "3/3"], help="W/A pairs (default: 4/4 3/3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    x_test, y_test = datasets.load_fashion_mnist("test")
    print("| model | plan | MSE, PT2E | genie-m FX | genie-m PT2E | PT2E - FX | same class % | steps carried |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        data = _calibration(model, name)
        for pair in args.bits:
            w, a = (int(b) for b in pair.split("/"))
            plan = BitPlan.uniform(model, w_bits=w, a_bits=a)
            mse = quantize_pt2e(
                model, data, plan=plan, act_observer=zp.MSEObserver, weight_observer=zp.PerChannelMSEObserver
            )
            with tempfile.TemporaryDirectory() as cache:
                fx = reconstruct_fx(model, data, plan=plan, cache_dir=cache, progress=False)
                pt = reconstruct_pt2e(model, data, plan=plan, cache_dir=cache, progress=False)
            mse_pred, fx_pred, pt_pred = _predict(mse, x_test), _predict(fx, x_test), _predict(pt, x_test)
            mse_top1, fx_top1, pt_top1 = (
                100 * float((p == y_test).float().mean()) for p in (mse_pred, fx_pred, pt_pred)
            )
            same = 100 * float((fx_pred == pt_pred).float().mean())
            carried = f"{pt.zq_carried['weight_steps']} w, {pt.zq_carried['act_steps']} in"
            cells = (
                f"{mse_top1:.2f} | {fx_top1:.2f} | {pt_top1:.2f} | {pt_top1 - fx_top1:+.2f} | {same:.2f} | {carried}"
            )
            print(f"| {name} | W{w}A{a} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
