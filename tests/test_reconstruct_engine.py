"""The reconstruction engine on a tiny model: losses fall, rounding stays on the grid, runs are deterministic."""

import dataclasses
import itertools

import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st

import zq_plugin
from zq_plugin import observers as zo
from zq_plugin.errors import ConfigError
from zq_plugin.reconstruct.engine import METHODS, ReconstructConfig, reconstruct_fx

FAST = dataclasses.replace(METHODS["genie-m"], iterations=400, batch_size=16)


@pytest.fixture(scope="module")
def images():
    return torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def test_unit_losses_fall_and_the_source_is_unchanged(tiny_bn_net, images):
    before = snapshot(tiny_bn_net)
    sim = reconstruct_fx(tiny_bn_net, images, w_bits=4, a_bits=4, config=FAST)
    assert_unchanged(tiny_bn_net, before)
    report = sim.zq_reconstruction
    assert [r["unit"] for r in report] == ["conv1", "", "dw", "fc"]  # the residual pair is one unit
    assert sum(r["train_after"] for r in report) < sum(r["train_before"] for r in report)
    assert all(r["held_after"] <= r["held_before"] for r in report)  # the kept state never checks worse
    assert any(r["best_step"] > 0 for r in report)
    out = sim(images)
    assert out.shape == (48, 3) and torch.isfinite(out).all()


def test_same_seed_same_model(tiny_bn_net, images):
    short = dataclasses.replace(FAST, iterations=100)
    a = reconstruct_fx(tiny_bn_net, images, config=short, seed=3).state_dict()
    b = reconstruct_fx(tiny_bn_net, images, config=short, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adaround_weights_land_on_floor_or_floor_plus_one(tiny_bn_net, images):
    """With fixed steps (AdaRound) every weight is s0 * (floor(w / s0) + 0 or 1), clamped."""
    from torch.fx.experimental.optimization import fuse

    config = dataclasses.replace(METHODS["adaround"], units="block", iterations=60, batch_size=16)
    plain = zq_plugin.quantize_fx(
        fuse(tiny_bn_net, inplace=False), images, w_bits=4, a_bits=4, fold=False,
        act_observer=zo.MSEObserver, weight_observer=zo.PerChannelMSEObserver,
    )  # fmt: skip
    sim = reconstruct_fx(tiny_bn_net, images, w_bits=4, a_bits=4, config=config)
    plain_mods, sim_mods = dict(plain.named_modules()), dict(sim.named_modules())
    checked = 0
    for name, layer in sim_mods.items():
        fq = getattr(layer, "weight_fake_quant", None)
        if fq is None or not fq.is_per_channel:
            continue
        s = fq.scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        torch.testing.assert_close(fq.scale, plain_mods[name].weight_fake_quant.scale)  # steps kept
        with torch.no_grad():  # the weight as used: rounded by reconstruction, or by the calibrated quantizer
            integer = fq(layer.weight) / s
        torch.testing.assert_close(integer, integer.round(), atol=1e-3, rtol=0)
        floor = torch.floor(plain_mods[name].weight / s)
        assert bool(((integer.round() - floor) >= -1e-6).all() and ((integer.round() - floor) <= 1 + 1e-6).all())
        checked += 1
    assert checked == 5


def test_bad_methods_and_units_raise_named_errors(tiny_bn_net, images):
    with pytest.raises(ConfigError, match="unknown reconstruction method"):
        reconstruct_fx(tiny_bn_net, images, method="adaquant")
    with pytest.raises(ConfigError):
        ReconstructConfig(units="net")


def test_a_stopped_run_resumes_to_the_same_model(tiny_bn_net, images, tmp_path, monkeypatch):
    from zq_plugin.reconstruct import engine

    short = dataclasses.replace(FAST, iterations=30)
    whole = reconstruct_fx(tiny_bn_net, images, config=short, seed=1).state_dict()
    real_unit, calls = engine.reconstruct_unit, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_unit(*args, **kwargs)

    monkeypatch.setattr(engine, "reconstruct_unit", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_fx(tiny_bn_net, images, config=short, seed=1, cache_dir=tmp_path)
    [folder] = list(tmp_path.iterdir())
    assert [p.name for p in folder.iterdir()] == ["unit-00002.pt"]  # the two finished units, one file
    calls.clear()
    resumed = reconstruct_fx(tiny_bn_net, images, config=short, seed=1, cache_dir=tmp_path)
    assert len(calls) == 2  # only the two units left
    assert [r["unit"] for r in resumed.zq_reconstruction] == ["conv1", "", "dw", "fc"]
    state = resumed.state_dict()
    assert state.keys() == whole.keys() and all(torch.equal(state[k], whole[k]) for k in whole)


def test_a_plan_sets_each_layers_bits(tiny_bn_net, images):
    from zq_plugin.mixed_precision import BitPlan

    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8).replace_layer("dw", w_bits=2, a_bits=4)
    sim = reconstruct_fx(tiny_bn_net, images, plan=plan, config=dataclasses.replace(FAST, iterations=20))
    assert sim.get_submodule("dw").weight_fake_quant.quant_max == 1  # 2-bit narrow signed: -1..1
    assert sim.get_submodule("conv2").weight_fake_quant.quant_max == 7  # conv1: the first layer, 8-bit


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models(tiny_bn_net, images, dtype):
    import copy

    net = copy.deepcopy(tiny_bn_net).to(dtype)
    sim = reconstruct_fx(net, images.float(), config=dataclasses.replace(FAST, iterations=20))
    assert all(r["held_after"] <= r["held_before"] for r in sim.zq_reconstruction)
    out = sim(images.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_the_result_converts_at_8_bits_with_convert_fx(tiny_bn_net, images):
    import copy

    from torch.ao.quantization.quantize_fx import convert_fx

    sim = reconstruct_fx(tiny_bn_net, images, w_bits=8, a_bits=8, config=dataclasses.replace(FAST, iterations=40))
    converted = convert_fx(copy.deepcopy(sim))
    with torch.no_grad():
        ref, out = sim(images), converted(images)
    assert any("quantize_per" in str(n.target) or "quantized" in str(n.target) for n in converted.graph.nodes)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, f"convert_fx disagrees with the reconstructed simulation: cosine {float(cos):.4f}"


def test_adaround_reconstructs_each_layer_also_inside_a_residual_block(tiny_bn_net, images):
    config = dataclasses.replace(METHODS["adaround"], iterations=20, batch_size=16)
    sim = reconstruct_fx(tiny_bn_net, images, config=config)
    report = sim.zq_reconstruction
    assert [r["unit"] for r in report] == ["conv1", "conv2", "short", "dw", "fc"]
    assert all(r["layers"] == [r["unit"]] for r in report)


def test_batchnorm_that_no_conv_absorbs_keeps_its_statistics(images):
    """Pre-activation order (BN after ReLU) stays a BatchNorm in the simulation: training must not touch it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3),
        torch.nn.Flatten(), torch.nn.Linear(256, 3),
    )  # fmt: skip
    net.train()
    net(torch.randn(32, 1, 12, 12))
    net.eval()
    sim = reconstruct_fx(net, images, config=dataclasses.replace(FAST, iterations=30))
    bn = next(m for m in sim.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, net[2].running_mean, rtol=0, atol=0)
    assert all(r["held_after"] <= r["held_before"] for r in sim.zq_reconstruction)


def test_a_plan_naming_a_linear_read_functionally_reconstructs():
    """F.linear(x, self.fc.weight): 'fc' is a plan layer of the model, a bare module in the trace;
    FX gives that call its default 8 bits, as quantize_fx on the model does (found by conformance)."""
    import torch.nn.functional as F

    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 3)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)
            return F.linear(x, self.fc.weight, self.fc.bias)

    net = Functional().eval()
    from zq_plugin.mixed_precision import BitPlan

    plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)
    quick = dataclasses.replace(METHODS["genie-m"], iterations=2, checks=1)
    sim = reconstruct_fx(net, torch.randn(16, 1, 8, 8), plan=plan, config=quick, progress=False)
    assert [layer for r in sim.zq_reconstruction for layer in r["layers"]] == ["conv"]
    assert sim(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@given(
    errors=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=30),
    mean=st.integers(1, 2000),
)
def test_spread_iterations_keeps_the_total_and_the_bounds_and_follows_the_error(errors, mean):
    from zq_plugin.reconstruct.engine import spread_iterations

    counts = spread_iterations(errors, mean)
    n = len(errors)
    assert len(counts) == n and all(c >= 1 for c in counts)
    assert all(mean / 4 - 1 <= c <= mean * 4 + 1 for c in counts)
    if mean >= 4:
        assert abs(sum(counts) - mean * n) <= n  # the uniform schedule's total, up to rounding
    for (e1, c1), (e2, c2) in itertools.combinations(zip(errors, counts, strict=True), 2):
        if e1 < e2:
            assert c1 <= c2 + 1  # more error, not fewer steps


def test_error_schedule_spends_the_uniform_total_where_the_error_is(monkeypatch):
    import dataclasses

    from zq_plugin.reconstruct import METHODS

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64, 3),
    ).eval()  # fmt: skip
    config = dataclasses.replace(METHODS["genie-m"], iterations=12, checks=2, schedule="error")
    sim = zq_plugin.reconstruct_fx(net, torch.randn(32, 1, 8, 8), w_bits=2, a_bits=2, config=config, progress=False)
    counts = [r["iterations"] for r in sim.zq_reconstruction]
    assert abs(sum(counts) - 12 * len(counts)) <= len(counts) and len(set(counts)) > 1
    uniform = zq_plugin.reconstruct_fx(
        net, torch.randn(32, 1, 8, 8), config=dataclasses.replace(config, schedule="uniform"), progress=False
    )
    assert [r["iterations"] for r in uniform.zq_reconstruction] == [12] * len(counts)
    with pytest.raises(zq_plugin.ConfigError, match="schedule"):
        dataclasses.replace(config, schedule="longest")
