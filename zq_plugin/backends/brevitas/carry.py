"""An FX simulation carried into Brevitas layers through the one seam ``read_sim`` (:func:`from_sim`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zq_plugin.backends import carried_counts
from zq_plugin.backends.brevitas.calibrate import calibrate
from zq_plugin.backends.brevitas.layers import _brevitas, _quant_layers, to_brevitas
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ModelError
from zq_plugin.plan import BitPlan
from zq_plugin.qparams import quant_range


@torch.no_grad()
def _rescale(value: torch.Tensor, current: torch.Tensor, target: torch.Tensor, read: Any = None) -> None:
    """Set a Brevitas scale parameter so that the quantizer's scale ``current`` becomes ``target`` exactly.

    The parameter is multiplied by ``target / current``; Brevitas derives the scale from it by a
    division, so the result can miss ``target`` by an ulp. With ``read`` (a function giving the
    quantizer's scale now) the parameter is then nudged one ulp at a time, per element, until the
    scale equals ``target`` bit for bit (a few steps at most), so a carried weight's
    ``q * scale`` equals the simulation's. Where the parameter's ulp divided by Brevitas's
    divisor (``2^(b-1) - 1`` for weights) is wider than the target's ulp, some targets have no
    parameter at all; the nudging then ends one ulp from the target (the integers are unaffected).
    """
    value.mul_((target.reshape(current.shape) / current).reshape(value.shape).to(value.dtype))
    if read is None:
        return
    goal = target.reshape(-1).to(value.dtype)
    for _ in range(8):
        now = read().detach().reshape(-1).to(value.dtype)
        if torch.equal(now, goal):
            return
        toward = torch.where(now < goal, torch.full_like(now, float("inf")), torch.full_like(now, float("-inf")))
        flat = value.detach().reshape(-1)
        moved = torch.where(now == goal, flat, torch.nextafter(flat, toward.expand_as(flat)))
        value.detach().copy_(moved.reshape(value.shape))


def from_sim(
    model: nn.Module, sim: Any, data: CalibrationData, *, plan: BitPlan, act_stats: str = "zq-mse"
) -> nn.Module:
    """Carry a clamping FX simulation's weights and steps into calibrated Brevitas layers.

    ``sim`` is a result of :func:`zq_plugin.reconstruct_fx` or :func:`zq_plugin.finetune` (or
    :func:`zq_plugin.quantize_fx` with ``fold=False``) on ``model`` at the bits of ``plan``; see
    :func:`reconstruct_brevitas` for what is carried: each layer's folded weight and bias and
    its per-channel weight step (Brevitas's round-to-nearest then gives the simulation's
    integers), and the input steps of layers with unsigned inputs; the other activation ranges
    are calibrated on ``data`` with ``act_stats``.

    Args:
        model: the float model the simulation was made from (not changed).
        sim: the FX simulation (not changed).
        data: calibration images (any source).
        plan: the simulation's per-layer bits (``BitPlan.uniform`` for uniform ones).
        act_stats: the statistic of the calibrated activation ranges (:func:`to_brevitas`).

    Returns:
        The calibrated Brevitas model (eval mode); ``.zq_carried`` counts the weight and
        activation steps taken from the simulation and the layers.

    Raises:
        ModelError: a Brevitas layer has no counterpart of the same shape in ``sim``.
        MissingDependencyError: Brevitas is not installed.

    Example:
        >>> import torch, zq_plugin
        >>> from zq_plugin.plan import BitPlan
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> x = torch.randn(32, 1, 8, 8)
        >>> plan = BitPlan.uniform(net, w_bits=4, a_bits=4)
        >>> q = from_sim(net, zq_plugin.quantize_fx(net, x, w_bits=4, a_bits=4, fold=False), x, plan=plan)
        >>> q.zq_carried["weight_steps"], q(torch.randn(2, 1, 8, 8)).shape
        (2, torch.Size([2, 10]))
    """
    from zq_plugin.backends.fx.sim import read_sim

    b = _brevitas()
    layers = read_sim(sim)
    qmodel = to_brevitas(model, plan, act_stats=act_stats, input_grid="affine")
    with torch.no_grad():
        for name, layer in _quant_layers(qmodel):
            source = layers.get(name)
            if source is None or source.weight.shape != layer.weight.shape:
                raise ModelError(
                    f"layer {name!r} has no counterpart of the same shape in the FX simulation; use the FX "
                    "simulation itself (zq_plugin.reconstruct_fx / finetune) for this model."
                )
            layer.weight.copy_(source.weight)
            layer.bias.copy_(source.bias if source.bias is not None else torch.zeros_like(layer.bias))
    calibrate(qmodel, data)  # every quantizer in its calibrated state; the simulation's steps replace the ranges
    steps: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        for name, layer in _quant_layers(qmodel):
            source = layers[name]
            how = steps[name] = {"weight": "calibrated", "input": "calibrated"}
            grid, w_quant = source.weight_grid, layer.weight_quant
            if grid is not None and grid.axis is not None and w_quant.is_quant_enabled:
                bits = int(w_quant.bit_width())
                if (grid.quant_min, grid.quant_max) == quant_range(bits, signed=True, narrow=True):
                    scaler = w_quant.tensor_quant.scaling_impl
                    target = grid.scale.to(layer.weight.device)
                    _rescale(scaler.value, layer.quant_weight().scale, target, lambda q=layer: q.quant_weight().scale)
                    how["weight"] = "carried"
            grid, i_quant = source.input_grid, layer.input_quant
            if grid is None or not i_quant.is_quant_enabled:
                continue
            bits = int(i_quant.bit_width())
            if (grid.quant_min, grid.quant_max) != quant_range(bits, signed=False, narrow=False):
                continue
            scaler = next(m for m in i_quant.modules() if isinstance(m, b["runtime_scaling"]))
            zero_point = next((m for m in i_quant.modules() if isinstance(m, b["runtime_zero_point"])), None)
            if zero_point is None and int(grid.zero_point[0]) != 0:
                continue
            target = grid.scale.to(layer.weight.device)
            _rescale(scaler.value, i_quant.scale(), target, i_quant.scale)
            if zero_point is not None:
                zero_point.value.detach().fill_(float(grid.zero_point[0]) * float(target[0]))
            how["input"] = "carried"
    qmodel.zq_carried = carried_counts(steps)  # type: ignore[assignment]
    qmodel.zq_steps = steps  # type: ignore[assignment]
    return qmodel
