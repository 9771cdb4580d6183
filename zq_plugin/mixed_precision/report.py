"""Reports of a mixed-precision search: which frontier points to measure, and the frontier plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def chosen_index(rows: list[dict[str, Any]], budget_average_bits: float) -> int:
    """Index of the frontier row the budget picks: the largest with ``average_bits`` within the budget."""
    inside = [i for i, r in enumerate(rows) if r["average_bits"] <= budget_average_bits]
    return inside[-1] if inside else 0


def points_to_measure(rows: list[dict[str, Any]], budget_average_bits: float, k: int) -> list[int]:
    """Indices of up to ``k`` frontier rows to measure around the plan the budget picks.

    In order of priority: the frontier point nearest to one average bit *below* the chosen plan
    (among the cheaper ones), the one nearest to one bit *above* the budget (among the dearer
    ones), the cheapest and the largest point, then, one by one, the point farthest in average
    bits from every point so far.
    The chosen plan itself is measured apart and never picked. Returned sorted by size.

    Args:
        rows: :meth:`PlanResult.frontier_rows`, cheapest first.
        budget_average_bits: the budget in average weight bits.
        k: how many points at most.
    """
    if k <= 0 or not rows:
        return []
    c = chosen_index(rows, budget_average_bits)
    bits = [r["average_bits"] for r in rows]
    below = range(c)
    above = [i for i in range(c + 1, len(rows)) if bits[i] > budget_average_bits]
    order: list[int] = []
    if below:
        order.append(min(below, key=lambda i: abs(bits[i] - (bits[c] - 1))))
    if above:
        order.append(min(above, key=lambda i: abs(bits[i] - (budget_average_bits + 1))))
    order += [0, len(rows) - 1]
    picked: list[int] = []
    for i in order:
        if i != c and i not in picked and len(picked) < k:
            picked.append(i)
    rest = [i for i in range(len(rows)) if i != c and i not in picked]
    while rest and len(picked) < k:  # fill the widest gap: the row farthest from every point so far
        i = max(rest, key=lambda j: min(abs(bits[j] - bits[p]) for p in [c, *picked]))
        picked.append(i)
        rest.remove(i)
    return sorted(picked)


_CHOSEN_STYLE: dict[str, Any] = {"marker": "*", "s": 220, "color": "tab:green", "edgecolors": "black", "zorder": 4}


def plot_frontier(
    path: Path,
    rows: list[dict[str, Any]],
    measured: list[dict[str, Any]],
    title: str,
    *,
    budget_average_bits: float | None = None,
    budget_label: str = "budget",
) -> Any:
    """Write the frontier (weight size vs total sensitivity) as a PNG, measured top-1 on a second axis.

    The frontier is a step line (it is exact: the least sensitivity at every size). Measured
    top-1 values are markers only, never joined: between two measured sizes the accuracy is
    not known. The chosen plan (the entry of ``measured`` with ``"chosen": True``, or the row
    the budget picks when nothing was measured) is a labelled star, the budget a labelled
    vertical line.

    Args:
        path: the PNG to write (its folder is created).
        rows: :meth:`PlanResult.frontier_rows`.
        measured: ``{"average_bits", "top1", "chosen"}`` per measured plan.
        title: the plot's title.
        budget_average_bits: the budget in average weight bits (``None``: no budget line).
        budget_label: the budget as the user wrote it (e.g. ``"MP4"``).

    Returns:
        The (closed) matplotlib figure, whose artists and labels tests can read.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from zq_plugin.errors import MissingDependencyError

        raise MissingDependencyError(
            "the frontier plot needs matplotlib: pip install 'zq-plugin[plot]' (or pass --no-plot)."
        ) from exc
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [r["average_bits"] for r in rows]
    handles: list[Any] = ax.step(
        xs, [r["sensitivity"] for r in rows], where="post", color="tab:blue", label="frontier: total sensitivity"
    )
    ax.set_xlabel("average weight bits (Conv/Linear)")
    ax.set_ylabel("total sensitivity (sum of KL)", color="tab:blue")
    ax.set_yscale("symlog", linthresh=1e-4)
    if budget_average_bits is not None:
        line = ax.axvline(
            budget_average_bits,
            color="tab:gray",
            linestyle="--",
            label=f"budget {budget_label} = {budget_average_bits:.2f} bits",
        )
        handles.append(line)
    chosen = [m for m in measured if m.get("chosen")]
    others = [m for m in measured if not m.get("chosen")]
    if measured:
        top = ax.twinx()
        if others:
            handles.append(
                top.scatter(
                    [m["average_bits"] for m in others],
                    [m["top1"] for m in others],
                    marker="o",
                    color="tab:red",
                    zorder=3,
                    label="measured top-1 (not interpolated)",
                )
            )
        for m in others:
            top.annotate(f"{m['top1']:.2f}", (m["average_bits"], m["top1"]), textcoords="offset points", xytext=(4, 4))
        for m in chosen:
            handles.append(
                top.scatter(
                    [m["average_bits"]],
                    [m["top1"]],
                    **_CHOSEN_STYLE,
                    label=f"chosen plan: {m['average_bits']:.2f} bits, {m['top1']:.2f} %",
                )
            )
            top.annotate(
                f"chosen {m['top1']:.2f}",
                (m["average_bits"], m["top1"]),
                textcoords="offset points",
                xytext=(6, -14),
                color="tab:green",
            )
        top.set_ylabel("measured top-1 (%)", color="tab:red")
    elif budget_average_bits is not None and rows:  # nothing measured: the chosen plan on the frontier
        c = rows[chosen_index(rows, budget_average_bits)]
        handles.append(
            ax.scatter(
                [c["average_bits"]],
                [c["sensitivity"]],
                **_CHOSEN_STYLE,
                label=f"chosen plan: {c['average_bits']:.2f} bits",
            )
        )
    if rows:
        ax.set_xlim(right=max(xs) + 0.6)  # room for the last label
    ax.legend(handles=handles, loc="center right", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
