"""Weight and input bits per layer under a bit-operations budget: precision where it pays (issue 30).

A uniform W4A4 plan gives every layer the same bits whether its weights or its input are
fragile or not. On MobileNetV3/EfficientNet-style nets a few inputs (Hardswish and SiLU
outputs, the gated features after squeeze-excitation) carry most of the low-bit error. Here
both widths of every layer are chosen at once, for the cost of running the model:

    min_{(w_i, a_i)}  sum_i Omega^W_i(w_i) + Omega^A_i(a_i)
    subject to        sum_i MACs_i * w_i * a_i  <=  B

``Omega^W_i(k)`` and ``Omega^A_i(k)`` are ZeroQ's sensitivities (methods.md §2.4) of layer
``i``'s weights and of its input at ``k`` bits, each measured with every other layer float
(:func:`~zq_plugin.mixed_precision.sensitivity.measure_sensitivity`, inputs on the MSE range
the recipe's observers use), and assumed additive, as ZeroQ assumes across layers. The cost is
the layer's bit operations (BOPs: multiply-accumulates per image times the two widths, as in
HAWQ-V3, Yao et al., ICML 2021, and DJPQ). ``B`` is the BOPs of a reference uniform plan
(``"W4A4"``: every layer at W4A4 with the first and last at ``first_last_bits``). The search is
ZeroQ's exact Pareto frontier (:func:`~zq_plugin.mixed_precision.pareto.pareto_frontier`) over
the (weight, input) pairs of each layer.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
    ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10)).eval()
    >>> result = bops_plan(net, torch.randn(32, 1, 8, 8), budget="W4A4", progress=False)
    >>> result.bops <= result.budget_bops, sorted(result.plan.layers)
    (True, ['0', '2', '5'])
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zq_plugin._utils import OutputFn, input_placement, place, weight_layer_names, weight_layers
from zq_plugin.backends.fx import check_traceable
from zq_plugin.data import CalibrationData, collect_batches
from zq_plugin.errors import ConfigError
from zq_plugin.mixed_precision.pareto import FrontierPoint, best_under, pareto_frontier
from zq_plugin.mixed_precision.sensitivity import Sensitivity, measure_sensitivity
from zq_plugin.plan import BitPlan, LayerBits
from zq_plugin.qparams import check_bits

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every Conv/Linear layer, counted on one forward of ``example``.

    Conv: output elements times ``in_channels / groups`` times the kernel size; ConvTranspose:
    input elements times ``out_channels / groups`` times the kernel size; Linear: output elements
    times ``in_features``. Divided by the batch size of ``example`` (``[N, ...]``).

    Example:
        >>> layer_macs(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), torch.zeros(2, 1, 5, 5))
        {'0': 162}
    """
    layers = weight_layers(model)
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def count(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0]
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                kernel = math.prod(module.kernel_size)
                macs[name] = macs.get(name, 0) + x.numel() * module.out_channels // module.groups * kernel
            elif isinstance(module, nn.modules.conv._ConvNd):
                kernel = math.prod(module.kernel_size)
                macs[name] = macs.get(name, 0) + out.numel() * module.in_channels // module.groups * kernel
            elif isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + out.numel() * module.in_features

        return count

    for name, module in layers.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    batch = max(int(example.shape[0]), 1)
    return {name: macs.get(name, 0) // batch for name in layers}


def parse_bops_budget(text: str) -> tuple[int, int]:
    """``"W4A4"`` -> ``(4, 4)``: the uniform plan whose bit operations are the budget.

    Raises:
        ConfigError: anything else.
    """
    match = re.fullmatch(r"\s*[wW](\d)\s*[aA](\d)\s*", text)
    if not match:
        raise ConfigError(
            f"budget {text!r} not understood: name the uniform plan whose bit operations to spend, e.g. 'W4A4' "
            "(every layer at 4-bit weights and inputs, first and last at first_last_bits), or pass BOPs as an int."
        )
    w, a = int(match.group(1)), int(match.group(2))
    return check_bits(w, "budget's weight bits"), check_bits(a, "budget's input bits")


@dataclass(frozen=True)
class BopsPlanResult:
    """A joint (weight, input) plan and how it was chosen.

    Attributes:
        plan: the plan at the budget.
        frontier: every Pareto-optimal point (cost in BOPs per image, sensitivity), cheapest first.
        sensitivity: the measured sensitivities (weights and inputs).
        macs: multiply-accumulates per image of each layer.
        budget_bops: the budget in bit operations per image.
        bops: the plan's bit operations per image.
        options: the (weight bits, input bits) pairs searched for each layer, in
            ``sensitivity.layers`` order.
    """

    plan: BitPlan
    frontier: list[FrontierPoint]
    sensitivity: Sensitivity
    macs: dict[str, int]
    budget_bops: int
    bops: int
    options: tuple[tuple[tuple[int, int], ...], ...]

    def table(self) -> str:
        """A Markdown table: each layer's MACs, chosen weight and input bits, and its share of the BOPs."""
        rows = ["| layer | MACs | W | A | BOPs share |", "|---|---|---|---|---|"]
        for name, bits in self.plan.layers.items():
            share = self.macs[name] * bits.w_bits * bits.a_bits / max(self.bops, 1)
            rows.append(f"| {name} | {self.macs[name]:,} | {bits.w_bits} | {bits.a_bits} | {share:.1%} |")
        return "\n".join(rows)


def bops_plan(
    model: nn.Module,
    data: CalibrationData | None = None,
    *,
    budget: str | int = "W4A4",
    w_bits: Sequence[int] = DEFAULT_BITS,
    a_bits: Sequence[int] = DEFAULT_BITS,
    first_last_bits: int | None = 8,
    sensitivity: Sensitivity | None = None,
    batch_size: int = 64,
    max_batches: int | None = 4,
    progress: bool = True,
    output_fn: OutputFn | None = None,
) -> BopsPlanResult:
    """The least-sensitive plan of weight and input bits whose bit operations fit ``budget``.

    Args:
        model: the float model (not changed).
        data: images for the sensitivities and the MAC count (synthetic ones: no real data needed).
        budget: ``"W4A4"``-style (the BOPs of that uniform plan, first and last layer at
            ``first_last_bits``) or bit operations per image as an int.
        w_bits: candidate weight bits of each searched layer (2-8).
        a_bits: candidate input bits of each searched layer (2-8).
        first_last_bits: the first and last layer (execution order) keep these bits for both
            (``None``: searched like the others).
        sensitivity: reuse a measurement (weights and inputs at the union of ``w_bits`` and
            ``a_bits``); then ``data`` still gives the MAC count.
        batch_size: images per sensitivity pass.
        max_batches: at most this many batches for the sensitivities (``None``: all); 4 x 64
            images rank the layers as well as 256 did on the zoo, at a quarter of the time.
        progress: a tqdm bar while measuring.
        output_fn: picks the logits of a model with several outputs.

    Returns:
        A :class:`BopsPlanResult`; its ``plan`` goes to any backend (``zq_plugin.quantize(plan=...)``).

    Raises:
        ConfigError: an unknown budget, a budget below the cheapest plan, bad bits, no data.
        ModelError: the model does not trace.
    """
    check_traceable(model, "bops_plan")
    ws = tuple(sorted({check_bits(k, "w_bits") for k in w_bits}))
    as_ = tuple(sorted({check_bits(k, "a_bits") for k in a_bits}))
    if first_last_bits is not None:
        check_bits(first_last_bits, "first_last_bits")
    if data is None:
        raise ConfigError("bops_plan needs data (synthetic images) to count MACs and measure sensitivities.")
    batches = collect_batches(data, batch_size, max_batches)
    if not batches:
        raise ConfigError("bops_plan got no images.")
    device, dtype = input_placement(model)
    macs = layer_macs(model, place(batches[0], device, dtype))
    order = weight_layer_names(model)
    ends = {order[0], order[-1]} if first_last_bits is not None else set()
    measured = tuple(sorted(set(ws) | set(as_) | ({first_last_bits} if first_last_bits is not None else set())))
    if sensitivity is None:
        sensitivity = measure_sensitivity(
            model, batches, bits=measured, activations=True, act_range="mse", progress=progress, output_fn=output_fn
        )
    if sensitivity.activation is None:
        raise ConfigError("the sensitivity= given has no input sensitivities: measure it with activations=True.")
    missing = sorted(set(measured) - set(sensitivity.bits))
    if missing:
        raise ConfigError(f"sensitivity= lacks bits {missing}; measure it at {list(measured)}.")
    if isinstance(budget, str):
        bw, ba = parse_bops_budget(budget)
        budget_bops = sum(
            macs[n] * ((first_last_bits or bw) if n in ends else bw) * ((first_last_bits or ba) if n in ends else ba)
            for n in sensitivity.layers
        )
    elif isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        budget_bops = budget
    else:
        raise ConfigError(f"budget={budget!r}: give 'W4A4'-style text or a positive int of bit operations.")
    options: list[tuple[tuple[int, int], ...]] = []
    costs: list[list[int]] = []
    omegas: list[list[float]] = []
    for i, name in enumerate(sensitivity.layers):
        if name in ends:
            pairs: tuple[tuple[int, int], ...] = ((int(first_last_bits or 8), int(first_last_bits or 8)),)
        else:
            pairs = tuple((w, a) for w in ws for a in as_)
        options.append(pairs)
        costs.append([macs[name] * w * a for w, a in pairs])
        omegas.append(
            [
                sensitivity.weight[i][sensitivity.bits.index(w)] + sensitivity.activation[i][sensitivity.bits.index(a)]
                for w, a in pairs
            ]
        )
    frontier = pareto_frontier(costs, omegas)
    point = best_under(frontier, budget_bops)
    layers = {}
    for i, name in enumerate(sensitivity.layers):
        w, a = options[i][point.choice[i]]
        layers[name] = LayerBits(w_bits=w, a_bits=a, params=sensitivity.params[i])
    meta = {"source": "bops", "budget": budget if isinstance(budget, str) else int(budget), "bops": point.cost}
    plan = BitPlan(layers, meta).check(model)
    return BopsPlanResult(plan, frontier, sensitivity, macs, budget_bops, point.cost, tuple(options))
