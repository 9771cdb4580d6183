"""Mixed precision on the zoo: Pareto plans, hybrid granularity and non-uniform weights, measured top-1.

For each zoo model, 256 synthetic calibration images (ZeroQ at its defaults on BN models; the
BN-free Retro-Synthesis path on plain_cnn), cached under ``zq_out/cache``:

1. weight sensitivities Omega_i(k), k in {2, 4, 8} (``measure_sensitivity``);
2. the exact Pareto frontier for two candidate sets, ZeroQ's {2, 4, 8} and every width 2..8;
   plans at the sizes of uniform 3..8-bit models (``Budget(uniform_bits=k)``, every Conv/Linear
   weight counted), each emitted with ``to_qconfig_mapping`` (A8 everywhere) and measured in
   the clamping FX simulation; uniform W4A8 and W8A8 (first/last layer 8-bit, ``quantize_fx``)
   as baselines;
3. hybrid granularity (``hybrid_plan``, KL tolerances 1e-3 and 1e-4) on the uniform W8A8 and
   W4A8 plans: share of per-tensor layers and top-1 against all-per-channel;
4. the clustered non-uniform 4-bit weight grid against uniform 4-bit per-channel (W4A8).

Writes ``zq_out/mixed_precision.json``, ``.md`` and ``zq_out/frontier_<model>.png``.
Run: ``.venv/bin/python benchmarks/mixed_precision.py [--models ...]`` (about 6 minutes on 2 cores
with the synthetic data cached).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from zq_plugin import datasets, synthesize, zoo
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.backends.fx_plan import to_qconfig_mapping
from zq_plugin.evaluation import accuracy
from zq_plugin.mixed_precision import BitPlan, Budget, hybrid_plan, measure_sensitivity, pareto_plan
from zq_plugin.mixed_precision.report import plot_frontier

OUT = Path("zq_out")
CANDIDATES = {"{2,4,8}": (2, 4, 8), "2..8": (2, 3, 4, 5, 6, 7, 8)}
FULL = "2..8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=zoo.available())
    parser.add_argument("--thresholds", type=float, nargs="*", default=[1e-3, 1e-4], help="hybrid KL tolerances")
    parser.add_argument("--sizes", type=int, nargs="*", default=[3, 4, 5, 6, 7, 8], help="uniform k-bit budgets")
    args = parser.parse_args()
    x_test, y_test = datasets.load_fashion_mnist("test")
    results: dict[str, Any] = (
        json.loads((OUT / "mixed_precision.json").read_text()) if (OUT / "mixed_precision.json").is_file() else {}
    )
    for name in args.models:
        model = zoo.load(name)
        method = "zeroq" if zoo.has_batchnorm(name) else "retro"
        data = synthesize(
            model, method, num_samples=256, input_shape=zoo.INPUT_SHAPE, seed=0, progress=False, cache_dir=OUT / "cache"
        )
        example = (data.images[:1],)

        def top1(plan: BitPlan, model: torch.nn.Module = model, data: Any = data, example: Any = example) -> float:
            sim = quantize_fx(model, data, mapping=to_qconfig_mapping(plan, model, example))
            return accuracy(sim, x_test, y_test)

        row: dict[str, Any] = {"data": method, "fp32": accuracy(model, x_test, y_test)}
        for w in (8, 4):
            row[f"uniform W{w}A8"] = accuracy(quantize_fx(model, data, w_bits=w, a_bits=8), x_test, y_test)
        row["pareto"] = {}
        for label, bits in CANDIDATES.items():
            start = time.perf_counter()
            sens = measure_sensitivity(model, data, bits=bits, progress=False)
            seconds = round(time.perf_counter() - start, 1)
            points = []
            result = None
            for k in args.sizes:
                result = pareto_plan(model, budget=Budget(uniform_bits=k), sensitivity=sens)
                plan = result.plan
                points.append(
                    {
                        "budget": f"MP{k}",
                        "average_bits": round(plan.average_w_bits(), 3),
                        "bytes": plan.weight_bytes(),
                        "sensitivity": plan.meta["sensitivity"],
                        "bits": {n: b.w_bits for n, b in plan.layers.items()},
                        "top1": top1(plan),
                    }
                )
                print(f"{name} {label} MP{k}: {points[-1]['average_bits']:.2f} b, {points[-1]['top1']:.2f}", flush=True)
            assert result is not None
            row["pareto"][label] = {
                "sensitivity_s": seconds,
                "sensitivity": sens.to_dict(),
                "points": points,
                "frontier": result.frontier_rows(),
            }
        full = row["pareto"][FULL]
        plot_frontier(
            OUT / f"frontier_{name}.png",
            full["frontier"],
            full["points"],
            f"{name}: frontier (bits 2-8), A8, {method} data",
        )
        # hybrid granularity on uniform plans
        row["hybrid"] = {}
        for w in (8, 4):
            base = BitPlan.uniform(model, w_bits=w, a_bits=8).with_params(model)
            reference = top1(base)
            for threshold in args.thresholds:
                hyb, choice = hybrid_plan(model, data, base, threshold=threshold, progress=False)
                row["hybrid"][f"W{w}A8 tol {threshold:g}"] = {
                    "per_tensor_share": choice.per_tensor_share,
                    "per_tensor_layers": [n for n, g in choice.granularity.items() if g == "per_tensor"],
                    "all_per_channel": reference,
                    "hybrid": top1(hyb),
                    "threshold": threshold,
                }
                print(f"{name} hybrid W{w}A8 {threshold:g}: {row['hybrid'][f'W{w}A8 tol {threshold:g}']}", flush=True)
        # non-uniform 4-bit weights
        uni = BitPlan.uniform(model, w_bits=4, a_bits=8)
        nonuni = BitPlan({n: replace(b, grid="nonuniform") if b.w_bits == 4 else b for n, b in uni.layers.items()})
        row["nonuniform W4A8"] = {"uniform per-channel": top1(uni), "nonuniform": top1(nonuni)}
        print(f"{name} non-uniform: {row['nonuniform W4A8']}", flush=True)
        results[name] = row
        (OUT / "mixed_precision.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "mixed_precision.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    sizes = [p["budget"] for p in next(iter(results.values()))["pareto"][FULL]["points"]]
    lines = ["| model | data | FP32 | W8A8 | W4A8 | candidates | " + " | ".join(sizes) + " |"]
    lines.append("|---|---|---|---|---|---|" + "---|" * len(sizes))
    for name, row in results.items():
        for label, entry in row["pareto"].items():
            cells = [f"{p['top1']:.2f} ({p['average_bits']:.2f})" for p in entry["points"]]
            lines.append(
                f"| {name} | {row['data']} | {row['fp32']:.2f} | {row['uniform W8A8']:.2f} | "
                f"{row['uniform W4A8']:.2f} | {label} | " + " | ".join(cells) + " |"
            )
    lines += ["", "| model | plan | per-tensor share | all per-channel | hybrid |", "|---|---|---|---|---|"]
    for name, row in results.items():
        for plan, h in row["hybrid"].items():
            lines.append(
                f"| {name} | {plan} | {h['per_tensor_share']:.0%} | {h['all_per_channel']:.2f} | {h['hybrid']:.2f} |"
            )
    lines += ["", "| model | W4A8 uniform per-channel | W4A8 non-uniform |", "|---|---|---|"]
    for name, row in results.items():
        nu = row["nonuniform W4A8"]
        lines.append(f"| {name} | {nu['uniform per-channel']:.2f} | {nu['nonuniform']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
