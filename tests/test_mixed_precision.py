import copy
import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tests.conformance import pattern_model
from tests.conftest import assert_unchanged, snapshot
from zq_plugin import _compat
from zq_plugin.backends.fx import quantize_fx
from zq_plugin.backends.fx_plan import activation_owners, to_qconfig_mapping
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.evaluation import accuracy
from zq_plugin.mixed_precision import (
    BitPlan,
    Budget,
    LayerBits,
    NonUniformFakeQuantize,
    best_under,
    clustered_quantize,
    hybrid_plan,
    measure_sensitivity,
    pareto_frontier,
    pareto_plan,
    quantize_weight,
)
from zq_plugin.mixed_precision.sensitivity import bn_fold_factors

# ---------------------------------------------------------------- Pareto DP


@st.composite
def instances(draw):
    layers = draw(st.integers(1, 5))
    costs, sens = [], []
    for _ in range(layers):
        k = draw(st.integers(1, 3))
        costs.append(draw(st.lists(st.integers(0, 40), min_size=k, max_size=k)))
        sens.append(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k)))
    return costs, sens


@given(instances(), st.integers(0, 200))
def test_dp_matches_brute_force(instance, budget):
    costs, sens = instance
    front = pareto_frontier(costs, sens)
    # the frontier is strictly monotone and each point's choice gives its cost and sensitivity
    for a, b in itertools.pairwise(front):
        assert a.cost < b.cost and a.sensitivity > b.sensitivity
    for p in front:
        assert p.cost == sum(c[k] for c, k in zip(costs, p.choice, strict=True))
        assert p.sensitivity == pytest.approx(sum(s[k] for s, k in zip(sens, p.choice, strict=True)), abs=1e-9)
    brute = [
        (sum(c[k] for c, k in zip(costs, ch, strict=True)), sum(s[k] for s, k in zip(sens, ch, strict=True)))
        for ch in itertools.product(*(range(len(c)) for c in costs))
    ]
    feasible = [s for c, s in brute if c <= budget]
    if not feasible:
        with pytest.raises(ConfigError, match="below the smallest"):
            best_under(front, budget)
    else:
        assert best_under(front, budget).sensitivity == pytest.approx(min(feasible), abs=1e-9)


def test_dp_rejects_bad_input():
    with pytest.raises(ConfigError):
        pareto_frontier([], [])
    with pytest.raises(ConfigError, match="layer 0"):
        pareto_frontier([[1, 2]], [[1.0]])
    with pytest.raises(ConfigError, match="non-negative integers"):
        pareto_frontier([[-1]], [[1.0]])
    with pytest.raises(ConfigError, match="non-negative integers"):
        pareto_frontier([[1]], [[float("nan")]])


def test_budget_parse_and_errors():
    assert Budget.parse("MP4") == Budget(uniform_bits=4) == Budget.parse("4bit")
    assert Budget.parse("4.5avg").bits(100) == 450
    assert Budget.parse("1KiB").bits(10) == 8192
    assert Budget(uniform_bits=6).bits(1000) == 6000
    with pytest.raises(ConfigError, match="not understood"):
        Budget.parse("four bits")
    with pytest.raises(ConfigError, match="exactly one"):
        Budget(bytes=10, uniform_bits=4)
    with pytest.raises(ConfigError, match="positive"):
        Budget(average_bits=-1)


# ---------------------------------------------------------------- BitPlan


@st.composite
def plans(draw):
    n = draw(st.integers(1, 6))
    layers = {}
    for i in range(n):
        layers[f"block{i}.conv"] = LayerBits(
            w_bits=draw(st.integers(2, 8)),
            a_bits=draw(st.integers(2, 8)),
            granularity=draw(st.sampled_from(["per_channel", "per_tensor"])),
            grid=draw(st.sampled_from(["uniform", "nonuniform"])),
            params=draw(st.integers(0, 10**6)),
        )
    return BitPlan(layers, {"source": "test"})


@given(plans())
def test_plan_json_round_trip(plan):
    back = BitPlan.from_json(plan.to_json())
    assert back == plan
    assert list(back.layers) == list(plan.layers)
    assert dict(back.meta) == dict(plan.meta)


def test_plan_save_load_and_table(tmp_path, tiny_bn_net):
    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8)
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert BitPlan.load(path) == plan
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary file left
    assert plan.layers["conv1"].w_bits == 8 and plan.layers["conv2"].w_bits == 4 and plan.layers["fc"].w_bits == 8
    assert plan.layers["conv2"].params == 8 * 4 * 9
    assert "| conv2 | 288 | 4 | 8 | per_channel | uniform |" in repr(plan)


def test_plan_bad_input(tiny_bn_net):
    with pytest.raises(ConfigError, match="w_bits=9"):
        LayerBits(w_bits=9, a_bits=8)
    with pytest.raises(ConfigError, match="a_bits=1"):
        LayerBits(w_bits=4, a_bits=1)
    with pytest.raises(ConfigError, match="granularity"):
        LayerBits(w_bits=4, a_bits=8, granularity="per_row")
    with pytest.raises(ConfigError, match="does not exist"):
        BitPlan({"conv9": LayerBits(w_bits=4, a_bits=8)}).check(tiny_bn_net)
    with pytest.raises(ConfigError, match="BatchNorm2d; plans cover Conv1d"):
        BitPlan({"bn1": LayerBits(w_bits=4, a_bits=8)}).check(tiny_bn_net)
    with pytest.raises(ConfigError, match="format tag"):
        BitPlan.from_json(json.dumps({"layers": {}}))
    with pytest.raises(ConfigError, match="needs w_bits and a_bits"):
        BitPlan.from_json(json.dumps({"format": "zq_plugin.BitPlan", "version": 1, "layers": {"a": {"w_bits": 4}}}))
    with pytest.raises(ConfigError, match="w_bits=12"):
        BitPlan.from_json(
            json.dumps({"format": "zq_plugin.BitPlan", "version": 1, "layers": {"a": {"w_bits": 12, "a_bits": 8}}})
        )
    with pytest.raises(ConfigError, match="at least one layer"):
        BitPlan({})


# ---------------------------------------------------------------- sensitivity


def test_sensitivity_nonnegative_and_decreasing(tiny_bn_net):
    before = snapshot(tiny_bn_net)
    data = torch.randn(64, 1, 8, 8)
    sens = measure_sensitivity(tiny_bn_net, data, bits=(2, 4, 8), progress=False)
    assert_unchanged(tiny_bn_net, before)
    assert sens.layers == ("conv1", "conv2", "short", "dw", "fc")
    assert sens.samples == 64
    for row in sens.weight:
        assert all(v >= 0 for v in row)
        assert row[0] > row[1] > row[2]  # 2 > 4 > 8 bits
    acts = measure_sensitivity(tiny_bn_net, data, bits=(2, 8), activations=True, progress=False).activation
    assert acts is not None and all(r[0] > r[1] >= 0 for r in acts)


def test_sensitivity_folds_bn(tiny_bn_net):
    factors = bn_fold_factors(tiny_bn_net)
    assert set(factors) == {"conv1", "conv2", "dw"}  # "short" has no BN
    bn = tiny_bn_net.bn2
    assert torch.allclose(factors["conv2"], bn.weight / torch.sqrt(bn.running_var + bn.eps))


def test_quantize_weight_grids():
    w = torch.randn(6, 3, 3, 3)
    q = quantize_weight(w, 4)
    scale = w.abs().amax((1, 2, 3), keepdim=True) / 7
    assert torch.allclose(q, torch.round(w / scale) * scale)
    qt = quantize_weight(w, 4, "per_tensor")
    assert len(qt.unique()) <= 15
    assert torch.equal(quantize_weight(w, 4, grid="nonuniform"), clustered_quantize(w, 4))


def test_sensitivity_bad_input(tiny_bn_net):
    with pytest.raises(ConfigError, match="no sample"):
        measure_sensitivity(tiny_bn_net, [], progress=False)
    with pytest.raises(ConfigError, match="holds no samples"):
        measure_sensitivity(tiny_bn_net, torch.zeros(0, 1, 8, 8), progress=False)
    with pytest.raises(ConfigError, match="bits=9"):
        measure_sensitivity(tiny_bn_net, torch.randn(4, 1, 8, 8), bits=(4, 9), progress=False)
    with pytest.raises(ConfigError, match="unknown layers"):
        measure_sensitivity(tiny_bn_net, torch.randn(4, 1, 8, 8), layers=["nope"], progress=False)


# ---------------------------------------------------------------- pareto_plan


def test_pareto_plan_budgets(tiny_bn_net):
    data = torch.randn(64, 1, 8, 8)
    sens = measure_sensitivity(tiny_bn_net, data, progress=False)
    total = sum(sens.params)
    previous = None
    for k in (2, 4, 6, 8):
        result = pareto_plan(tiny_bn_net, budget=Budget(uniform_bits=k), sensitivity=sens)
        assert result.plan.weight_bits() <= k * total
        assert result.budget_bits == k * total
        if previous is not None:
            assert result.plan.meta["sensitivity"] <= previous
        previous = result.plan.meta["sensitivity"]
    assert pareto_plan(tiny_bn_net, budget="MP8", sensitivity=sens).plan.average_w_bits() == 8
    fixed = pareto_plan(tiny_bn_net, budget="MP4", sensitivity=sens, fixed={"fc": 8}).plan
    assert fixed.layers["fc"].w_bits == 8
    # every frontier point gives a plan whose size is the point's cost
    result = pareto_plan(tiny_bn_net, budget="MP4", sensitivity=sens)
    for point in result.frontier:
        assert result.plan_at(point).weight_bits() == point.cost


def test_pareto_plan_bad_budgets(tiny_bn_net):
    sens = measure_sensitivity(tiny_bn_net, torch.randn(16, 1, 8, 8), progress=False)
    with pytest.raises(ConfigError, match="below the smallest possible plan"):
        pareto_plan(tiny_bn_net, budget=Budget(average_bits=1.5), sensitivity=sens)
    with pytest.raises(ConfigError, match="above the largest plan"):
        pareto_plan(tiny_bn_net, budget=Budget(bytes=10**6), sensitivity=sens)
    with pytest.raises(ConfigError, match="not Conv/Linear layers"):
        pareto_plan(tiny_bn_net, torch.randn(4, 1, 8, 8), budget="MP4", fixed={"bn1": 8}, progress=False)
    with pytest.raises(ConfigError, match="needs data"):
        pareto_plan(tiny_bn_net, budget="MP4")


def test_hybrid_plan(tiny_bn_net):
    data = torch.randn(32, 1, 8, 8)
    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8)
    loose, choice = hybrid_plan(tiny_bn_net, data, plan, threshold=1e9, progress=False)
    assert loose.per_tensor_share() == 1.0 and choice.per_tensor_share == 1.0
    strict, choice = hybrid_plan(tiny_bn_net, data, plan, threshold=0.0, progress=False)
    for name, g in choice.granularity.items():
        assert g == ("per_tensor" if choice.per_tensor[name] <= choice.per_channel[name] else "per_channel")
        assert strict.layers[name].granularity == g and strict.layers[name].w_bits == plan.layers[name].w_bits
    assert strict.meta["per_tensor_share"] == strict.per_tensor_share()


# ---------------------------------------------------------------- non-uniform grid


@given(st.integers(2, 8), st.integers(1, 6), st.integers(2, 80), st.integers(0, 2**31 - 1))
def test_clustered_grid_levels(bits, channels, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, n, generator=gen) * torch.rand(channels, 1, generator=gen)
    q = clustered_quantize(w, bits)
    assert q.shape == w.shape
    for row, orig in zip(q, w, strict=True):
        assert len(row.unique()) <= 2**bits
        assert row.min() >= orig.min() - 1e-6 and row.max() <= orig.max() + 1e-6


def test_nonuniform_beats_uniform_mse_on_gaussian_weights():
    w = torch.randn(32, 3 * 3 * 16, generator=torch.Generator().manual_seed(0))
    for bits in (3, 4):
        nonuni = (clustered_quantize(w, bits) - w).square().mean()
        uni = (quantize_weight(w, bits) - w).square().mean()
        assert nonuni < uni


def test_nonuniform_fake_quantize_in_qat_flow(tiny_bn_net):
    fq = NonUniformFakeQuantize(bits=3)
    w = torch.randn(4, 10, requires_grad=True)
    out = fq(w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    fq.disable_fake_quant()
    assert torch.equal(fq(w), w)
    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8, grid="nonuniform")
    example = (torch.randn(1, 1, 8, 8),)
    mapping = to_qconfig_mapping(plan, tiny_bn_net, example)
    prepared = _compat.prepare_qat_fx(copy.deepcopy(tiny_bn_net), mapping, example).eval()
    fqs = [m for m in prepared.modules() if isinstance(m, NonUniformFakeQuantize)]
    assert len(fqs) == 5 and sorted(f.bits for f in fqs) == [4, 4, 4, 8, 8]


# ---------------------------------------------------------------- emitter


def _input_fq(prepared: nn.Module, layer: str):
    """The activation fake-quant/observer module whose output reaches ``layer``'s input."""
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target == layer:
            arg = node.args[0]
            while True:
                name = str(arg.target)
                if arg.op == "call_module" and ("activation_post_process" in name or "_input_quant" in name):
                    return prepared.get_submodule(str(arg.target))
                arg = next(a for a in arg.args if isinstance(a, torch.fx.Node))
    raise AssertionError(layer)


@pytest.mark.parametrize("qat", [False, True])
def test_emitter_producer_rule(tiny_bn_net, qat):
    before = snapshot(tiny_bn_net)
    example = (torch.randn(1, 1, 8, 8),)
    plan = BitPlan(
        {
            "conv1": LayerBits(w_bits=8, a_bits=5),  # the image, quantized by conv1's config like its output
            "conv2": LayerBits(w_bits=4, a_bits=5),  # reads conv1 (with short)
            "short": LayerBits(w_bits=3, a_bits=5),
            "dw": LayerBits(w_bits=6, a_bits=3, granularity="per_channel"),  # reads the add + relu2
            "fc": LayerBits(w_bits=8, a_bits=6, granularity="per_tensor"),  # reads dw (via relu6, pool, flatten)
        }
    )
    mapping = to_qconfig_mapping(plan, tiny_bn_net, example, fake_quant=qat)
    prepare = _compat.prepare_qat_fx if qat else _compat.prepare_fx
    prepared = prepare(copy.deepcopy(tiny_bn_net), mapping, example)
    assert_unchanged(tiny_bn_net, before)
    expected_input_bits = {"conv1": 5, "conv2": 5, "short": 5, "dw": 3, "fc": 6}
    for layer, bits in expected_input_bits.items():
        assert _input_fq(prepared, layer).quant_max == 2**bits - 1, layer
    if qat:
        modules = dict(prepared.named_modules())
        for layer, b in plan.layers.items():
            wfq = modules[layer].weight_fake_quant
            assert (wfq.quant_min, wfq.quant_max) == (-(2 ** (b.w_bits - 1) - 1), 2 ** (b.w_bits - 1) - 1)
            per_channel = wfq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
            assert per_channel == (b.granularity == "per_channel"), layer


def test_emitter_image_and_branch_conflicts_take_the_max(tiny_bn_net):
    example = (torch.randn(1, 1, 8, 8),)
    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=4, first_last_bits=None)
    plan = plan.replace_layer("conv2", a_bits=6)  # conv2 and short read the same observer (conv1's output)
    with pytest.warns(UserWarning, match=r"\['conv1', 'conv2', 'short'\].*all get 6 bits"):
        owners = activation_owners(plan, tiny_bn_net, example)
    assert owners["conv1"] == 6  # conv1's qconfig quantizes the image and conv1's output
    with pytest.warns(UserWarning, match="all get 6 bits"):
        mapping = to_qconfig_mapping(plan, tiny_bn_net, example)
    prepared = _compat.prepare_fx(copy.deepcopy(tiny_bn_net), mapping, example)
    assert _input_fq(prepared, "short").quant_max == 63 and _input_fq(prepared, "conv2").quant_max == 63


def test_emitter_bad_plan(tiny_bn_net):
    example = (torch.randn(1, 1, 8, 8),)
    with pytest.raises(ConfigError, match="does not exist"):
        to_qconfig_mapping(BitPlan({"nope": LayerBits(w_bits=4, a_bits=4)}), tiny_bn_net, example)
    plan = BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8, grid="nonuniform")
    with pytest.raises(ConfigError, match="fake_quant=True"):
        to_qconfig_mapping(plan, tiny_bn_net, example, fake_quant=False)


def test_pareto_plan_full_budget_with_non_monotone_sensitivity(tiny_bn_net):
    from zq_plugin.mixed_precision import Sensitivity

    # "fc" measures lower at 7 bits than at 8 (noise): the all-8 plan is dominated, yet MP8 is feasible
    sens = Sensitivity(layers=("conv1", "fc"), params=(10, 20), bits=(7, 8), weight=((0.2, 0.1), (0.05, 0.06)))
    plan = pareto_plan(tiny_bn_net, budget="MP8", sensitivity=sens).plan
    assert (plan.layers["conv1"].w_bits, plan.layers["fc"].w_bits) == (8, 7)
    with pytest.raises(ConfigError, match="above the largest plan"):
        pareto_plan(tiny_bn_net, budget=Budget(average_bits=8.5), sensitivity=sens)


# ---------------------------------------------------------------- issue 13: models this project did not write


@pytest.mark.parametrize("pattern", ["tuple_output", "dict_output"])
def test_plans_on_two_head_models(pattern):
    model, shape = pattern_model(pattern)
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    result = pareto_plan(model, data, budget="MP4", progress=False)  # AttributeError: 'tuple' ... 'flatten' before
    sens = result.sensitivity
    assert set(result.plan.layers) == {"conv", "fc", "aux"}
    assert all(v == 0 for v in sens.weight[sens.layers.index("aux")])  # the logits do not depend on the aux head
    assert sens.of("fc", 2) > 0
    plan, _ = hybrid_plan(model, data, result.plan, progress=False)
    assert set(plan.layers) == {"conv", "fc", "aux"}


def test_output_fn_chooses_the_head():
    model, shape = pattern_model("tuple_output")
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    sens = measure_sensitivity(model, data, bits=(2,), progress=False, output_fn=lambda out: out[1])
    assert sens.of("fc", 2) == 0 and sens.of("aux", 2) > 0


@pytest.mark.parametrize("pattern", ["tuple_output", "dict_output"])
def test_accuracy_reads_the_logits(pattern):
    model, shape = pattern_model(pattern)
    x = torch.randn(10, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(x)[0 if pattern == "tuple_output" else "logits"].argmax(1)
        aux = model(x)[1 if pattern == "tuple_output" else "aux"].argmax(1)
    assert accuracy(model, x, labels) == 100.0
    pick = (lambda out: out[1]) if pattern == "tuple_output" else (lambda out: out["aux"])
    assert accuracy(model, x, aux, output_fn=pick) == 100.0


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.attn, self.fc = nn.Conv2d(1, 8, 3), nn.MultiheadAttention(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(x).flatten(2).permute(2, 0, 1)  # [L, N, 8]
        h, _ = self.attn(h, h, h)
        return self.fc(h.mean(0))


def test_plans_leave_out_layers_no_backend_quantizes():
    torch.manual_seed(0)
    model = _Attention().eval()
    data = torch.randn(8, 1, 6, 6)
    result = pareto_plan(model, data, budget="MP4", progress=False)
    assert list(result.plan.layers) == ["conv", "fc"]  # not attn.out_proj: neither backend quantizes it
    assert sum(result.sensitivity.params) == 8 * 9 + 8 * 3
    assert list(BitPlan.uniform(model, w_bits=4, a_bits=8)) == ["conv", "fc"]
    with pytest.raises(ConfigError, match="does not descend into"):
        BitPlan({"attn.out_proj": LayerBits(w_bits=4, a_bits=8)}).check(model)
    mapping = to_qconfig_mapping(result.plan, model, data[:1])
    with pytest.warns(UserWarning, match=r"left in float \(attn\)"):
        sim = quantize_fx(model, data, mapping=mapping)
    assert sim.zq_float_layers == ("attn",)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_plans_refuse_untraceable_models():
    model, data = _Branchy().eval(), torch.randn(4, 1, 6, 6)
    plan = BitPlan.uniform(model, w_bits=4, a_bits=8, first_last_bits=None)
    with pytest.raises(ModelError, match=r"pareto_plan: _Branchy is not symbolically traceable.*if x\.sum\(\) > 0"):
        pareto_plan(model, data, budget="MP4", progress=False)
    with pytest.raises(ModelError, match="hybrid_plan: _Branchy is not symbolically traceable"):
        hybrid_plan(model, data, plan, progress=False)
    with pytest.raises(ModelError, match="to_qconfig_mapping: _Branchy is not symbolically traceable"):
        to_qconfig_mapping(plan, model, data[:1])


def test_plan_with_conv_transpose_reaches_its_weight():
    model, shape = pattern_model("conv_transpose")
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    result = pareto_plan(model, data, budget="MP4", progress=False)
    assert "2" in result.plan.layers
    plan = result.plan.replace_layer("2", w_bits=3)
    mapping = to_qconfig_mapping(plan, model, data[:1])  # the probe used to fail on per-channel ConvTranspose
    sim = quantize_fx(model, data, mapping=mapping, fold=False)
    layer = sim.get_submodule("2")
    w = layer.weight_fake_quant(layer.weight)  # [C_in, C_out, k, k]: per output channel = axis 1
    assert all(torch.unique(w[:, c]).numel() <= 2**3 - 1 for c in range(w.shape[1]))
    wq = quantize_weight(model[2].weight, 3, ch_axis=1)  # the sensitivity quantizes the same channels
    assert all(torch.unique(wq[:, c]).numel() <= 7 for c in range(6))
    assert any(torch.unique(wq[c]).numel() > 7 for c in range(4))  # not per input channel


def test_quantize_fx_with_a_plan_gives_the_model_input_its_own_bits(recwarn):
    """Issue 16: the first layer reads 8-bit images and writes its 4-bit reader's input (FX used 8 for both)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    plan = BitPlan.uniform(net.eval(), w_bits=4, a_bits=4)  # first and last at W8A8
    sim = quantize_fx(net, torch.randn(32, 1, 8, 8), plan=plan)
    image = next(n for n in sim.graph.nodes if n.op == "placeholder")
    (on_image,) = [sim.get_submodule(str(u.target)) for u in image.users if u.op == "call_module"]
    assert (on_image.quant_min, on_image.quant_max) == (0, 255)
    assert (_input_fq(sim, "2").quant_min, _input_fq(sim, "2").quant_max) == (0, 15)
    assert (_input_fq(sim, "5").quant_min, _input_fq(sim, "5").quant_max) == (0, 255)
    assert not [w for w in recwarn if "two bit widths" in str(w.message)]
    with pytest.raises(ConfigError, match="not both"):
        quantize_fx(net, torch.randn(8, 1, 8, 8), plan=plan, mapping=object())


def test_quantize_fx_with_a_plan_sets_an_input_observer_that_the_layers_own_config_creates(recwarn):
    """Issue 16: after MaxPool + ``nn.Flatten`` FX gives a Linear its own input observer, which the Linear's
    config also uses for its output; the plan's 4 bits used to lose to the 8 its reader asks for."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    plan = BitPlan.uniform(net, w_bits=4, a_bits=4)  # first and last at W8A8
    sim = quantize_fx(net, torch.randn(32, 1, 8, 8), plan=plan)
    assert (_input_fq(sim, "4").quant_min, _input_fq(sim, "4").quant_max) == (0, 15)
    assert (_input_fq(sim, "6").quant_min, _input_fq(sim, "6").quant_max) == (0, 255)
    assert not [w for w in recwarn if "two bit widths" in str(w.message)]
