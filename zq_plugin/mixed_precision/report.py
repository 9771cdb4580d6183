"""Reports of a mixed-precision search: the frontier plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_frontier(path: Path, rows: list[dict[str, Any]], measured: list[dict[str, Any]], title: str) -> None:
    """Write the frontier (weight size vs total sensitivity) as a PNG, measured top-1 on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from zq_plugin.errors import MissingDependencyError

        raise MissingDependencyError(
            "the frontier plot needs matplotlib: pip install 'zq-plugin[plot]' (or pass --no-plot)."
        ) from exc
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.step([r["average_bits"] for r in rows], [r["sensitivity"] for r in rows], where="post", color="tab:blue")
    ax.set_xlabel("average weight bits (Conv/Linear)")
    ax.set_ylabel("total sensitivity (sum of KL)", color="tab:blue")
    ax.set_yscale("symlog", linthresh=1e-4)
    if measured:
        top = ax.twinx()
        xs = [m["average_bits"] for m in measured]
        top.plot(xs, [m["top1"] for m in measured], "o-", color="tab:red")
        for m in measured:
            top.annotate(f"{m['top1']:.2f}", (m["average_bits"], m["top1"]), textcoords="offset points", xytext=(4, 4))
        top.set_ylabel("measured top-1 (%)", color="tab:red")
        ax.set_xlim(right=max(r["average_bits"] for r in rows) + 0.6)  # room for the last label
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
