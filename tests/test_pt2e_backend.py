"""The PT2E backend (issue 16, first part): plan bits reach the q/dq nodes; dynamic batch; no mutation."""

import pytest
import torch
from conftest import assert_unchanged, pool_bn_net, snapshot
from torch import nn

from zq_plugin.backends.pt2e import quantize_pt2e
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.mixed_precision import BitPlan
from zq_plugin.observers import pt2e as zp


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    )  # fmt: skip
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _ranges(q):
    """``(kind, quant_min, quant_max)`` of every q/dq node, in graph order."""
    found = []
    for node in q.graph.nodes:
        name = str(node.target)
        if node.op == "call_function" and name.startswith("quantized_decomposed.dequantize_per_"):
            kind = "weight" if "per_channel" in name else "act"
            qmin, qmax = node.args[-3], node.args[-2]
            found.append((kind, int(qmin), int(qmax)))
    return found


def test_uniform_w4a4_bits_reach_the_q_dq_nodes_with_first_and_last_at_8_bits():
    q = quantize_pt2e(_net(), torch.randn(64, 1, 8, 8), w_bits=4, a_bits=4)
    ranges = _ranges(q)
    assert sorted(r for r in ranges if r[0] == "weight") == [
        ("weight", -127, 127),
        ("weight", -127, 127),
        ("weight", -7, 7),
    ]
    assert sorted(r for r in ranges if r[0] == "act") == [("act", 0, 15), ("act", 0, 255), ("act", 0, 255)]


def test_a_plan_sets_each_layers_bits_and_dynamic_batch_runs():
    net = _net()
    plan = BitPlan.uniform(net, w_bits=8, a_bits=8, first_last_bits=None).replace_layer("3", w_bits=2, a_bits=4)
    before = snapshot(net)
    q = quantize_pt2e(net, torch.randn(64, 1, 8, 8), plan=plan, act_observer=zp.MSEObserver,
                      weight_observer=zp.PerChannelMSEObserver)  # fmt: skip
    assert_unchanged(net, before)  # weights, buffers and modes of the source model
    assert ("weight", -1, 1) in _ranges(q) and ("act", 0, 15) in _ranges(q)
    for batch in (1, 3, 50):
        x = torch.randn(batch, 1, 8, 8)
        assert q(x).shape == (batch, 3)


def test_w8a8_is_close_to_float_and_4_bits_clamp():
    net, x = _net(), torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
        err8 = (quantize_pt2e(net, x)(x) - ref).pow(2).mean() / ref.pow(2).mean()
        err2 = (quantize_pt2e(net, x, w_bits=2, a_bits=2, first_last_bits=None)(x) - ref).pow(2).mean()
    assert err8 < 1e-3
    assert err2 / ref.pow(2).mean() > 10 * err8  # 2 bits are really 2 bits: the q/dq ops clamp


def test_bad_plans_and_models_get_named_errors():
    net = _net()
    per_tensor = BitPlan.uniform(net, w_bits=4, a_bits=4, granularity="per_tensor")
    with pytest.raises(ConfigError, match="per channel on a uniform grid"):
        quantize_pt2e(net, torch.randn(8, 1, 8, 8), plan=per_tensor)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.conv(x)
            return -self.conv(x)

    with pytest.raises(ModelError, match=r"torch\.export could not export Branchy"):
        quantize_pt2e(Branchy().eval(), torch.randn(8, 1, 8, 8))
    # found by the outside check of issue 16: each was silent or a bare torch error
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ConfigError, match="'nope' does not exist"):  # was ignored: all layers at 8 bits
        quantize_pt2e(net, x, plan=BitPlan({"nope": BitPlan.uniform(net, w_bits=4, a_bits=4).layers["0"]}))
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    with pytest.raises(ConfigError, match="not a torchao observer"):  # was a float model in disguise
        quantize_pt2e(net, x, act_observer=MinMaxObserver, weight_observer=PerChannelMinMaxObserver)
    with pytest.raises(ConfigError, match="pass an observer class"):
        quantize_pt2e(net, x, act_observer="mse")
    with pytest.raises(ConfigError, match="contains 'PerChannel'"):
        quantize_pt2e(net, x, weight_observer=zp.MSEObserver)
    with pytest.raises(ConfigError, match="data=None"):
        quantize_pt2e(net, None)
    with pytest.raises(ConfigError, match="input"):  # 3 channels for a 1-channel model: not "make it traceable"
        quantize_pt2e(net, torch.randn(8, 3, 8, 8))


def test_a_model_of_functional_calls_is_quantized_with_first_and_last_in_graph_order():
    """No Conv/Linear module to plan: every F.conv2d / F.linear at the uniform bits, the first and last at 8."""
    import torch.nn.functional as F

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(4, 1, 3, 3)), nn.Parameter(torch.randn(4, 4, 3, 3) / 6)
            self.w3 = nn.Parameter(torch.randn(3, 64) / 8)

        def forward(self, x):
            x = F.relu(F.conv2d(x, self.w1))
            x = F.relu(F.conv2d(x, self.w2))
            return F.linear(torch.flatten(x, 1), self.w3)

    q = quantize_pt2e(Functional().eval(), torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
    weights = [r for r in _ranges(q) if r[0] == "weight"]
    assert sorted(weights) == [("weight", -127, 127), ("weight", -127, 127), ("weight", -7, 7)]
    assert ("act", 0, 15) in _ranges(q)


def test_layers_pt2e_leaves_in_float_are_reported():
    """ConvTranspose2d has no PT2E annotation yet: listed in .zq_float_layers with a warning, not silent."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 3), nn.Flatten(), nn.Linear(128, 3))
    with pytest.warns(UserWarning, match="left in float"):
        q = quantize_pt2e(net.eval(), torch.randn(16, 1, 8, 8))
    assert q.zq_float_layers == ("2",)


def _quantize_nodes(q):
    return [n for n in q.graph.nodes if str(n.target) == "quantized_decomposed.quantize_per_tensor.default"]


class _Residual(nn.Module):
    """stem -> relu -> {a (4-bit input), b (8-bit input), identity} -> add -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.a(h) + self.b(h) + h
        return self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))


def test_no_double_quantization_between_a_4_bit_and_an_8_bit_reader_and_adds_stay_float():
    """Issue 29: only weight layers' inputs are quantized (one meaning on every backend): a residual add reads
    its float inputs, as in Brevitas and the FX simulation."""
    net = _Residual().eval()
    plan = BitPlan.uniform(net, w_bits=8, a_bits=8, first_last_bits=None).replace_layer("a", a_bits=4)
    q = quantize_pt2e(net, torch.randn(32, 1, 8, 8), plan=plan)
    quants = _quantize_nodes(q)
    # each tensor is quantized straight from its float producer, never from a dequantized value
    assert not [n for n in quants if "dequantize" in str(getattr(n.args[0], "target", ""))]
    relu = next(n for n in q.graph.nodes if n.target is torch.ops.aten.relu.default)
    on_relu = sorted((int(n.args[3]), int(n.args[4])) for n in quants if n.args[0] is relu)
    assert on_relu == [(0, 15), (0, 255)]  # one 4-bit quantization for "a", one 8-bit for "b"
    add_inputs = [a for n in q.graph.nodes if n.target is torch.ops.aten.add.Tensor for a in n.args]
    assert add_inputs and not any("dequantize" in str(a.target) for a in add_inputs)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert (q(x) - net(x)).abs().max() < 0.2 * net(x).abs().max()


def test_uncalibrated_conversion_is_refused():
    from zq_plugin import _compat
    from zq_plugin.backends.pt2e import convert, export_for_pt2e, plan_quantizer
    from zq_plugin.errors import NotCalibratedError

    net = _net()
    prepared = _compat.torchao_pt2e().prepare_pt2e(
        export_for_pt2e(net, (torch.randn(2, 1, 8, 8),)), plan_quantizer(BitPlan.uniform(net, w_bits=4, a_bits=4))
    )
    with pytest.raises(NotCalibratedError, match="saw no data"):
        convert(prepared)
    import zq_plugin

    zq_plugin.calibrate(prepared, torch.randn(16, 1, 8, 8))
    assert convert(prepared)(torch.randn(3, 1, 8, 8)).shape == (3, 3)


def test_hardswish_outputs_keep_their_minimum():
    """The PT2E twin of the FX test: an MSE input observer after Hardswish keeps the negative lobe."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3)).eval()
    with torch.no_grad():  # the first conv passes the image through: Hardswish sees N(0, 1) and a long tail
        net[0].weight.zero_()[:, 0, 1, 1] = 1.0
        net[0].bias.zero_()
    x = torch.randn(64, 1, 8, 8)
    x.view(-1)[::37] = 12 * torch.rand(x.numel() // 37 + 1)[: x.view(-1)[::37].numel()]
    q = quantize_pt2e(net, x, w_bits=4, a_bits=4, first_last_bits=None, act_observer=zp.MSEObserver)
    hardswish = next(n for n in q.graph.nodes if "hardswish" in str(n.target))
    (quant,) = [n for n in _quantize_nodes(q) if n.args[0] is hardswish]
    assert int(quant.args[2]) > 0  # zero point above 0: the negative values have levels


def test_onnx_keeps_sub_8_bit_ranges_and_agrees_with_torch(tmp_path):
    """QuantizeLinear clamps to uint8's 0..255 only; the Clip after it keeps the 4-bit range in the file."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from onnx import numpy_helper

    from zq_plugin.backends.pt2e import export_onnx

    net, x = _net(), torch.randn(64, 1, 8, 8)
    q = quantize_pt2e(net, x, w_bits=4, a_bits=4, first_last_bits=None)
    before = [str(n.target) for n in q.graph.nodes]
    path = export_onnx(q, x[:1], tmp_path / "sub" / "q.onnx")
    assert [str(n.target) for n in q.graph.nodes] == before  # the model given is not changed
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 3 and all((int(consts[c.input[1]]), int(consts[c.input[2]])) == (0, 15) for c in clips)
    # beyond the calibration range, where a missing Clip would let 4-bit levels run to 255
    xt = 3 * torch.randn(7, 1, 8, 8)
    from zq_plugin.backends.brevitas import run_onnx

    # ORT's own optimizations fuse DQ->Conv->Q into integer kernels that round differently: off
    got = run_onnx(path, xt, optimize=False)
    with torch.no_grad():
        assert torch.allclose(got, q(xt), atol=1e-5)


def test_prepare_qat_trains_through_4_bit_fake_quantizers_and_converts():
    """prepare_qat_pt2e at the plan's bits: the loss falls, the source is unchanged, the result converts at 4 bits."""
    from zq_plugin.backends.pt2e import convert, prepare_qat

    net, x = _net(), torch.randn(64, 1, 8, 8)
    before = snapshot(net)
    with torch.no_grad():
        target = net(x) + 0.5 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    qat = prepare_qat(net, x, w_bits=4, a_bits=4, first_last_bits=None)
    assert any("FakeQuantize" in type(m).__name__ for m in qat.modules())
    optimizer = torch.optim.Adam(qat.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (qat(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert_unchanged(net, before)
    q = convert(qat)
    assert ("weight", -7, 7) in _ranges(q) and ("act", 0, 15) in _ranges(q)
    assert q(torch.randn(3, 1, 8, 8)).shape == (3, 3)


@pytest.mark.xfail(strict=True, reason="issue 16, open: restoring eps broke eval-mode QAT calibration on MobileNetV3")
def test_prepare_qat_keeps_each_batchnorm_eps_through_mode_switches_and_convert():
    """torchao writes eps=1e-5 into every QAT Conv+BN (GoogLeNet's 1e-3: converted W8A8 logits 0.40 cosine)."""
    from zq_plugin.backends.pt2e import convert, move_to_eval, move_to_train, prepare_qat, quantize_pt2e

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
        nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
    ).eval()  # fmt: skip
    for bn in (net[1], net[4]):  # variances near eps, different per channel: a wrong eps changes the function
        bn.running_var.uniform_(1e-3, 1e-2)
    x = torch.randn(64, 1, 8, 8)
    qat = prepare_qat(net, x, first_last_bits=None)
    eps = [n.args[7] for n in qat.graph.nodes if n.target is torch.ops.aten.batch_norm.default]
    assert eps == [1e-3, 1e-3]
    move_to_train(move_to_eval(qat))  # torchao's switches rewrite the BatchNorm ops each time
    move_to_eval(qat)
    qat.apply(lambda m: m.disable_fake_quant() if hasattr(m, "disable_fake_quant") else None)
    with torch.no_grad():
        torch.testing.assert_close(qat(x), net(x), rtol=1e-4, atol=1e-5)  # the float function, fake quant off
    qat.apply(lambda m: m.enable_fake_quant() if hasattr(m, "enable_fake_quant") else None)
    with torch.no_grad():
        err_qat = (convert(qat)(x) - net(x)).abs().max()
        err_ptq = (quantize_pt2e(net, x, first_last_bits=None)(x) - net(x)).abs().max()
    assert float(err_qat) < 2 * float(err_ptq) + 1e-3  # the fold uses the model's eps too


def test_reconstruct_pt2e_carries_the_rounded_weights_and_learned_steps():
    """Issue 16 item 1: a reconstruction's result in a PT2E model equals the FX simulation's (issue 29: exactly)."""
    import dataclasses

    from zq_plugin.backends.pt2e import reconstruct_pt2e
    from zq_plugin.reconstruct import METHODS, reconstruct_fx

    net = pool_bn_net()
    x = torch.randn(64, 1, 8, 8)
    quick = dataclasses.replace(METHODS["genie-m"], iterations=30)
    kwargs = {"w_bits": 4, "a_bits": 4, "first_last_bits": None, "config": quick, "progress": False}
    before = snapshot(net)
    q = reconstruct_pt2e(net, x, **kwargs)
    assert_unchanged(net, before)
    assert q.zq_carried == {"weight_steps": 3, "act_steps": 3, "layers": 3}
    assert [r["unit"] for r in q.zq_reconstruction] == ["0", "4", "7"]
    plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)  # what reconstruct_pt2e gives FX
    sim = reconstruct_fx(net, x, plan=plan, config=quick, progress=False)  # the same seed: the same reconstruction
    test = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(test), sim(test), atol=1e-5, rtol=1e-5)


def test_a_missing_torchao_names_the_extra_before_any_work(monkeypatch):
    import sys

    from zq_plugin import _compat
    from zq_plugin.backends.pt2e import prepare_qat, reconstruct_pt2e
    from zq_plugin.errors import MissingDependencyError

    monkeypatch.setattr(_compat, "_TORCHAO", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)  # makes the import fail
    for entry in (quantize_pt2e, prepare_qat, reconstruct_pt2e):
        with pytest.raises(MissingDependencyError, match=r"zq-plugin\[pt2e\]"):
            entry(_net(), torch.randn(8, 1, 8, 8))


def test_torchao_pattern_cache_gives_the_graphs_torchao_builds_and_leaves_torchao_as_it_was():
    """Mode switches with the cached rewrite patterns equal torchao's own; the patch ends with the block.

    (Its QAT ``convert_pt2e`` equals torchao's in test_prepare_qat_trains_through_...: a plain
    torchao convert exports 96 patterns, 40 s, too slow to repeat here.)
    """
    import copy

    import torchao.quantization.pt2e as ao_pt2e
    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as ao_utils

    from zq_plugin import _compat
    from zq_plugin.backends.pt2e import prepare_qat

    ao = _compat.torchao_pt2e()
    original = ao_utils._get_aten_graph_module_for_pattern
    x = torch.randn(16, 1, 8, 8)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3))
    qat = prepare_qat(net.eval(), x, w_bits=8, a_bits=8)
    _compat._PATTERNS.clear()
    models = []
    for switch in (ao.move_exported_model_to_eval, ao.move_exported_model_to_eval, ao_pt2e.move_exported_model_to_eval):
        model = copy.deepcopy(qat)  # cached, again from the cache (deep copies), torchao alone
        ao.move_exported_model_to_train(model)
        switch(model)
        models.append(model)
    assert _compat._PATTERNS, "no pattern was cached"
    cached, again, plain = models
    assert str(cached.graph) == str(plain.graph) == str(again.graph)
    assert torch.equal(cached(x), plain(x)) and torch.equal(again(x), plain(x))
    assert ao_utils._get_aten_graph_module_for_pattern is original
    assert qat_utils._get_aten_graph_module_for_pattern is original


def test_pattern_key_counts_shapes_not_values_and_refuses_what_it_cannot_freeze():
    from zq_plugin._compat import _pattern_key

    def pattern(x, scale):
        return x * scale

    a = _pattern_key(pattern, (torch.randn(1, 3),), False, {"scale": torch.randn(1)})
    assert a == _pattern_key(pattern, (torch.zeros(1, 3),), False, {"scale": torch.ones(1)})
    assert a != _pattern_key(pattern, (torch.randn(2, 3),), False, {"scale": torch.randn(1)})
    assert a != _pattern_key(pattern, (torch.randn(1, 3),), True, {"scale": torch.randn(1)})
    held = torch.randn(3)

    def over_a_tensor(x):
        return x * held

    assert _pattern_key(over_a_tensor, (torch.randn(1, 3),), False, {}) is None  # a constant of the graph
    table = {"a": [1]}

    def over_a_list_in_a_dict(x):
        return x * len(table)

    key = _pattern_key(over_a_list_in_a_dict, (torch.randn(1, 3),), False, {})
    table["a"].append(2)
    assert key is not None and key != _pattern_key(over_a_list_in_a_dict, (torch.randn(1, 3),), False, {})
    assert _pattern_key(nn.ReLU(), (torch.randn(1, 3),), False, {}) is None  # a module: not cached
