"""An FX simulation carried into PT2E through the one seam ``read_sim``, and a converted model described.

:func:`from_sim` gives the converted model the simulation's weights and, with
:func:`carry_steps`, its weight and input steps (observers that convert with given
``(scale, zero_point)``); :func:`describe_converted` reads each layer's bits back from the q/dq nodes.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, cast

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import graph_float_ops
from zq_plugin.backends import carried_counts
from zq_plugin.backends.pt2e.quantize import _prepared, convert
from zq_plugin.backends.pt2e.quantizer import TARGETS, _weight_owner
from zq_plugin.data import CalibrationData
from zq_plugin.plan import BitPlan


@functools.cache
def _preset_observer_class() -> type:
    """The class of :func:`carry_steps`'s observers, built on first use (torchao's base is an extra)."""
    ao = _compat.torchao_pt2e()

    class PresetObserver(ao.ObserverBase):  # type: ignore[name-defined]
        """An observer that records nothing and converts with given ``(scale, zero_point)`` (learned steps).

        Takes ``dtype``, ``qscheme``, ``quant_min``/``quant_max`` and ``ch_axis`` from the observer it
        replaces, so ``convert_pt2e`` writes the same q/dq ops with the given parameters.
        """

        def __init__(self, like: Any, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
            super().__init__(dtype=like.dtype, is_dynamic=False)
            self.qscheme = like.qscheme
            self.quant_min, self.quant_max = int(like.quant_min), int(like.quant_max)
            self.ch_axis = getattr(like, "ch_axis", None)
            self.scale: torch.Tensor
            self.zero_point: torch.Tensor
            self.register_buffer("scale", scale.detach().clone().float().reshape(-1))
            self.register_buffer("zero_point", zero_point.detach().clone().to(torch.int64).reshape(-1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """``x`` unchanged."""
            return x

        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The given ``(scale, zero_point)``."""
            return self.scale, self.zero_point

    return PresetObserver


def _same_grid(grid: Any, observer: Any) -> bool:
    """A simulation :class:`~zq_plugin.backends.fx.sim.Grid` and a torchao observer with the same range and axis."""
    if grid is None or (int(grid.quant_min), int(grid.quant_max)) != (int(observer.quant_min), int(observer.quant_max)):
        return False
    axis = getattr(observer, "ch_axis", None) if "PerChannel" in type(observer).__name__ else None
    return grid.axis == (None if axis is None else int(axis))


def carry_steps(prepared: torch.fx.GraphModule, sim: torch.fx.GraphModule) -> dict[str, dict[str, str]]:
    """Give a ``prepare_pt2e`` model the simulation's steps where both quantize the same tensor; in place.

    For every Conv/Linear node of ``prepared`` whose layer is a layer of ``sim`` (read through
    :func:`zq_plugin.backends.fx.sim.read_sim`), its **weight** observer is replaced by one that
    converts with the simulation's weight steps and its **input** observer by one with the
    simulation's input ``(scale, zero_point)``, when the integer ranges and axes match (both
    quantize the layer's input: the same tensor). Returns ``layer -> {"weight": how, "input": how}``
    with ``how`` one of ``"carried"``, ``"calibrated"`` (the grids differ, or the simulation has
    none: the observer's own statistics stay).
    """
    from zq_plugin.backends.fx.sim import read_sim

    preset = _preset_observer_class()
    layers = read_sim(sim)
    report: dict[str, dict[str, str]] = {}
    for node in list(prepared.graph.nodes):
        if node.op != "call_function" or node.target not in TARGETS or len(node.args) < 2:
            continue
        name = _weight_owner(node)
        layer = layers.get(name)
        how = report.setdefault(name, {"weight": "calibrated", "input": "calibrated"})
        for role, obs_node, grid in (
            ("weight", node.args[1], layer.weight_grid if layer is not None else None),
            ("input", node.args[0], layer.input_grid if layer is not None else None),
        ):
            if not isinstance(obs_node, torch.fx.Node) or obs_node.op != "call_module":
                continue
            observer = getattr(prepared, str(obs_node.target), None)
            if observer is not None and grid is not None and _same_grid(grid, observer):
                setattr(prepared, str(obs_node.target), preset(observer, grid.scale, grid.zero_point))
                how[role] = "carried"
    return report


def from_sim(
    model: nn.Module,
    sim: torch.fx.GraphModule,
    data: CalibrationData,
    *,
    plan: BitPlan,
    batch_size: int = 64,
) -> torch.fx.GraphModule:
    """Carry a clamping FX simulation's weights and steps into a converted PT2E model.

    ``sim`` is a result of :func:`zq_plugin.reconstruct_fx`, :func:`zq_plugin.finetune` or
    :func:`zq_plugin.quantize_fx` (``fold=False``: its layers keep their weight FakeQuantize)
    on ``model`` with the same ``plan`` (so that FX, too, quantizes each layer's input at its
    ``a_bits``):

    1. the model with BatchNorm folded into its convolutions (as the simulation has it) gets the
       simulation's weights and biases (a weight that is ``s * q`` on its grid quantizes back
       to ``q`` bit for bit; a fine-tuned float weight rounds as the simulation rounds it);
    2. it is exported and prepared with :func:`plan_quantizer` at ``plan``, calibrated on
       ``data`` with the MSE observers (for what the simulation has no step for, e.g. the
       inputs of a residual ``add``);
    3. :func:`carry_steps` sets each layer's weight steps and input ``(scale, zero_point)`` to
       the simulation's; then :func:`convert`.

    Args:
        model: the float model the simulation was made from (not changed).
        sim: the FX simulation (not changed).
        data: calibration images (any source) for the steps the simulation does not have.
        plan: the per-layer bits the simulation was made with.
        batch_size: calibration batch size for tensor data.

    Returns:
        The converted model (eval mode, any batch size); ``.zq_carried`` counts the weight and
        input steps taken from the simulation. Its logits differ from the simulation's by the
        FakeQuantize FX puts on the last layer's output.

    Raises:
        ConfigError, ModelError: as :func:`quantize_pt2e`.
        MissingDependencyError: torchao is not installed.

    Example:
        >>> import torch, zq_plugin
        >>> from zq_plugin.plan import BitPlan
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> x = torch.randn(32, 1, 8, 8)
        >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)
        >>> q = from_sim(net, zq_plugin.quantize_fx(net, x, plan=plan, fold=False), x, plan=plan)
        >>> q(torch.randn(3, 1, 8, 8)).shape, q.zq_carried
        (torch.Size([3, 10]), {'weight_steps': 2, 'act_steps': 2, 'layers': 2})
    """
    from torch.fx.experimental.optimization import fuse

    from zq_plugin.backends.fx.sim import read_sim
    from zq_plugin.observers import pt2e as observers

    _compat.torchao_pt2e()
    plan.check(model)
    folded = fuse(copy.deepcopy(model).eval(), inplace=True)
    layers = read_sim(sim)
    with torch.no_grad():
        for name, layer in folded.named_modules():
            source = layers.get(name) if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) else None
            if source is None or source.weight.shape != layer.weight.shape:
                continue
            layer.weight.copy_(source.weight)
            if layer.bias is not None and source.bias is not None:
                layer.bias.copy_(source.bias)
    bits = {"plan": plan.traced(folded)}  # with a plan, _prepared reads no uniform bits
    chosen = {"act_observer": observers.MSEObserver, "weight_observer": observers.PerChannelMSEObserver}
    prepared = _prepared(folded, data, bits, chosen, batch_size, None, qat=False)
    carried = carry_steps(prepared, sim)
    converted = convert(prepared)
    converted.zq_carried = carried_counts(carried)  # type: ignore[assignment]
    converted.zq_steps = carried  # type: ignore[assignment]
    return converted


def _grid_bits(node: Any, qmin_index: int) -> tuple[int | None, str | None]:
    """``(bits, granularity)`` of a dequantize node (its ``quant_min``/``quant_max``); else ``(None, None)``."""
    import math

    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or "dequantize" not in str(node.target):
        return None, None
    per_channel = "per_channel" in str(node.target)
    index = qmin_index + (1 if per_channel else 0)  # dequantize_per_channel has an axis before the range
    levels = int(cast(int, node.args[index + 1])) - int(cast(int, node.args[index])) + 1
    return max(1, math.ceil(math.log2(levels))), "per_channel" if per_channel else "per_tensor"


def describe_converted(converted: torch.fx.GraphModule) -> dict[str, tuple[int | None, int | None, str | None]]:
    """``layer -> (w_bits, a_bits, granularity)`` of a converted PT2E model, read from its q/dq nodes, in graph order.

    A Conv/Linear whose weight or input is not dequantized from integers reports ``None`` there.
    """
    rows: dict[str, tuple[int | None, int | None, str | None]] = {}
    for node in converted.graph.nodes:
        if node.op != "call_function" or node.target not in TARGETS or len(node.args) < 2:
            continue
        w_bits, granularity = _grid_bits(node.args[1], 3)
        a_bits, _ = _grid_bits(node.args[0], 3)
        rows.setdefault(node.meta.get("zq_layer") or _weight_owner(node), (w_bits, a_bits, granularity))
    return rows


def float_ops_converted(converted: torch.fx.GraphModule) -> dict[str, list[str]]:
    """``kind -> node names`` of the aten ops a converted PT2E model computes in float, in graph order.

    Every aten call but the quantize/dequantize nodes, the weight ops (conv, linear) and the ops
    that move no values (``_utils.SHAPE_KINDS``): activations, gates, products, sums, pooling,
    computed in float on dequantized values. Module calls (torch.export's guard) compute nothing.

    Example:
        >>> from zq_plugin.backends.pt2e import quantize_pt2e
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> float_ops_converted(quantize_pt2e(net.eval(), torch.randn(8, 1, 6, 6)))
        {'hardswish': ['hardswish'], 'adaptive_avg_pool2d': ['adaptive_avg_pool2d']}
    """

    def skip(node: torch.fx.Node) -> bool:
        namespace = getattr(node.target, "namespace", None)
        return node.op == "call_module" or node.target in TARGETS or namespace in ("quantized_decomposed", "torchao")

    return graph_float_ops(converted, skip)
