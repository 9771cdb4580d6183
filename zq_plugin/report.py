"""What a quantized model really applies, read from the built model: :func:`describe`.

Every model the plugin builds (the FX simulation, a converted PT2E model, a Brevitas model)
answers one call. The bits, granularity, the layers left in float and the other ops computed
in float (:class:`FloatOp`) are read from the model itself (its FakeQuantize modules, its
quantize/dequantize nodes, its Brevitas quantizers, its graph), not from the request; where
each step came from (carried from the simulation, calibrated by the backend, learned by
reconstruction or fine-tuning) and the calibration data's provenance come from the build
record the pipeline attaches (:class:`Build`).

Example:
    >>> import torch, zq_plugin
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(144, 3)).eval()
    >>> sim = zq_plugin.quantize_fx(net, torch.randn(16, 1, 8, 8), w_bits=4, a_bits=3, first_last_bits=None)
    >>> [(row.name, row.w_bits, row.a_bits) for row in describe(sim).layers]
    [('0', 4, 3), ('3', 4, 3)]
    >>> [(op.kind, op.nodes) for op in describe(sim).float_ops]  # the ReLU fused with conv 0 runs in float
    [('relu', ('0',))]
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

#: Where a step came from: the simulation's own calibration, carried from it into a backend,
#: calibrated by the backend itself, learned by reconstruction or fine-tuning; "float": none.
STEP_SOURCES = ("calibrated", "carried", "backend-calibrated", "reconstructed", "fine-tuned", "float")


@dataclass(frozen=True, kw_only=True)
class DataProvenance:
    """Where the calibration data came from.

    Attributes:
        source: ``"synthesized"`` (made from the model by a synthesizer) or ``"given"``.
        method: the synthesizer's name (``None`` for given data that do not say).
        count: the number of images.
        seed: the synthesis seed (``None`` when unknown).
        fingerprint: a short SHA-256 of the images' bytes.
    """

    source: str
    method: str | None
    count: int
    seed: int | None
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class LayerReport:
    """One weight layer as built.

    Attributes:
        name: the layer's qualified name in the float model.
        w_bits: weight bits applied (``None``: float weight).
        a_bits: input bits applied (``None``: float input).
        granularity: ``"per_channel"`` / ``"per_tensor"`` weights (``None``: float).
        weight_step: where the weight steps came from (:data:`STEP_SOURCES`).
        input_step: where the input step came from (:data:`STEP_SOURCES`).
    """

    name: str
    w_bits: int | None
    a_bits: int | None
    granularity: str | None
    weight_step: str
    input_step: str


@dataclass(frozen=True, kw_only=True)
class FloatOp:
    """One kind of op the built model computes in float, between the quantized inputs of its weight layers.

    Attributes:
        kind: the op's short name (``"hardsigmoid"``, ``"mul"``, ``"add"``, ``"adaptive_avg_pool2d"``).
        nodes: the graph nodes (or modules) computing it, in graph order.
        count: ``len(nodes)``.

    Example:
        >>> FloatOp(kind="mul", nodes=("mul", "mul_1"), count=2).count
        2
    """

    kind: str
    nodes: tuple[str, ...]
    count: int


@dataclass(frozen=True, kw_only=True)
class Build:
    """The pipeline's record of how a model was built (attached as ``qmodel.zq_build``).

    Attributes:
        backend: ``"fx"``, ``"pt2e"`` or ``"brevitas"``.
        stage: ``"calibrate"``, ``"reconstruct"`` or ``"finetune"``.
        observer: the observer name the ranges were calibrated with.
        request: the bits asked for (``w_bits``, ``a_bits``, ``first_last_bits``, or the plan's JSON).
        data: the calibration data's provenance.
        steps: ``layer -> {"weight": source, "input": source}`` as the carrier set them.
        stage_report: the stage's own report (reconstruction units' errors, fine-tuning losses).
    """

    backend: str
    stage: str
    observer: str
    request: dict[str, Any]
    data: DataProvenance | None
    steps: dict[str, dict[str, str]] = field(default_factory=dict)
    stage_report: Any = None


@dataclass(frozen=True, kw_only=True)
class Report:
    """What a quantized model applies: :func:`describe`'s answer.

    Attributes:
        backend: ``"fx"``, ``"pt2e"`` or ``"brevitas"``.
        layers: one :class:`LayerReport` per weight layer, in graph order.
        float_layers: weight layers the model computes in float.
        build: the pipeline's record (``None`` for a model built outside it).
        float_ops: the other ops the model computes in float, one :class:`FloatOp` per kind in
            order of first use (activations, gates, products, sums, pooling: every compute op
            but the weight layers, the quantizers and the ops that only move or reshape values).
    """

    backend: str
    layers: tuple[LayerReport, ...]
    float_layers: tuple[str, ...]
    build: Build | None
    float_ops: tuple[FloatOp, ...] = ()

    def layers_by_bits(self) -> dict[str, dict[str, int]]:
        """``{"w_bits": {bits: count}, "a_bits": {bits: count}}`` of the layers as built (``"float"`` for none)."""
        out: dict[str, dict[str, int]] = {"w_bits": {}, "a_bits": {}}
        for row in self.layers:
            for key, bits in (("w_bits", row.w_bits), ("a_bits", row.a_bits)):
                label = "float" if bits is None else str(bits)
                out[key][label] = out[key].get(label, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``zq quantize`` prints and writes).

        ``"float_ops"`` is ``{kind: count}``, ``"float_op_nodes"`` ``{kind: [node, ...]}``.
        """
        return {
            "backend": self.backend,
            "layers": [dataclasses.asdict(row) for row in self.layers],
            "float_layers": list(self.float_layers),
            "float_ops": {op.kind: op.count for op in self.float_ops},
            "float_op_nodes": {op.kind: list(op.nodes) for op in self.float_ops},
            "layers_by_bits": self.layers_by_bits(),
            "build": None if self.build is None else _jsonable(self.build),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def table(self) -> str:
        """A plain-text table: layer, weight bits, input bits, granularity, step sources; then the float ops."""
        rows = [("layer", "W", "A", "granularity", "weight step", "input step")]
        for r in self.layers:
            rows.append(
                (
                    r.name, _bits(r.w_bits), _bits(r.a_bits), r.granularity or "-", r.weight_step, r.input_step,
                )
            )  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
        if self.float_layers:
            lines.append(f"float: {', '.join(self.float_layers)}")
        if self.float_ops:
            lines.append(f"float ops: {', '.join(f'{op.kind} ×{op.count}' for op in self.float_ops)}")
        return "\n".join(lines)


def _bits(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


def _jsonable(value: Any) -> Any:
    """A JSON-ready copy (no deep copy of what it cannot read: a stage's report may hold read-only mappings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return json.loads(to_json())
    return repr(value)


def provenance(data: Any) -> DataProvenance:
    """The :class:`DataProvenance` of calibration data (a SyntheticDataset says its method and seed)."""
    import hashlib

    from zq_plugin.data import SyntheticDataset

    images = data.images if isinstance(data, SyntheticDataset) else data
    if isinstance(images, torch.Tensor):
        flat = images.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        count = int(images.shape[0])
    else:
        digest, count = "unknown", 0
    if isinstance(data, SyntheticDataset):
        return DataProvenance(source="synthesized", method=data.method, count=count, seed=data.seed, fingerprint=digest)
    return DataProvenance(source="given", method=None, count=count, seed=None, fingerprint=digest)


def _backend_of(model: nn.Module) -> str:
    from zq_plugin import _compat

    build = getattr(model, "zq_build", None)
    if isinstance(build, Build):
        return build.backend
    if any(type(m).__module__.startswith("brevitas.") for m in model.modules()):
        return "brevitas"
    graph = getattr(model, "graph", None)
    if graph is not None and any(
        n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in graph.nodes
    ):
        return "pt2e"
    if any(isinstance(m, _compat.FakeQuantizeBase) for m in model.modules()):
        return "fx"
    return "float"


def describe(qmodel: nn.Module) -> Report:
    """What ``qmodel`` applies, per weight layer, read from the model itself.

    Works on every model the plugin builds: the FX simulation (:func:`zq_plugin.quantize`,
    :func:`zq_plugin.quantize_fx`, :func:`zq_plugin.reconstruct_fx`, :func:`zq_plugin.finetune`),
    a converted PT2E model and a Brevitas model. Bits come from the quantizers as built (the
    integer range of each FakeQuantize, quantize/dequantize node or Brevitas quantizer); the
    step sources and the data's provenance from ``qmodel.zq_build`` when the pipeline built it.

    ``float_ops`` lists what is not quantized as deployed: only each weight layer's input and
    weight are quantized (on every backend), so every other compute op of the graph (gates
    such as sigmoid/hardsigmoid, their products, Hardswish/SiLU/ReLU, residual sums, pooling,
    concatenations) computes in float on dequantized values. Weight layers, quantizers and ops
    that only move or reshape values (views, flatten, getitem, dropout in eval) are left out.
    Read from the FX graph, the converted PT2E aten graph, or the traced Brevitas graph (a
    Brevitas model without a graph: its leaf modules only, functional calls unseen).

    Args:
        qmodel: a quantized model.

    Returns:
        A :class:`Report` (``.table()``, ``.to_json()``, ``.layers_by_bits()``, ``.float_ops``).

    Raises:
        ConfigError: ``qmodel`` holds no quantizer the plugin knows (a float model).
    """
    from zq_plugin.errors import ConfigError

    backend = _backend_of(qmodel)
    build = getattr(qmodel, "zq_build", None)
    build = build if isinstance(build, Build) else None
    steps = build.steps if build is not None else {}
    if backend == "fx":
        from zq_plugin.backends.fx.sim import describe_sim, float_ops_sim

        rows = describe_sim(cast(torch.fx.GraphModule, qmodel))
        ops = float_ops_sim(cast(torch.fx.GraphModule, qmodel))
        default = _stage_source(build)
    elif backend == "pt2e":
        from zq_plugin.backends.pt2e.carry import describe_converted, float_ops_converted

        rows = describe_converted(cast(torch.fx.GraphModule, qmodel))
        ops = float_ops_converted(cast(torch.fx.GraphModule, qmodel))
        default = "backend-calibrated"
    elif backend == "brevitas":
        from zq_plugin.backends.brevitas.layers import describe_layers, float_ops_layers

        rows = describe_layers(qmodel)
        ops = float_ops_layers(qmodel)
        default = "backend-calibrated"
    else:
        raise ConfigError(
            f"{type(qmodel).__name__} holds no quantizer zq_plugin knows: describe() reads a model built by "
            "zq_plugin.quantize, quantize_fx, reconstruct_fx, finetune, or the PT2E / Brevitas backends."
        )
    # reconstruction learns the weights of the layers its units name; a layer computed by a
    # functional call (F.linear(x, self.fc.weight)) keeps its calibrated rounding
    units = build.stage_report if build is not None and build.stage == "reconstruct" else None
    learned = {layer for r in units for layer in r.get("layers", ())} if isinstance(units, list | tuple) else None
    layers = []
    for name, (w_bits, a_bits, granularity) in rows.items():
        how = steps.get(name, {})
        weight_default = "calibrated" if backend == "fx" and learned is not None and name not in learned else default
        layers.append(
            LayerReport(
                name=name, w_bits=w_bits, a_bits=a_bits, granularity=granularity,
                weight_step="float" if w_bits is None else _source(how.get("weight"), weight_default),
                input_step="float" if a_bits is None else _source(how.get("input"), default),
            )
        )  # fmt: skip
    floats = tuple(getattr(qmodel, "zq_float_layers", None) or ())
    float_ops = tuple(FloatOp(kind=kind, nodes=tuple(nodes), count=len(nodes)) for kind, nodes in ops.items())
    return Report(backend=backend, layers=tuple(layers), float_layers=floats, build=build, float_ops=float_ops)


def _stage_source(build: Build | None) -> str:
    if build is None or build.stage == "calibrate":
        return "calibrated"
    return {"reconstruct": "reconstructed", "finetune": "fine-tuned"}.get(build.stage, "calibrated")


def _source(carrier: str | None, default: str) -> str:
    if carrier == "carried":
        return "carried"
    if carrier == "calibrated":
        return "backend-calibrated"
    return default
