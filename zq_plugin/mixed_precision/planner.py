"""From data to a BitPlan: ZeroQ's Pareto search and Retro-Synthesis's hybrid granularity.

* :func:`pareto_plan`: measure Omega_i(k) (:func:`~zq_plugin.mixed_precision.sensitivity.measure_sensitivity`),
  solve the frontier exactly (:func:`~zq_plugin.mixed_precision.pareto.pareto_frontier`) and
  read off the plan for a weight-size budget. Activations stay uniform (ZeroQ: MP4 weights with
  A8, MP6 with A6).
* :func:`hybrid_plan`: per layer, per-tensor weights when their sensitivity is within
  ``threshold`` of per-channel at the layer's planned bits, else per-channel (methods.md §4.2).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> result = pareto_plan(net, torch.randn(32, 1, 8, 8), budget="MP6", progress=False)
    >>> result.plan.weight_bits() <= 6 * (36 + 1440), len(result.frontier) >= 2
    (True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from zq_plugin._utils import OutputFn, weight_layers
from zq_plugin.backends.fx import check_traceable
from zq_plugin.data import CalibrationData
from zq_plugin.errors import ConfigError
from zq_plugin.mixed_precision.pareto import Budget, FrontierPoint, best_under, pareto_frontier
from zq_plugin.mixed_precision.sensitivity import HybridChoice, Sensitivity, measure_sensitivity
from zq_plugin.plan import BitPlan, Granularity, Grid, LayerBits
from zq_plugin.qparams import check_bits


@dataclass(frozen=True)
class PlanResult:
    """A plan and how it was chosen.

    Attributes:
        plan: the plan at the budget.
        frontier: every Pareto-optimal point (cost in weight bits), cheapest first.
        sensitivity: the measured sensitivities.
        budget_bits: the budget in weight bits.
        a_bits: the activation bits given to every layer.
        options: the candidate bit widths searched for each layer (one entry for a fixed layer).
    """

    plan: BitPlan
    frontier: list[FrontierPoint]
    sensitivity: Sensitivity
    budget_bits: int
    a_bits: int = 8
    options: tuple[tuple[int, ...], ...] = ()

    def plan_at(self, point: FrontierPoint) -> BitPlan:
        """The plan of any frontier point (e.g. to measure accuracy along the frontier)."""
        return _plan_from_choice(self.sensitivity, self.options, point, self.a_bits)

    def frontier_rows(self) -> list[dict[str, Any]]:
        """``{"bytes", "average_bits", "sensitivity"}`` per frontier point, for plots and JSON."""
        total = sum(self.sensitivity.params)
        return [
            {"bytes": p.cost / 8, "average_bits": p.cost / total, "sensitivity": p.sensitivity} for p in self.frontier
        ]


def _plan_from_choice(
    sens: Sensitivity, options: tuple[tuple[int, ...], ...], point: FrontierPoint, a_bits: int
) -> BitPlan:
    layers = {
        name: LayerBits(
            w_bits=options[i][point.choice[i]], a_bits=a_bits, granularity=sens.granularity, grid=sens.grid, params=p
        )
        for i, (name, p) in enumerate(zip(sens.layers, sens.params, strict=True))
    }
    return BitPlan(
        layers, {"source": "pareto", "weight_bits": point.cost, "sensitivity": point.sensitivity, "a_bits": a_bits}
    )


def pareto_plan(
    model: nn.Module,
    data: CalibrationData | None = None,
    *,
    budget: Budget | str,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 7, 8),
    a_bits: int = 8,
    fixed: Mapping[str, int] | None = None,
    sensitivity: Sensitivity | None = None,
    granularity: Granularity = "per_channel",
    grid: Grid = "uniform",
    progress: bool = True,
    output_fn: OutputFn | None = None,
    **measure: Any,
) -> PlanResult:
    """The minimum-sensitivity plan within a weight-size budget, and the whole frontier.

    Args:
        model: the float model.
        data: images for the sensitivities (synthetic, e.g. ``synthesize(model, "zeroq")``).
        budget: a :class:`Budget` or a string for :meth:`Budget.parse` (``"MP4"``: the size of
            the model with every Conv/Linear weight at 4 bits; ``"4.5avg"``; ``"120KB"``).
        bits: candidate weight bit widths. Default: every width 2..8. ZeroQ's paper used
            {2, 4, 8}; with those a 4-bit budget can raise a layer to 8 bits only by dropping
            others to 2, and on the zoo's resnet_s MP4 stays uniform 4-bit. The measurement
            costs len(bits) quantized forward passes per layer: 2..8 took 1.4x to 2.5x the
            time of {2, 4, 8} on the zoo (docs/mixed_precision.md).
        a_bits: activation bits of every layer's input (uniform, as in ZeroQ).
        fixed: ``layer -> bits`` for layers whose weight bits are not searched (e.g. ``{"fc": 8}``).
        sensitivity: reuse a measurement (then ``data`` may be None).
        granularity: weight granularity of the plan and of the measurement.
        grid: weight grid of the plan and of the measurement.
        progress: tqdm bar while measuring.
        output_fn: picks the logits of a model with several outputs (default: first tensor of a
            tuple, ``"logits"``/``"out"`` of a dict; :func:`zq_plugin._utils.select_output`).
        **measure: passed to :func:`measure_sensitivity` (``batch_size``, ``max_batches``).

    Layers inside modules that torch.fx does not descend into (``nn.MultiheadAttention``) are
    neither planned nor budgeted: no backend quantizes them.

    Raises:
        ConfigError: the budget is below the smallest or above the largest plan, unknown layers in
            ``fixed``, bad bits, empty data.
        ModelError: the model does not trace (the FX backend could not apply the plan).
    """
    check_bits(a_bits, "a_bits")
    check_traceable(model, "pareto_plan")
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    if sensitivity is None:
        if data is None:
            raise ConfigError("pareto_plan needs data (synthetic images) or a precomputed sensitivity=...")
        extra = sorted(set(fixed or {}) - set(weight_layers(model)))
        if extra:  # before the measurement, which takes a while
            raise ConfigError(f"fixed names {extra}, which are not Conv/Linear layers of {type(model).__name__}.")
        sensitivity = measure_sensitivity(
            model,
            data,
            bits=bits,
            granularity=granularity,
            grid=grid,
            progress=progress,
            output_fn=output_fn,
            **measure,
        )
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(sensitivity.layers))
    if unknown:
        raise ConfigError(
            f"fixed names layers {unknown} that are not measured Conv/Linear layers: {sensitivity.layers}."
        )
    options: list[tuple[int, ...]] = []
    costs, omegas = [], []
    for name, p, row in zip(sensitivity.layers, sensitivity.params, sensitivity.weight, strict=True):
        ks: tuple[int, ...] = sensitivity.bits
        if name in fixed:
            k = check_bits(fixed[name], f"fixed[{name!r}]")
            if k not in sensitivity.bits:
                raise ConfigError(f"fixed[{name!r}]={k} is not among the measured bits {sensitivity.bits}.")
            ks = (k,)
        options.append(ks)
        costs.append([p * k for k in ks])
        omegas.append([row[sensitivity.bits.index(k)] for k in ks])
    frontier = pareto_frontier(costs, omegas)
    budget_bits = budget.bits(sum(sensitivity.params))
    largest = sum(max(c) for c in costs)  # every layer at its widest candidate
    if budget_bits > largest:
        raise ConfigError(
            f"budget {budget_bits:,} bits ({budget_bits / 8:,.0f} bytes) is above the largest plan "
            f"({largest:,} bits, every layer at its widest candidate); the feasible range is "
            f"{frontier[0].cost:,} to {largest:,} bits. Lower the budget or add wider candidates."
        )
    point = best_under(frontier, budget_bits)
    opts = tuple(options)
    plan = _plan_from_choice(sensitivity, opts, point, a_bits).check(model)  # a measurement of another model fails
    return PlanResult(plan, frontier, sensitivity, budget_bits, a_bits, opts)


def hybrid_plan(
    model: nn.Module,
    data: CalibrationData,
    plan: BitPlan,
    *,
    threshold: float = 1e-4,
    progress: bool = True,
    output_fn: OutputFn | None = None,
    **measure: Any,
) -> tuple[BitPlan, HybridChoice]:
    """Retro-Synthesis's hybrid granularity on top of ``plan``.

    For each layer, Omega with per-tensor and with per-channel weights at the layer's planned
    bits; per-tensor when ``Omega_pt - Omega_pc <= threshold`` (cheaper inference: one scale per
    tensor), per-channel otherwise.

    Args:
        model: the float model.
        data: images for the sensitivities.
        plan: the plan to refine (its bits stay).
        threshold: the tolerance on the KL sensitivity. Retro-Synthesis uses "a small constant"
            (recalled as 1e-3, unverified); 1e-4 by measurement: at 1e-3 plain_cnn W4A8 went
            all per-tensor and lost 0.5 points, mobilenetv2_s W4A8 0.15 (docs/results.md).
        progress: tqdm bars.
        output_fn: picks the logits of a model with several outputs (as in :func:`pareto_plan`).
        **measure: passed to :func:`measure_sensitivity`.

    Returns:
        The new plan (meta ``per_tensor_share``) and the per-layer decisions.

    Raises:
        ConfigError: a negative threshold, a plan naming layers the model lacks.
        ModelError: the model does not trace (the FX backend could not apply the plan).
    """
    if not threshold >= 0:
        raise ConfigError(f"threshold={threshold} must be >= 0 (a KL tolerance, e.g. 1e-4).")
    check_traceable(model, "hybrid_plan")
    plan.check(model)
    per_tensor: dict[str, float] = {}
    per_channel: dict[str, float] = {}
    for k in sorted({b.w_bits for b in plan.layers.values()}):
        names = [n for n, b in plan.layers.items() if b.w_bits == k]
        pairs: tuple[tuple[Granularity, dict[str, float]], ...] = (
            ("per_tensor", per_tensor),
            ("per_channel", per_channel),
        )
        for granularity, out in pairs:
            sens = measure_sensitivity(
                model,
                data,
                bits=(k,),
                granularity=granularity,
                layers=names,
                progress=progress,
                output_fn=output_fn,
                **measure,
            )
            out.update({n: row[0] for n, row in zip(sens.layers, sens.weight, strict=True)})
    decisions: dict[str, Granularity] = {
        n: ("per_tensor" if per_tensor[n] - per_channel[n] <= threshold else "per_channel") for n in plan
    }
    layers = {n: replace(b, granularity=decisions[n]) for n, b in plan.layers.items()}
    choice = HybridChoice(decisions, per_tensor, per_channel, threshold)
    meta = {**plan.meta, "hybrid_threshold": threshold, "per_tensor_share": choice.per_tensor_share}
    return BitPlan(layers, meta), choice
