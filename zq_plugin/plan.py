"""BitPlan: a per-layer quantization plan as a plain value (no torch.ao, no Brevitas).

A plan maps each Conv/Linear layer name to a :class:`LayerBits`: weight bits, the bits of the
layer's **input** activation, the weight granularity (per-channel or per-tensor) and the
weight grid (uniform or Retro-Synthesis's clustered non-uniform grid). It imports no backend
and no feature (it sits below them; :mod:`zq_plugin.mixed_precision` re-exports it): the FX
simulation puts a quantizer at each layer's input (:mod:`zq_plugin.backends.fx.sim`),
:func:`zq_plugin.backends.pt2e.plan_quantizer` annotates each layer's input for PT2E, and
:func:`zq_plugin.backends.brevitas.to_brevitas` sets each quant layer's input quantizer.

The weight size of a plan counts Conv/Linear weights only, as ZeroQ does (methods.md §2.5):
``size = sum_i P_i * w_bits_i / 8`` bytes, ``P_i`` the weight count of layer ``i``.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10))
    >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=8, first_last_bits=None)
    >>> plan.weight_bytes(), plan.average_w_bits()
    (738.0, 4.0)
    >>> BitPlan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from zq_plugin._utils import WEIGHT_LAYERS, weight_layer_names, weight_layers
from zq_plugin.data import atomic_write
from zq_plugin.errors import ConfigError
from zq_plugin.qparams import check_bits

Granularity = Literal["per_channel", "per_tensor"]
Grid = Literal["uniform", "nonuniform"]
FORMAT = "zq_plugin.BitPlan"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class LayerBits:
    """The quantization of one Conv/Linear layer.

    Attributes:
        w_bits: weight bits, 2 to 8.
        a_bits: bits of the layer's **input** activation, 2 to 8.
        granularity: ``"per_channel"`` (one scale per output channel) or ``"per_tensor"``.
        grid: ``"uniform"`` or ``"nonuniform"`` (clustered, piecewise-uniform weight levels).
        params: the layer's weight count (used for sizes; 0 when unknown).
    """

    w_bits: int
    a_bits: int
    granularity: Granularity = "per_channel"
    grid: Grid = "uniform"
    params: int = 0

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"granularity={self.granularity!r}: use 'per_channel' or 'per_tensor'.")
        if self.grid not in ("uniform", "nonuniform"):
            raise ConfigError(f"grid={self.grid!r}: use 'uniform' or 'nonuniform'.")
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params < 0:
            raise ConfigError(f"params={self.params!r} must be a non-negative integer (the layer's weight count).")


def _weight_count(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if weight is not None else 0


@dataclass(frozen=True)
class BitPlan:
    """Per-layer bits: ``name -> LayerBits``, in layer order, plus free-form metadata.

    Build one with :meth:`uniform`, by :func:`zq_plugin.mixed_precision.pareto.pareto_plan`,
    or from JSON (:meth:`load`). Plans are values: compare with ``==``, derive new ones with
    :meth:`replace_layer`. Layers of the model that a plan does not name stay at the emitter's
    default (8 bits).
    """

    layers: Mapping[str, LayerBits]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a BitPlan needs at least one layer; build one with BitPlan.uniform(model, ...).")
        for name, bits in self.layers.items():
            if not isinstance(name, str) or not isinstance(bits, LayerBits):
                raise ConfigError(f"plan entry {name!r}: {bits!r} must map a layer name (str) to a LayerBits.")
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # construction -------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        model: nn.Module,
        *,
        w_bits: int,
        a_bits: int,
        first_last_bits: int | None = 8,
        granularity: Granularity = "per_channel",
        grid: Grid = "uniform",
    ) -> BitPlan:
        """Every Conv/Linear at ``w_bits``/``a_bits``; the first and last (execution order) at ``first_last_bits``.

        First and last are found as :func:`zq_plugin.backends.fx.uniform_qconfig_mapping` finds them.
        """
        layers = weight_layers(model)
        if not layers:
            raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to plan.")
        order = weight_layer_names(model)
        ends = {order[0], order[-1]} if first_last_bits is not None else set()
        plan = {}
        for name, module in layers.items():
            w, a = (
                (first_last_bits, first_last_bits) if first_last_bits is not None and name in ends else (w_bits, a_bits)
            )
            plan[name] = LayerBits(w_bits=w, a_bits=a, granularity=granularity, grid=grid, params=_weight_count(module))
        return cls(plan)

    def replace_layer(self, name: str, **changes: Any) -> BitPlan:
        """A new plan with ``changes`` (``w_bits=...``, ``a_bits=...``, ...) applied to layer ``name``."""
        if name not in self.layers:
            raise ConfigError(f"layer {name!r} is not in the plan; it has: {_some(self.layers)}.")
        layers = dict(self.layers)
        layers[name] = replace(layers[name], **changes)
        return BitPlan(layers, self.meta)

    def traced(self, traced: nn.Module) -> BitPlan:
        """The plan for a traced copy of its model: the same layers, checked against the trace.

        ``torch.fx`` turns a layer whose weight the model reads functionally
        (``F.linear(x, self.fc.weight)``) into a bare module holding the weight; the plan keeps its
        bits under the same name, and every backend gives them to the functional call (the
        simulation by the call's weight owner, PT2E by the weight's owner). A plan layer that the
        trace does not hold at all is dropped. Call :meth:`check` on the model first.
        """
        layers = weight_layers(traced)
        kept = {
            name: bits
            for name, bits in self.layers.items()
            if name in layers or _holds_weight(traced, name)
        }  # fmt: skip
        return self if len(kept) == len(self.layers) else BitPlan(kept, self.meta)

    def with_params(self, model: nn.Module) -> BitPlan:
        """The same plan with each layer's weight count read from ``model`` (after :meth:`check`)."""
        self.check(model)
        modules = weight_layers(model)
        return BitPlan({n: replace(b, params=_weight_count(modules[n])) for n, b in self.layers.items()}, self.meta)

    def check(self, model: nn.Module) -> BitPlan:
        """Raise :class:`ConfigError` if the plan names a layer that is not a quantizable Conv/Linear of ``model``.

        Quantizable: :func:`zq_plugin._utils.weight_layers` (not inside ``nn.MultiheadAttention`` and other modules
        torch.fx treats as leaves), the same set the FX emitter and backends quantize.
        """
        layers = weight_layers(model)
        modules = dict(model.named_modules())
        for name in self.layers:
            if name in layers or _holds_weight(model, name):
                continue
            if name in modules and isinstance(modules[name], WEIGHT_LAYERS):
                raise ConfigError(
                    f"plan layer {name!r} ({type(modules[name]).__name__}) sits inside a module that torch.fx does not "
                    "descend into (e.g. nn.MultiheadAttention), so no backend quantizes it; drop it from the plan "
                    "(BitPlan.uniform(model, ...) and pareto_plan leave such layers out)."
                )
            if name in modules:
                supported = ", ".join(t.__name__ for t in WEIGHT_LAYERS)
                raise ConfigError(
                    f"plan layer {name!r} is a {type(modules[name]).__name__}; plans cover {supported} layers only."
                )
            raise ConfigError(
                f"plan layer {name!r} does not exist in {type(model).__name__}; its Conv/Linear layers are: "
                f"{_some(layers)}. Build a plan for this model with BitPlan.uniform(model, ...) or pareto_plan."
            )
        return self

    # summaries ---------------------------------------------------------------------------
    def weight_bits(self) -> int:
        """Total weight bits ``sum_i P_i w_bits_i``."""
        return sum(b.params * b.w_bits for b in self.layers.values())

    def weight_bytes(self) -> float:
        """Weight size in bytes, ``sum_i P_i w_bits_i / 8`` (Conv/Linear weights only, as ZeroQ)."""
        return self.weight_bits() / 8

    def average_w_bits(self) -> float:
        """Weight bits per weight, ``sum_i P_i w_i / sum_i P_i``."""
        total = sum(b.params for b in self.layers.values())
        if total == 0:
            raise ConfigError("the plan has no weight counts; call plan.with_params(model) first.")
        return self.weight_bits() / total

    def per_tensor_share(self) -> float:
        """Share of layers whose weights are quantized per-tensor."""
        return sum(b.granularity == "per_tensor" for b in self.layers.values()) / len(self.layers)

    def table(self) -> str:
        """A Markdown table of the plan."""
        rows = ["| layer | params | W bits | A bits (input) | granularity | grid |", "|---|---|---|---|---|---|"]
        for name, b in self.layers.items():
            rows.append(f"| {name} | {b.params:,} | {b.w_bits} | {b.a_bits} | {b.granularity} | {b.grid} |")
        total = sum(b.params for b in self.layers.values())
        if total:
            rows.append(
                f"| total | {total:,} | {self.average_w_bits():.2f} avg | | "
                f"{self.per_tensor_share():.0%} per-tensor | {self.weight_bytes():,.0f} bytes |"
            )
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"BitPlan({len(self.layers)} layers)\n{self.table()}"

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # JSON ----------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The plan as a JSON document (format tag, version, layers in order, metadata)."""
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "layers": {name: asdict(b) for name, b in self.layers.items()},
            "meta": dict(self.meta),
        }
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BitPlan:
        """Parse :meth:`to_json`'s output; raise :class:`ConfigError` naming what is wrong."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not a BitPlan JSON document: {e}.") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"not a BitPlan JSON document (format tag {FORMAT!r} missing).")
        if doc.get("version") != FORMAT_VERSION:
            raise ConfigError(f"BitPlan version {doc.get('version')!r} is not supported (this release reads 1).")
        layers = doc.get("layers")
        if not isinstance(layers, dict):
            raise ConfigError("BitPlan JSON: 'layers' must be an object of layer name -> settings.")
        known = set(LayerBits.__dataclass_fields__)
        parsed = {}
        for name, entry in layers.items():
            if not isinstance(entry, dict) or not {"w_bits", "a_bits"} <= set(entry) or set(entry) - known:
                raise ConfigError(
                    f"BitPlan JSON: layer {name!r} has {entry!r}; each layer needs w_bits and a_bits and may "
                    f"have {sorted(known - {'w_bits', 'a_bits'})}."
                )
            parsed[name] = LayerBits(**entry)
        return cls(parsed, doc.get("meta") or {})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON atomically (:func:`zq_plugin.data.atomic_write`)."""
        atomic_write(path, lambda f: f.write(self.to_json().encode()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitPlan:
        """Read a plan written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


def _some(names: Mapping[str, Any], limit: int = 12) -> str:
    keys = list(names)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _holds_weight(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a bare module of a traced copy holding a layer's ``weight`` parameter.

    ``torch.fx`` keeps a layer that the model computes functionally (``F.conv2d(x, self.mix.weight)``)
    as a plain ``nn.Module`` with just the attributes the graph reads.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return type(module) is nn.Module and isinstance(module._parameters.get("weight"), nn.Parameter)
