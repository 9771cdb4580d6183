"""A converted PT2E model saved: a ``torch.export`` program (:func:`export_program`, :func:`load_program`) or QCDQ ONNX.

ONNX's QuantizeLinear clamps to its container only, so :func:`export_onnx` keeps sub-8-bit
activation ranges with a ``Clip`` after each quantize op (:func:`clip_sub_8_bit`).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from zq_plugin import _compat
from zq_plugin.backends.pt2e.quantize import _reason
from zq_plugin.errors import ModelError


def load_program(path: str | os.PathLike[str]) -> Any:
    """``torch.export.load(path)`` of a saved PT2E program, with torchao's q/dq ops registered first.

    Raises:
        MissingDependencyError: torchao is not installed.
    """
    _compat.torchao_pt2e()  # registers the quantized_decomposed ops the program calls
    return torch.export.load(path)


def export_program(converted: torch.fx.GraphModule, example: torch.Tensor) -> Any:
    """A converted PT2E model as a ``torch.export`` program with a dynamic batch, for ``torch.export.save``.

    Load it in any process with ``torch.export.load(path).module()`` after ``import
    torchao.quantization.pt2e`` (which registers the ``quantized_decomposed`` q/dq ops the program calls).

    Raises:
        ModelError: torch.export refused the converted model (its reason is named).
    """
    batch = torch.export.Dim("batch")
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        return torch.export.export(converted, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many kinds; name its reason
        raise ModelError(f"torch.export could not export the converted model ({_reason(exc)}).") from exc


_QUANTIZE_PER_TENSOR = "quantized_decomposed.quantize_per_tensor.default"


def clip_sub_8_bit(converted: torch.fx.GraphModule) -> int:
    """After each activation quantize op narrower than its container, add a clamp to its range; return the count.

    In torch the clamp changes nothing (the quantize op clamps already); ONNX's QuantizeLinear
    clamps to the container (``uint8``: 0..255) only, so without it a 4-bit activation becomes
    8-bit in the file (integration-notes §2). Exported, the clamp is a ``Clip`` on the integer
    tensor, between QuantizeLinear and DequantizeLinear (QCDQ, as Brevitas writes). In place.
    """
    graph, count = converted.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != _QUANTIZE_PER_TENSOR or len(node.args) < 6:
            continue
        qmin, qmax, dtype = int(node.args[3]), int(node.args[4]), node.args[5]
        info = torch.iinfo(dtype)
        if (qmin, qmax) == (info.min, info.max):
            continue
        users = list(node.users)
        with graph.inserting_after(node):
            clipped = graph.call_function(torch.ops.aten.clamp.default, (node, qmin, qmax))
        for user in users:
            user.replace_input_with(node, clipped)
        count += 1
    graph.lint()
    converted.recompile()
    return count


def export_onnx(converted: torch.fx.GraphModule, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a converted PT2E model as QCDQ ONNX that keeps sub-8-bit ranges (``Clip`` after QuantizeLinear).

    The batch dimension is dynamic; weights are stored pre-quantized (their range is exact).
    The file is written atomically; ``converted`` is not changed.

    Returns:
        ``path``; run it with :func:`zq_plugin.backends.brevitas.run_onnx` (onnxruntime only, no Brevitas).

    Raises:
        MissingDependencyError: onnx / onnxscript are not installed (``pip install 'zq-plugin[onnx]'``).
        ModelError: the exporter refused the model (its reason is named).
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        from zq_plugin.errors import MissingDependencyError

        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript ({err}): pip install 'zq-plugin[onnx]'."
        ) from err
    from zq_plugin.data import atomic_write

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        module = copy.deepcopy(converted)
    clip_sub_8_bit(module)
    batch = torch.export.Dim("batch")
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress notes
            program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # the exporter raises many kinds; name its reason
        raise ModelError(f"torch.onnx.export could not export the converted model ({_reason(exc)}).") from exc
    if program is None:  # dynamo=True returns the program; a future torch that does not is named, not asserted
        raise ModelError("torch.onnx.export returned no ONNX program; export with torch's own torch.onnx.export.")
    proto = program.model_proto
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return Path(path)
