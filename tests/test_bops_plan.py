"""Weight and input bits per layer under a bit-operations budget (issue 30, item 1)."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError
from zq_plugin.mixed_precision.bops import bops_plan, layer_macs, parse_bops_budget
from zq_plugin.mixed_precision.sensitivity import Sensitivity, measure_sensitivity


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Hardswish(),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    ).eval()  # fmt: skip


@given(
    cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3), stride=st.integers(1, 2),
    size=st.integers(4, 9), batch=st.integers(1, 3),
)  # fmt: skip
def test_layer_macs_match_the_textbook_counts(cin, cout, k, stride, size, batch):
    net = nn.Sequential(nn.Conv2d(cin, cout, k, stride), nn.ConvTranspose2d(cout, cin, k), nn.Flatten())
    x = torch.zeros(batch, cin, size, size)
    out = (size - k) // stride + 1
    macs = layer_macs(net, x)
    assert macs["0"] == out * out * cout * cin * k * k
    assert macs["1"] == out * out * cout * cin * k * k  # every input element feeds cin * k * k outputs
    linear = nn.Sequential(nn.Flatten(), nn.Linear(cin * size * size, cout))
    assert layer_macs(linear, x)["1"] == cin * size * size * cout


def test_budget_text():
    assert parse_bops_budget("W4A4") == (4, 4) and parse_bops_budget(" w3a8 ") == (3, 8)
    for bad in ("MP4", "W4", "W9A4", "4x4"):
        with pytest.raises(ConfigError):
            parse_bops_budget(bad)


def _fake_sensitivity(layers, params, weight, activation, bits):
    return Sensitivity(layers=layers, params=params, bits=bits, weight=weight, activation=activation, samples=1)


def test_the_plan_is_the_brute_force_optimum_within_the_budget():
    net = _net()
    x = torch.randn(16, 1, 8, 8)
    macs = layer_macs(net, x)
    names = ("0", "3", "6", "9")
    bits = (2, 4, 8)
    g = torch.Generator().manual_seed(3)
    weight = tuple(tuple(sorted(torch.rand(3, generator=g).tolist(), reverse=True)) for _ in names)
    act = tuple(tuple(sorted(torch.rand(3, generator=g).tolist(), reverse=True)) for _ in names)
    sens = _fake_sensitivity(names, (36, 288, 72, 1440), weight, act, bits)
    result = bops_plan(net, x, budget="W4A4", w_bits=(2, 4), a_bits=(2, 4, 8), sensitivity=sens, progress=False)
    assert result.plan.layers["0"].w_bits == 8 and result.plan.layers["9"].a_bits == 8  # first and last kept
    best = None
    for choice in itertools.product(itertools.product((2, 4), (2, 4, 8)), repeat=2):
        chosen = {"0": (8, 8), "3": choice[0], "6": choice[1], "9": (8, 8)}
        cost = sum(macs[n] * w * a for n, (w, a) in chosen.items())
        if cost > result.budget_bops:
            continue
        total = sum(weight[i][bits.index(chosen[n][0])] + act[i][bits.index(chosen[n][1])] for i, n in enumerate(names))
        best = total if best is None else min(best, total)
    got = sum(
        weight[i][bits.index(result.plan.layers[n].w_bits)] + act[i][bits.index(result.plan.layers[n].a_bits)]
        for i, n in enumerate(names)
    )
    assert got == pytest.approx(best) and result.bops <= result.budget_bops
    assert result.bops == sum(macs[n] * b.w_bits * b.a_bits for n, b in result.plan.layers.items())
    assert "| 3 |" in result.table()


def test_a_fragile_input_gets_the_bits_and_a_robust_one_gives_them_up():
    net = _net()
    x = torch.randn(16, 1, 8, 8)
    bits = (2, 3, 4, 5, 6, 8)
    flat = tuple((0.0,) * 6 for _ in range(4))
    act = [list(r) for r in flat]
    act[1] = [10.0, 5.0, 1.0, 0.1, 0.0, 0.0]  # layer 3's input (a SiLU output) breaks below 5 bits
    sens = _fake_sensitivity(("0", "3", "6", "9"), (36, 288, 72, 1440), flat, tuple(tuple(r) for r in act), bits)
    result = bops_plan(net, x, budget="W4A4", sensitivity=sens, progress=False)
    assert result.plan.layers["3"].a_bits >= 5
    assert result.plan.layers["6"].a_bits * result.plan.layers["6"].w_bits < 16  # paid for by the robust layer


def test_measured_plan_runs_through_the_pipeline_on_every_backend_with_its_bits():
    net = _net()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = bops_plan(net, x, budget="W4A4", w_bits=(2, 4, 8), a_bits=(2, 4, 8), progress=False)
    assert result.sensitivity.activation is not None and result.bops <= result.budget_bops
    for backend in ("fx", "pt2e", "brevitas"):
        if backend == "pt2e" and not zq_plugin._compat.has_torchao():
            continue
        q = zq_plugin.quantize(net, data=x, plan=result.plan, stage="calibrate", backend=backend, progress=False)
        built = {row.name: (row.w_bits, row.a_bits) for row in zq_plugin.describe(q).layers}
        assert built == {n: (b.w_bits, b.a_bits) for n, b in result.plan.layers.items()}, backend


def test_mse_input_ranges_lie_inside_the_extremes_and_are_no_more_sensitive_at_two_bits():
    net = _net()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    minmax = measure_sensitivity(net, x, bits=(2,), activations=True, progress=False)
    mse = measure_sensitivity(net, x, bits=(2,), activations=True, act_range="mse", progress=False)
    assert sum(r[0] for r in mse.activation) <= sum(r[0] for r in minmax.activation)
    with pytest.raises(ConfigError, match="act_range"):
        measure_sensitivity(net, x, bits=(2,), activations=True, act_range="max", progress=False)


def test_named_errors():
    net = _net()
    x = torch.randn(16, 1, 8, 8)
    weight_only = measure_sensitivity(net, x, bits=(2, 8), progress=False)
    with pytest.raises(ConfigError, match="activations=True"):
        bops_plan(net, x, sensitivity=weight_only, w_bits=(2,), a_bits=(2,), progress=False)
    with pytest.raises(ConfigError, match="needs data"):
        bops_plan(net, None, progress=False)
    with pytest.raises(ConfigError, match="budget"):
        bops_plan(net, x, budget="MP4", progress=False)
    with pytest.raises(ConfigError, match="below the smallest"):
        bops_plan(net, x, budget=10, w_bits=(2,), a_bits=(2,), progress=False)


def test_quantize_with_a_budget_builds_the_plan_it_chose_and_refuses_bits_beside_it():
    net = _net()
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    q = zq_plugin.quantize(net, data=x, budget="W3A3", stage="calibrate", progress=False)
    plan = bops_plan(net, x, budget="W3A3", progress=False)
    built = {row.name: (row.w_bits, row.a_bits) for row in zq_plugin.describe(q).layers}
    assert built == {n: (b.w_bits, b.a_bits) for n, b in plan.plan.layers.items()}
    with pytest.raises(ConfigError, match="budget="):
        zq_plugin.quantize(net, data=x, budget="W3A3", w_bits=3, progress=False)


def test_a_functional_layers_input_is_measured_through_a_probe():
    """Found by the conformance row `functional`: F.linear(x, self.fc.weight) never calls fc, so no hook saw its input."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return torch.nn.functional.linear(torch.relu(self.conv(x)).flatten(1), self.fc.weight, self.fc.bias)

    net = Functional().eval()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(net, x, bits=(2, 8), activations=True, act_range="mse", progress=False)
    assert sens.layers == ("conv", "fc") and sens.activation[1][0] > sens.activation[1][1] >= 0
    assert not hasattr(net, "zq_probe_0")  # the probes live in a traced copy
