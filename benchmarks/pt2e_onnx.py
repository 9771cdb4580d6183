"""PT2E -> ONNX: does the file keep sub-8-bit ranges, and does onnxruntime agree with torch?

For each zoo model at W4A4 (first/last layer 8-bit, MSE observers, the demo's 256 ZeroQ images;
Retro's for ``plain_cnn``): ``quantize_pt2e``, then ``export_onnx`` (a ``Clip`` after each
sub-8-bit QuantizeLinear), and the same export without the clips (what ``torch.onnx.export``
gives on its own). Reported: the number of ``Clip`` nodes with a 4-bit bound in the file, and
top-1 on the 10,000 Fashion-MNIST test images of the converted model in torch and of each file
in onnxruntime, with its graph optimizations off (plain QDQ arithmetic) and at their default
(onnxruntime then fuses DequantizeLinear -> Conv -> QuantizeLinear into integer kernels, which
quantize the bias to int32 and requantize in fixed point), plus the share of test images on
which each agrees with torch.

Run: ``.venv/bin/python benchmarks/pt2e_onnx.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from zq_plugin import datasets, zoo
from zq_plugin.backends import pt2e
from zq_plugin.observers import pt2e as zp


def _calibration(model: torch.nn.Module, name: str) -> torch.Tensor:
    from reconstruction import calibration_images  # the same cached sets as the reconstruction table

    return calibration_images(model, "zeroq" if zoo.has_batchnorm(name) else "retro", 256)


def _ort_predict(path: Path, x: torch.Tensor, optimize: bool) -> torch.Tensor:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: x[i : i + 500].numpy()})[0] for i in range(0, len(x), 500)]
    return torch.cat([torch.from_numpy(a).argmax(1) for a in logits])


def _clips(path: Path, bits: int) -> int:
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip" and n.input[2] in consts]
    return sum(int(consts[c.input[2]]) == 2**bits - 1 for c in clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=zoo.available(), choices=zoo.available())
    args = parser.parse_args()
    x_test, y_test = datasets.load_fashion_mnist("test")

    def top1(pred: torch.Tensor) -> str:
        return f"{100 * float((pred == y_test).float().mean()):.2f}"

    print("| model | export | 4-bit Clips | torch | ORT, no optimizations (agree %) | ORT, default (agree %) |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = zoo.load(name)
        q = pt2e.quantize_pt2e(
            model, _calibration(model, name), w_bits=4, a_bits=4,
            act_observer=zp.MSEObserver, weight_observer=zp.PerChannelMSEObserver,
        )  # fmt: skip
        with torch.no_grad():
            ref = torch.cat([q(x_test[i : i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
        with tempfile.TemporaryDirectory() as tmp:
            for label in ("export_onnx", "without Clip"):
                path = Path(tmp) / f"{label.replace(' ', '_')}.onnx"
                if label == "export_onnx":
                    pt2e.export_onnx(q, x_test[:2], path)
                else:
                    original, pt2e.clip_sub_8_bit = pt2e.clip_sub_8_bit, lambda module: 0
                    try:
                        pt2e.export_onnx(q, x_test[:2], path)
                    finally:
                        pt2e.clip_sub_8_bit = original
                cells = [str(_clips(path, 4)), top1(ref)]
                for optimize in (False, True):
                    pred = _ort_predict(path, x_test, optimize)
                    cells.append(f"{top1(pred)} ({100 * float((pred == ref).float().mean()):.2f})")
                print(f"| {name} | {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
