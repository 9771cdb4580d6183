"""FX vs PT2E parity: one ``BitPlan`` and one calibration set through both backends.

For each zoo model and plan (uniform W8A8, W4A8 and W4A4 with the first and last layer at 8
bits, and the exact Pareto MP4 plan from ``pareto_plan``), the clamping FX simulation
(``quantize_fx(plan=plan)``) and the converted PT2E model
(``quantize_pt2e(plan=plan)``) are calibrated on the same 256 images with the same observers
(MinMax, then MSE) and evaluated on the 10,000 Fashion-MNIST test images. The last columns are
the differences PT2E - FX and the share of test images on which the two predict the same class.

Calibration: the demo's ZeroQ images (200 steps, seed 0; cached under ``zq_out/cache``) for a
model with BN, Retro's for ``plain_cnn`` (no BN). The MP4 plan is searched on the same images.

Run: ``.venv/bin/python benchmarks/pt2e_parity.py`` (about 10 minutes on 2 cores; a first run
also synthesizes the calibration sets).
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch

from zq_plugin import datasets, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.backends.pt2e import quantize_pt2e
from zq_plugin.mixed_precision import BitPlan, pareto_plan
from zq_plugin.observers import ao
from zq_plugin.observers import pt2e as zp


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Predicted classes (both results are already in eval mode)."""
    with torch.no_grad():
        return torch.cat([model(images[i : i + 250]).argmax(1) for i in range(0, len(images), 250)])


def _calibration(model: torch.nn.Module, name: str) -> torch.Tensor:
    from reconstruction import calibration_images  # the same cached sets as the reconstruction table

    return calibration_images(model, "zeroq" if zoo.has_batchnorm(name) else "retro", 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    parser.add_argument("--test-images", type=int, default=10000, help="first N test images (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    x_test, y_test = datasets.load_fashion_mnist("test")
    x_test, y_test = x_test[: args.test_images], y_test[: args.test_images]
    observers = {
        "MinMax": ((None, None), (None, None)),
        "MSE": ((ao.MSEObserver, ao.PerChannelMSEObserver), (zp.MSEObserver, zp.PerChannelMSEObserver)),
    }
    print("| model | plan | observers | FX | PT2E | PT2E - FX | same class % |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        data = _calibration(model, name)
        plans = {f"W{w}A{a}": BitPlan.uniform(model, w_bits=w, a_bits=a) for w, a in ((8, 8), (4, 8), (4, 4))}
        plans["MP4"] = pareto_plan(model, data, budget="MP4").plan
        for label, plan in plans.items():
            for obs, ((fx_act, fx_wt), (pt_act, pt_wt)) in observers.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # FX's "one observer, two bit widths" note on branches
                    fx = quantize_fx(model, data, plan=plan, act_observer=fx_act, weight_observer=fx_wt)
                pt = quantize_pt2e(model, data, plan=plan, act_observer=pt_act, weight_observer=pt_wt)
                fx_pred, pt_pred = _predict(fx, x_test), _predict(pt, x_test)
                fx_top1 = 100 * float((fx_pred == y_test).float().mean())
                pt_top1 = 100 * float((pt_pred == y_test).float().mean())
                same = 100 * float((fx_pred == pt_pred).float().mean())
                cells = f"{fx_top1:.2f} | {pt_top1:.2f} | {pt_top1 - fx_top1:+.2f} | {same:.2f}"
                print(f"| {name} | {label} | {obs} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
