"""QCDQ ONNX of a Brevitas model (:func:`export_onnx`) and onnxruntime to run any exported file (:func:`run_onnx`)."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zq_plugin._utils import eval_mode, input_placement, select_output
from zq_plugin.backends.brevitas.layers import _brevitas, _quant_layers, uncalibrated
from zq_plugin.errors import MissingDependencyError, ModelError, NotCalibratedError


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple/list/dict output, depth first in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple | list) else ()
    return [t for value in values for t in _tensors(value)]


class _LogitsFirst(nn.Module):
    """Export wrapper: the model's outputs as a flat tuple, the logits (:func:`select_output`) first."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def flatten(output: Any) -> tuple[torch.Tensor, ...]:
        """The logits, then every other tensor of ``output``."""
        logits = select_output(output)
        return (logits, *(t for t in _tensors(output) if t is not logits))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.flatten(self.model(x))


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as QCDQ ONNX (TorchScript exporter: int32 bias and sub-8-bit ``Clip`` bounds kept).

    The batch dimension is dynamic. The input is ``"input"``; the outputs are the model's
    tensors flattened (tuple/list order, dict insertion order, nested depth first) with the
    logits of :func:`~zq_plugin._utils.select_output` moved first as ``"output"``, the others
    ``"output_1"``, ``"output_2"``, ... (:func:`run_onnx` returns the first, or all with
    ``all_outputs=True``). ``example`` goes to the model's device. Written to a temporary file
    beside ``path`` and renamed, so a failed export leaves nothing.

    Raises:
        NotCalibratedError: the model has not been calibrated.
        ModelError: the written graph has no ``QuantizeLinear`` (the model ran in float); no file is left.
        MissingDependencyError: onnx or onnxoptimizer is missing.
    """
    _brevitas()
    if uncalibrated(model):
        raise NotCalibratedError("calibrate the model before exporting it (its activation ranges are unset).")
    try:
        export_onnx_qcdq = importlib.import_module("brevitas.export").export_onnx_qcdq
        onnx = importlib.import_module("onnx")
        importlib.import_module("onnxoptimizer")
    except ImportError as exc:
        raise MissingDependencyError(
            "ONNX export needs onnx and onnxoptimizer: pip install 'zq-plugin[onnx]'."
        ) from exc
    example = example.to(input_placement(model)[0])
    with eval_mode(model), torch.no_grad():
        output = model(example)
    flat = _LogitsFirst.flatten(output)
    names = ["output", *(f"output_{i}" for i in range(1, len(flat)))]
    dynamic = {"input": {0: "batch"}, **{n: {0: "batch"} for n, t in zip(names, flat, strict=True) if t.dim() > 0}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), eval_mode(model), torch.no_grad():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(
                model if isinstance(output, torch.Tensor) else _LogitsFirst(model),
                args=example,
                export_path=str(tmp),
                dynamo=False,
                input_names=["input"],
                output_names=names,
                dynamic_axes=dynamic,
            )
        ops = {node.op_type for node in onnx.load(str(tmp), load_external_data=False).graph.node}
        if _quant_layers(model) and "QuantizeLinear" not in ops:
            raise ModelError(
                f"the exported graph of {type(model).__name__} has no QuantizeLinear node: the model ran in float "
                "(a Brevitas mode left active?). Nothing was written; rebuild it with to_brevitas and calibrate."
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def _own_weight_zero_points(path: str | os.PathLike[str]) -> str | bytes:
    """``path``, or the model's bytes with each weight ``DequantizeLinear`` given its own zero point.

    The exporters deduplicate equal constants, so layers share one weight zero point; onnxruntime's
    x86 precision mode (``session.x64quantprecision``) rewrites each int8 weight and its zero point
    to uint8 and refuses the second rewrite of a shared one ("Attempt to replace the existing tensor").
    """
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        return str(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    clips = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Clip"}  # QCDQ: weight -> Clip -> DQ
    known = constants.keys() | constant_nodes.keys()
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, copied = [], set()
    for index, node in enumerate(graph.node):
        node = copy.deepcopy(node)
        if (
            node.op_type == "DequantizeLinear"
            and len(node.input) > 2
            and uses[node.input[2]] > 1
            and clips.get(node.input[0], node.input[0]) in known
            and node.input[2] in known
        ):
            zero_point, own = node.input[2], f"{node.input[2]}.{node.name or index}"
            if zero_point in constant_nodes:
                twin = copy.deepcopy(constant_nodes[zero_point])
                twin.name, twin.output[0] = own, own
                nodes.append(twin)
            else:
                graph.initializer.append(copy.deepcopy(constants[zero_point]))
                graph.initializer[-1].name = own
            node.input[2] = own
            copied.add(zero_point)
        nodes.append(node)
    if not copied:
        return str(path)
    orphans = copied - {name for node in nodes for name in node.input}  # copied for every reader
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant" or n.output[0] not in orphans)
    kept = [copy.deepcopy(t) for t in graph.initializer if t.name not in orphans]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.load_external_data_for_model(model, str(Path(path).parent))
    return model.SerializeToString()


@typing.overload
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = ...,
    all_outputs: Literal[False] = ...,
    optimize: bool = ...,
) -> torch.Tensor: ...
@typing.overload
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = ...,
    all_outputs: Literal[True],
    optimize: bool = ...,
) -> list[torch.Tensor]: ...
def run_onnx(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    *,
    batch_size: int = 250,
    all_outputs: bool = False,
    optimize: bool = True,
) -> torch.Tensor | list[torch.Tensor]:
    """Run an exported model in onnxruntime (CPU) on ``x`` ``[N, ...]``.

    Returns the first output ``[N, ...]`` (the logits, for a file from :func:`export_onnx`), or
    with ``all_outputs=True`` the list of every output in the file's order, each concatenated
    over the batches. ``x`` may live on any device. ``optimize=False`` turns onnxruntime's graph
    optimizations off: then QDQ patterns are computed as written, as torch computes them; at
    the default level onnxruntime fuses them into integer kernels that round differently (its
    exact U8U8 kernels on x86 CPUs without VNNI, where the faster U8S8 ones saturate).

    Example:
        >>> import tempfile, torch
        >>> from zq_plugin.backends.brevitas import calibrate, to_brevitas
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> qmodel = to_brevitas(net, w_bits=4, a_bits=4)
        >>> _ = calibrate(qmodel, torch.randn(64, 1, 8, 8))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp + "/m.onnx")
        ...     run_onnx(path, torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependencyError("running ONNX needs onnxruntime: pip install 'zq-plugin[onnx]'.") from exc
    options = ort.SessionOptions()
    # x86 without VNNI (AVX2, AVX-512F): the fused uint8 x int8 kernels add products pairwise in
    # saturating int16 (255 * 127 * 2 > 32767), so full-range 8-bit weights lost up to 1.8 units
    # per output (17 dB); onnxruntime's exact U8U8 kernels instead. No effect on other CPUs.
    options.add_session_config_entry("session.x64quantprecision", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # onnxruntime's WeightBiasQuantization pass rounds a float bias beside Q/DQ weights to int32 with
    # its own scale; the plugin's models keep biases float (as the simulation computes them), so the
    # pass is turned off: the outputs are then PyTorch's (docs/api.md, "exports")
    session = ort.InferenceSession(
        _own_weight_zero_points(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["WeightBiasQuantization"],
    )
    name = session.get_inputs()[0].name
    shape = session.get_inputs()[0].shape
    fixed = isinstance(shape[0], int)  # a traced batch size: run one sample at a time
    step = 1 if fixed else batch_size
    x = x.detach().cpu()
    runs = [session.run(None, {name: x[i : i + step].numpy()}) for i in range(0, len(x), step)]
    outs = [
        torch.cat([torch.from_numpy(r[k]) for r in runs]) if runs[0][k].ndim else torch.from_numpy(runs[0][k])
        for k in range(len(runs[0]))
    ]
    return outs if all_outputs else outs[0]
