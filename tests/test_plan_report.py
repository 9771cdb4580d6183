"""The frontier report of `zq plan`: the points measured, the plot, the JSON and the printed paths (issue 14 item 7)."""

import json
from pathlib import Path

import pytest

from zq_plugin import cli
from zq_plugin.mixed_precision.report import chosen_index, plot_frontier, points_to_measure

pytest.importorskip("matplotlib")


def _rows(bits):
    """Frontier rows at these average bits (100 parameters), sensitivity falling with size."""
    return [{"bytes": b * 100 / 8, "average_bits": b, "sensitivity": 1.0 / b**3} for b in bits]


# a dense frontier as 2..8 candidates give: many points between 2 and 8 bits
DENSE = [2.0 + 0.25 * i for i in range(25)]


def test_chosen_index_is_the_largest_point_within_the_budget():
    rows = _rows(DENSE)
    assert rows[chosen_index(rows, 4.0)]["average_bits"] == 4.0
    assert rows[chosen_index(rows, 4.1)]["average_bits"] == 4.0


def test_measured_points_are_neighbours_of_the_budget_then_the_ends():
    rows = _rows(DENSE)
    bits = [rows[i]["average_bits"] for i in points_to_measure(rows, 4.0, 4)]
    # one bit below the chosen plan and one above the budget, then the cheapest and the largest;
    # before the fix: evenly spread indices, 2.0, 4.0, 6.0, 8.0 (the chosen plan measured twice)
    assert bits == [2.0, 3.0, 5.0, 8.0]
    two = [rows[i]["average_bits"] for i in points_to_measure(rows, 4.0, 2)]
    assert two == [3.0, 5.0]  # with only two, the neighbours of the budget come first
    assert chosen_index(rows, 4.0) not in points_to_measure(rows, 4.0, 10)  # measured apart
    assert len(points_to_measure(rows, 4.0, 6)) == 6
    assert points_to_measure(rows, 4.0, 0) == []


def test_measured_points_at_a_sparse_frontier_and_at_the_largest_budget():
    rows = _rows([2.0, 2.5, 3.45, 4.0, 8.0])  # ZeroQ's {2, 4, 8} on resnet_s looks like this
    assert [rows[i]["average_bits"] for i in points_to_measure(rows, 4.0, 4)] == [2.0, 2.5, 3.45, 8.0]
    # at the largest budget nothing lies above; the nearest point below comes first
    assert [rows[i]["average_bits"] for i in points_to_measure(rows, 8.0, 1)] == [4.0]
    assert [rows[i]["average_bits"] for i in points_to_measure(rows, 8.0, 9)] == [2.0, 2.5, 3.45, 4.0]


def test_plot_marks_the_chosen_plan_and_the_budget_and_joins_no_measured_points(tmp_path):
    rows = _rows(DENSE)
    measured = [
        {"average_bits": 3.0, "top1": 80.0, "chosen": False},
        {"average_bits": 8.0, "top1": 92.9, "chosen": False},
        {"average_bits": 4.0, "top1": 92.51, "chosen": True},
    ]
    path = tmp_path / "sub" / "frontier.png"
    fig = plot_frontier(path, rows, measured, "resnet_s: MP4", budget_average_bits=4.0, budget_label="MP4")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax, top = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "budget MP4 = 4.00 bits" in labels
    assert "chosen plan: 4.00 bits, 92.51 %" in labels
    budget_lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("budget")]
    assert list(budget_lines[0].get_xdata()) == [4.0, 4.0]
    # measured top-1: markers only (before the fix a red line joined them, suggesting ~77 % at 4 bits)
    assert top.get_lines() == []
    points = {tuple(map(float, xy)) for c in top.collections for xy in c.get_offsets()}
    assert points == {(3.0, 80.0), (8.0, 92.9), (4.0, 92.51)}


def test_plot_without_measurements_marks_the_chosen_plan_on_the_frontier(tmp_path):
    rows = _rows(DENSE)
    fig = plot_frontier(tmp_path / "f.png", rows, [], "t", budget_average_bits=4.1, budget_label="4.1avg")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[1:] == ["budget 4.1avg = 4.10 bits", "chosen plan: 4.00 bits"]


def test_zq_plan_writes_chosen_plan_and_budget_and_prints_absolute_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["plan", "--model", "resnet_s", "--data", "noise", "--num-samples", "8", "--budget", "MP4"]
    assert cli.main([*argv, "--bits", "2", "4", "8", "--evaluate", "0", "--out", "plan"]) == 0
    out = capsys.readouterr().out
    png = (tmp_path / "plan" / "frontier.png").resolve()
    assert f"frontier plot: {png}\n" in out  # before: "frontier.png", relative to nothing printed
    assert str((tmp_path / "plan" / "plan.json").resolve()) in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(Path("plan/frontier.json").read_text())
    assert doc["budget_average_bits"] == doc["budget_bits"] / sum(doc["sensitivity"]["params"]) == 4.0
    assert doc["chosen"]["average_bits"] <= 4.0 and doc["chosen"]["top1"] is None
    assert doc["chosen"]["sensitivity"] in [r["sensitivity"] for r in doc["frontier"]]


def test_zq_plan_default_candidates_are_2_to_8():
    args = cli.build_parser().parse_args(["plan", "--model", "resnet_s", "--budget", "MP4"])
    assert args.bits == [2, 3, 4, 5, 6, 7, 8]


def test_pareto_plan_default_candidates_are_2_to_8(tiny_bn_net):
    import torch

    from zq_plugin.mixed_precision import pareto_plan

    result = pareto_plan(tiny_bn_net, torch.randn(4, 1, 8, 8), budget="MP4", progress=False)
    assert result.sensitivity.bits == (2, 3, 4, 5, 6, 7, 8)
