"""Pareto-optimal bit allocation: minimum total sensitivity for every weight-size budget.

ZeroQ's problem (methods.md §2.5), with sensitivities assumed additive over layers::

    min_{k_1..k_L}  sum_i Omega_i(k_i)    subject to    sum_i P_i k_i <= S

``P_i`` is the weight count of layer ``i`` and ``k_i`` its bit width from a candidate set.

:func:`pareto_frontier` solves it **exactly** for every budget at once, by dynamic programming
over layers with dominance pruning: after layer ``i`` the partial assignments are sorted by
cost and only those whose total sensitivity is strictly below that of every cheaper one are
kept. An optimal assignment's prefix can always be swapped for a kept prefix of no greater
cost and no greater sensitivity, so nothing optimal is lost; the final list is the frontier.
Costs are integers (weight bits), so there is no binning error. The list holds at most one
entry per distinct cost: a few hundred to a few thousand entries for CNNs under a weight-size
budget, up to about a million under a bit-operations budget with 49 (weight, input) options per
layer, so each layer's candidates are built, sorted and pruned as arrays (numpy), not Python
tuples (275 s to about 5 s for mobilenetv3_s's 34 layers).

Example:
    >>> front = pareto_frontier([[2, 4], [2, 4]], [[1.0, 0.0], [5.0, 0.5]])
    >>> [(p.cost, p.sensitivity, p.choice) for p in front]
    [(4, 6.0, (0, 0)), (6, 1.5, (0, 1)), (8, 0.5, (1, 1))]
    >>> best_under(front, 7).choice
    (0, 1)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from zq_plugin.errors import ConfigError


@dataclass(frozen=True)
class FrontierPoint:
    """One Pareto-optimal assignment.

    Attributes:
        cost: total cost (weight bits, ``sum_i P_i k_i``).
        sensitivity: total sensitivity ``sum_i Omega_i(k_i)``.
        choice: index of the chosen option for each layer.
    """

    cost: int
    sensitivity: float
    choice: tuple[int, ...]


def pareto_frontier(costs: Sequence[Sequence[int]], sensitivities: Sequence[Sequence[float]]) -> list[FrontierPoint]:
    """All Pareto-optimal assignments, by increasing cost and strictly decreasing sensitivity.

    Args:
        costs: ``[L][K_i]`` non-negative integer cost of option ``k`` of layer ``i``.
        sensitivities: ``[L][K_i]`` finite sensitivity of the same options.

    Returns:
        The frontier: the cheapest point first, the least sensitive last.

    Raises:
        ConfigError: empty input, ragged or mismatched shapes, negative costs, non-finite values.
    """
    if not costs or len(costs) != len(sensitivities):
        raise ConfigError(
            f"pareto_frontier needs one row of options per layer in both costs ({len(costs)} rows) and "
            f"sensitivities ({len(sensitivities)} rows), at least one."
        )
    for i, (c, s) in enumerate(zip(costs, sensitivities, strict=True)):
        if not c or len(c) != len(s):
            raise ConfigError(f"layer {i}: {len(c)} costs but {len(s)} sensitivities; give one of each per option.")
        if any(int(v) != v or v < 0 for v in c) or not all(math.isfinite(v) for v in s):
            raise ConfigError(f"layer {i}: costs {list(c)} must be non-negative integers and sensitivities finite.")
    # each layer's kept nodes: cost, sensitivity, parent index in the previous layer's list, option
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    front_cost = np.zeros(1, dtype=np.int64)
    front_sens = np.zeros(1, dtype=np.float64)
    for c, s in zip(costs, sensitivities, strict=True):
        opt_cost = np.asarray([int(v) for v in c], dtype=np.int64)
        opt_sens = np.asarray(s, dtype=np.float64)
        # an option no cheaper and no less sensitive than another (the first of exact twins stays)
        # never ends on the frontier: every candidate it makes is beaten by its sibling's
        useful = np.flatnonzero(_undominated(opt_cost, opt_sens))
        k = len(useful)
        # candidates in parent-major, option-minor order (a stable sort keeps it among equal keys)
        cand_cost = (front_cost[:, None] + opt_cost[useful][None, :]).reshape(-1)
        cand_sens = (front_sens[:, None] + opt_sens[useful][None, :]).reshape(-1)
        order = np.lexsort((cand_sens, cand_cost))  # by cost, then sensitivity; stable
        cand_cost, cand_sens = cand_cost[order], cand_sens[order]
        # keep a node strictly less sensitive than every cheaper kept one (equal cost: its better twin first)
        before = np.concatenate(([np.inf], np.minimum.accumulate(cand_sens)[:-1]))
        keep = cand_sens < before
        chosen = order[keep]
        front_cost, front_sens = cand_cost[keep], cand_sens[keep]
        levels.append((front_cost, front_sens, chosen // k, useful[chosen % k]))
    final_cost, final_sens = levels[-1][0], levels[-1][1]
    index = np.arange(len(final_cost))
    options = []
    for level in reversed(levels):  # follow the back-pointers, every point at once
        options.append(level[3][index])
        index = level[2][index]
    choices = np.stack(options[::-1], axis=1).tolist()  # [points, layers]
    points = [
        FrontierPoint(cost=cost, sensitivity=sens, choice=tuple(choice))
        for cost, sens, choice in zip(final_cost.tolist(), final_sens.tolist(), choices, strict=True)
    ]
    return points


def _undominated(cost: np.ndarray, sens: np.ndarray) -> np.ndarray:
    """``[K]`` bool: whether option ``k`` can end on the frontier.

    It cannot when an earlier option matches or beats it in both cost and sensitivity, or a later
    one beats it (matches both, strictly better in one).
    """
    le = (cost[:, None] <= cost[None, :]) & (sens[:, None] <= sens[None, :])  # [j, k]: j at least as good as k
    strictly = (cost[:, None] < cost[None, :]) | (sens[:, None] < sens[None, :])
    earlier = np.tri(len(cost), k=-1, dtype=bool)  # [j, k]: j < k
    beaten = le & (strictly | earlier)
    return ~beaten.any(axis=0)


def best_under(frontier: Sequence[FrontierPoint], budget: float) -> FrontierPoint:
    """The least sensitive frontier point of cost ``<= budget``.

    Raises:
        ConfigError: the budget is below the cheapest point; the message gives the feasible range.
    """
    feasible = [p for p in frontier if p.cost <= budget]
    if not feasible:
        raise ConfigError(
            f"budget {budget:,.0f} bits is below the smallest possible plan ({frontier[0].cost:,} bits); "
            f"the feasible range is {frontier[0].cost:,} to {frontier[-1].cost:,} bits."
        )
    return feasible[-1]


_BYTES = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A weight-size budget: exactly one of bytes, an average bit width, or a uniform k-bit model's size.

    Attributes:
        bytes: weight size in bytes (Conv/Linear weights only).
        average_bits: average bits per weight.
        uniform_bits: the size of the same model with every Conv/Linear weight at this many bits
            (ZeroQ's "MP4" is ``uniform_bits=4``).

    Example:
        >>> Budget.parse("MP4"), Budget.parse("4.5avg").bits(1000), Budget.parse("2KiB").bits(1000)
        (Budget(bytes=None, average_bits=None, uniform_bits=4), 4500, 16384)
    """

    bytes: float | None = None
    average_bits: float | None = None
    uniform_bits: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.bytes, self.average_bits, self.uniform_bits) if v is not None]
        if len(given) != 1:
            raise ConfigError(
                "a Budget takes exactly one of bytes=..., average_bits=... or uniform_bits=... "
                f"(got {self!r}); e.g. Budget(uniform_bits=4) for the size of a uniform 4-bit model."
            )
        if not given[0] > 0 or not math.isfinite(given[0]):
            raise ConfigError(f"budget {given[0]!r} must be a positive, finite number.")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """From ``"MP4"``/``"4bit"`` (uniform), ``"4.5avg"`` (average bits) or ``"120KB"``/``"1.5MiB"``/``"9000B"``."""
        t = text.strip().lower().replace(" ", "")
        if m := re.fullmatch(r"(?:mp|uniform)(\d+)|(\d+)bits?", t):
            return cls(uniform_bits=int(m.group(1) or m.group(2)))
        if m := re.fullmatch(r"avg(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)avg", t):
            return cls(average_bits=float(m.group(1) or m.group(2)))
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)(b|kb|kib|mb|mib)", t):
            return cls(bytes=float(m.group(1)) * _BYTES[m.group(2)])
        raise ConfigError(
            f"budget {text!r} not understood: use 'MP4' or '4bit' (size of a uniform 4-bit model), "
            "'4.5avg' (average bits per weight), or a size such as '120KB', '1.5MiB', '9000B'."
        )

    def bits(self, total_params: int) -> int:
        """The budget in weight bits for a model with ``total_params`` Conv/Linear weights."""
        if self.bytes is not None:
            return int(self.bytes * 8)
        per_weight = self.average_bits if self.average_bits is not None else self.uniform_bits
        return math.floor(float(per_weight) * total_params + 1e-9)  # type: ignore[arg-type]
