"""The PT2E quantizer of a bit plan: each Conv/Linear's input and weight specs, and the observer checks.

:func:`plan_quantizer` annotates every aten ``conv1d``/``conv2d``/``conv3d``/``linear`` node
with its layer's bits (found by the layer that owns its weight); observers must be torchao's.
:func:`keep_negative_lobes` makes the observers of Hardswish/SiLU/GELU/Mish outputs keep
their minimum.
"""

from __future__ import annotations

from typing import Any

import torch

from zq_plugin import _compat
from zq_plugin.errors import ConfigError
from zq_plugin.plan import BitPlan, LayerBits
from zq_plugin.qparams import quant_range

#: The aten operators :class:`PlanQuantizer` annotates (input 0: activation, input 1: weight).
TARGETS = (
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
)
DEFAULT_BITS = LayerBits(w_bits=8, a_bits=8)


def layer_name(node: torch.fx.Node) -> str:
    """The qualified name of the module that ran ``node`` in the exported model ("" at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _specs(bits: LayerBits, act_observer: Any, weight_observer: Any) -> tuple[Any, Any]:
    ao = _compat.torchao_pt2e()
    a_min, a_max = quant_range(bits.a_bits, signed=False)
    w_min, w_max = quant_range(bits.w_bits, signed=True, narrow=True)
    act = ao.QuantizationSpec(
        dtype=torch.uint8, quant_min=a_min, quant_max=a_max, qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=act_observer,
    )  # fmt: skip
    weight = ao.QuantizationSpec(
        dtype=torch.int8, quant_min=w_min, quant_max=w_max, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=weight_observer,
    )  # fmt: skip
    return act, weight


def _observer_class(cls: Any, role: str, per_channel: bool) -> Any:
    """``cls`` if it is a torchao observer class (or ``with_args`` of one) fit for ``role``; else a ConfigError."""
    ao = _compat.torchao_pt2e()
    fix = f"zq_plugin.observers.pt2e.observer_class('mse'{', per_channel=True' if per_channel else ''})"
    base = getattr(getattr(cls, "p", None), "func", cls)  # ``Observer.with_args(...)`` wraps the class
    if not isinstance(base, type):
        raise ConfigError(f"{role}={cls!r}: pass an observer class, e.g. {fix}.")
    if not issubclass(base, ao.ObserverBase):
        raise ConfigError(
            f"{role}={base.__name__} is not a torchao observer: convert_pt2e silently leaves torch.ao observers "
            f"unconverted (the model would stay float). Use zq_plugin.observers.pt2e's, e.g. {fix}."
        )
    if per_channel and "PerChannel" not in base.__name__:
        raise ConfigError(
            f"{role}={base.__name__}: weights are quantized per channel, and torchao passes the channel axis only "
            f"to observer classes whose name contains 'PerChannel'. Use e.g. {fix}."
        )
    return cls


def plan_quantizer(
    plan: BitPlan | None,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    qat: bool = False,
    default: LayerBits = DEFAULT_BITS,
    first_last_bits: int | None = None,
) -> Any:
    """A torchao ``Quantizer`` that annotates each Conv/Linear with its layer's bits in ``plan``.

    Args:
        plan: per-layer bits; layers it does not name get ``default``. ``None``: every layer
            gets ``default`` (a model that calls ``F.conv2d`` / ``F.linear`` itself, whose layers
            no plan can name).
        act_observer: torchao observer class for layer inputs (default torchao's ``MinMaxObserver``;
            e.g. :data:`zq_plugin.observers.pt2e.MSEObserver`).
        weight_observer: torchao per-channel observer class (default ``PerChannelMinMaxObserver``);
            its class name must contain "PerChannel" (torchao passes ``ch_axis`` only then).
        qat: wrap both in torchao's ``FakeQuantize`` (for ``prepare_qat_pt2e``: weights train through
            the straight-through estimator; the weight observer's default axis 0 is the output channel).
        default: the bits of Conv/Linear operators the plan does not name (8 bits).
        first_last_bits: the bits of the first and last Conv/Linear operator in graph order that
            the plan does not name (``None``: ``default`` like the others).

    Raises:
        ConfigError: a per-tensor or non-uniform layer in the plan (not supported by this backend
            yet); an observer that is not a torchao observer class (a torch.ao one would leave the
            model float), or a weight observer whose name lacks "PerChannel".
        MissingDependencyError: torchao is not installed.
    """
    ao = _compat.torchao_pt2e()
    for name, bits in (plan.layers if plan is not None else {}).items():
        if bits.granularity != "per_channel" or bits.grid != "uniform":
            raise ConfigError(
                f"layer {name!r}: the PT2E backend quantizes weights per channel on a uniform grid; "
                f"granularity={bits.granularity!r}, grid={bits.grid!r} are FX-only for now "
                "(use zq_plugin.quantize_fx, or plan.replace_layer(name, granularity='per_channel', grid='uniform'))."
            )
    act_observer = _observer_class(act_observer or ao.MinMaxObserver, "act_observer", per_channel=False)
    weight_observer = _observer_class(weight_observer or ao.PerChannelMinMaxObserver, "weight_observer", True)
    named = plan.layers if plan is not None else {}
    if qat:
        act_observer = ao.FakeQuantize.with_args(observer=act_observer)
        weight_observer = ao.FakeQuantize.with_args(observer=weight_observer)

    class PlanQuantizer(ao.Quantizer):  # type: ignore[name-defined]
        """Conv/Linear inputs and weights at the plan's bits (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.annotated: set[str] = set()  # the module names of the layers it annotated

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            specs: dict[tuple[int, int], tuple[Any, Any]] = {}  # one pair of specs per distinct bits
            layers = [n for n in model.graph.nodes if n.op == "call_function" and n.target in TARGETS]
            edges = {layers[0], layers[-1]} if layers and first_last_bits is not None else set()

            def bits_of(node: torch.fx.Node) -> LayerBits:
                name = _weight_owner(node)
                if name in named:
                    return named[name]
                if node in edges:
                    return LayerBits(w_bits=first_last_bits, a_bits=first_last_bits)  # type: ignore[arg-type]
                return default

            def spec(w_bits: int, a_bits: int) -> tuple[Any, Any]:
                if (w_bits, a_bits) not in specs:
                    specs[w_bits, a_bits] = _specs(
                        LayerBits(w_bits=w_bits, a_bits=a_bits), act_observer, weight_observer
                    )
                return specs[w_bits, a_bits]

            for node in model.graph.nodes:
                if node.op != "call_function":
                    continue
                if node.target in TARGETS and len(node.args) >= 2:
                    bits = bits_of(node)
                    act, weight = spec(bits.w_bits, bits.a_bits)
                    inputs = {node.args[0]: act, node.args[1]: weight}
                    node.meta["zq_layer"] = _weight_owner(node)  # kept by prepare/convert: describe reads it
                    self.annotated.add(node.meta["zq_layer"])
                else:
                    continue
                node.meta["quantization_annotation"] = ao.QuantizationAnnotation(
                    input_qspec_map=inputs, _annotated=True
                )
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            """Nothing to check beyond the plan (checked when the quantizer was built)."""

    return PlanQuantizer()


_NEGATIVE_LOBE_OPS = frozenset({"hardswish", "silu", "gelu", "mish"})


def keep_negative_lobes(prepared: torch.fx.GraphModule) -> list[str]:
    """Make the observers of Hardswish/SiLU/GELU/Mish outputs keep their minimum; return their names.

    The PT2E twin of :func:`zq_plugin.backends.fx.keep_negative_lobes` (why: there), on the aten
    ops of a ``prepare_pt2e`` or ``prepare_qat_pt2e`` model. Observers without ``keep_min`` are left alone. In place.
    """
    kept = []
    for node in prepared.graph.nodes:
        observer = getattr(prepared, str(node.target), None) if node.op == "call_module" else None
        observer = getattr(observer, "activation_post_process", observer)  # inside a FakeQuantize (QAT)
        source = node.args[0] if node.args else None
        if observer is None or not hasattr(type(observer), "keep_min") or not isinstance(source, torch.fx.Node):
            continue
        op = getattr(source.target, "_opname", "") if source.op == "call_function" else ""
        if str(op).rstrip("_") in _NEGATIVE_LOBE_OPS:
            observer.keep_min = True
            kept.append(str(node.target))
    return kept


def _weight_owner(node: torch.fx.Node) -> str:
    """The model layer a conv/linear node computes: its weight's owner (``fc`` for ``F.linear(x, self.fc.weight)``)."""
    weight = node.args[1] if len(node.args) > 1 else None
    while isinstance(weight, torch.fx.Node) and weight.op == "call_module" and weight.args:
        weight = weight.args[0]  # the weight's observer
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return str(weight.target).rpartition(".")[0] or str(weight.target)
    return layer_name(node)
