"""Brevitas backend against the FX backend, with bias correction, GPTQ and the ONNX export checked in onnxruntime.

For each zoo model with BN and each plan (uniform W8A8, W4A8, W4A4 with the first and last
layer 8-bit, and the mixed-precision plan at the size of a uniform 4-bit model with A8,
``pareto_plan(..., bits=2..8)``), the same 256 ZeroQ images (seed 0, cached) calibrate:

* the FX clamping simulation (``quantize_fx``, MinMax activations, per-channel weights; the
  mixed plan through ``to_qconfig_mapping``);
* the Brevitas model (``to_brevitas`` + ``calibrate``, ``act_stats="max"``), then the same after
  ``bias_correct``, and a fresh one after ``gptq`` + ``bias_correct``.

Top-1 on the full Fashion-MNIST test set. The bias-corrected Brevitas model is exported to
QCDQ ONNX and run in onnxruntime: top-1 and the SQNR of its logits against Brevitas's.

Run: ``.venv/bin/python benchmarks/brevitas_backend.py [--models ...]`` (writes
``zq_out/brevitas.json`` and ``.md``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends import brevitas as zb
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.backends.fx_plan import to_qconfig_mapping
from zq_plugin.evaluation import accuracy
from zq_plugin.mixed_precision import BitPlan, pareto_plan

OUT = Path("zq_out")
BITS = ((8, 8), (4, 8), (4, 4))


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[n for n in zoo.available() if zoo.has_batchnorm(n)])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    x_test, y_test = datasets.load_fashion_mnist("test")
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model = zoo.load(name)
        data = synthesize(
            model, "zeroq", num_samples=256, input_shape=zoo.INPUT_SHAPE, seed=0, progress=False,
            cache_dir=OUT / "cache",
        )  # fmt: skip
        mixed = pareto_plan(model, data, budget="MP4", bits=range(2, 9), progress=False).plan
        plans = {f"W{w}A{a}": BitPlan.uniform(model, w_bits=w, a_bits=a) for w, a in BITS}
        plans["MP4 A8 (plan)"] = mixed
        for label, plan in plans.items():
            start = time.perf_counter()
            row: dict[str, Any] = {"model": name, "bits": label}
            mapping = to_qconfig_mapping(plan, model, (data.images[:1],))
            row["fx"] = accuracy(quantize_fx(model, data, mapping=mapping), x_test, y_test)
            q = zb.to_brevitas(model, plan)
            zb.calibrate(q, data)
            row["brevitas"] = accuracy(q, x_test, y_test)
            zb.bias_correct(q, data)
            row["brevitas + bias corr."] = accuracy(q, x_test, y_test)
            g = zb.to_brevitas(model, plan)
            zb.calibrate(g, data)
            zb.gptq(g, data)
            zb.bias_correct(g, data)
            row["brevitas + GPTQ + bias corr."] = accuracy(g, x_test, y_test)
            with tempfile.TemporaryDirectory() as tmp:
                path = zb.export_onnx(q, x_test[:1], Path(tmp) / "model.onnx")
                logits = zb.run_onnx(path, x_test)
            with torch.no_grad():
                ref = torch.cat([q(xb) for xb in x_test.split(250)])
            row["onnxruntime"] = float((logits.argmax(1) == y_test).float().mean() * 100)
            row["onnx SQNR dB"] = sqnr(ref, logits)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "brevitas.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = ["fx", "brevitas", "brevitas + bias corr.", "brevitas + GPTQ + bias corr.", "onnxruntime", "onnx SQNR dB"]
    lines = ["| model | bits | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    (OUT / "brevitas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
