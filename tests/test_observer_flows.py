"""Every observer inside the real flows: prepare_fx + convert_fx, the clamping FX simulation, PT2E, FakeQuantize."""

import copy

import pytest
import torch
from conformance import pt2e_specs
from torch.ao.quantization import FakeQuantize, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

from zq_plugin import _compat
from zq_plugin.backends import fx
from zq_plugin.fake_quant import FastFakeQuantize
from zq_plugin.observers import ao

SHAPE = (1, 12, 12)
STATS = ("MSE", "Percentile", "ACIQ", "Entropy")


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp(min=1e-20)))


@pytest.fixture
def calib():
    return torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))


def pair(module, stat):
    return getattr(module, stat + "Observer"), getattr(module, "PerChannel" + stat + "Observer")


@pytest.mark.parametrize("stat", STATS)
def test_prepare_fx_convert_fx_8bit(tiny_bn_net, calib, stat):
    act, wt = pair(ao, stat)
    qconfig = fx.qconfig(8, 8, act_observer=act, weight_observer=wt, fake_quant=False)
    prepared = prepare_fx(copy.deepcopy(tiny_bn_net), QConfigMapping().set_global(qconfig), (calib[:1],))
    observers = [m for m in prepared.modules() if isinstance(m, act)]
    assert observers, "prepare_fx did not insert our observers"
    fx.calibrate(prepared, calib)
    quantized = convert_fx(prepared)
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules())
    assert sqnr(tiny_bn_net(calib), quantized(calib)) > 20


@pytest.mark.parametrize("stat", STATS)
def test_clamping_fx_simulation_at_4_bits(tiny_bn_net, calib, stat):
    act, wt = pair(ao, stat)
    sim = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4, act_observer=act, weight_observer=wt)
    fqs = {n: m for n, m in sim.named_modules() if isinstance(m, FakeQuantize)}
    four = [m for m in fqs.values() if m.quant_max == 15]
    assert four and all(isinstance(m.activation_post_process, act) for m in four)
    # the search ran exactly once per quantizer, at freeze time
    assert all(m.activation_post_process.search_calls == 1 for m in four)
    out = sim(calib)
    assert torch.isfinite(out).all()
    assert sqnr(tiny_bn_net(calib), out) > 3
    # a 4-bit activation holds at most 16 values
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o)) for n, m in fqs.items()]
    sim(calib)
    for h in hooks:
        h.remove()
    for n, m in fqs.items():
        if m.quant_max == 15:
            assert torch.unique(seen[n]).numel() <= 16, n


@pytest.mark.parametrize("stat", STATS)
def test_fast_fake_quantize_searches_once_per_calibration(calib, stat):
    act, _ = pair(ao, stat)
    fq = FastFakeQuantize(observer=act, quant_min=0, quant_max=15)
    fq.disable_fake_quant()
    for batch in calib.split(8):  # calibration: observe only
        assert fq(batch) is batch
    assert fq.activation_post_process.search_calls == 0
    fq.disable_observer()  # the qparams settle here, once
    fq.enable_fake_quant()
    assert fq.activation_post_process.search_calls == 1
    expected = fq.activation_post_process.calculate_qparams()
    assert torch.equal(fq.scale, expected[0])
    with torch.no_grad():
        for batch in calib.split(8):
            fq(batch)
    assert fq.activation_post_process.search_calls == 1
    # identical to torch's FakeQuantize fed the same batches
    ref = FakeQuantize(observer=act, quant_min=0, quant_max=15)
    ref.disable_fake_quant()
    for batch in calib.split(8):
        ref(batch)
    assert torch.equal(ref.scale, fq.scale) and torch.equal(ref.zero_point, fq.zero_point)


def test_torch_fake_quantize_searches_per_batch_while_observing_only(calib):
    """Documented behaviour of torch's own FakeQuantize: one search per observed batch, none after."""
    fq = FakeQuantize(observer=ao.MSEObserver, quant_min=0, quant_max=15)
    for batch in calib.split(8):
        fq(batch)
    assert fq.activation_post_process.search_calls == 8
    fq.disable_observer()
    for batch in calib.split(8):
        fq(batch)
    assert fq.activation_post_process.search_calls == 8


def test_state_dict_of_fast_fake_quantize_carries_settled_qparams(calib):
    fq = FastFakeQuantize(observer=ao.PercentileObserver, quant_min=0, quant_max=15)
    fq.disable_fake_quant()
    fq(calib)
    state = fq.state_dict()
    assert torch.equal(state["scale"], fq.activation_post_process.calculate_qparams()[0])


def test_prepare_qat_fx_with_weight_observers(tiny_bn_net, calib):
    qconfig = fx.qconfig(4, 4, act_observer=ao.MSEObserver, weight_observer=ao.PerChannelMSEObserver)
    prepared = prepare_qat_fx(copy.deepcopy(tiny_bn_net).train(), QConfigMapping().set_global(qconfig), (calib[:1],))
    prepared.train()
    out = prepared(calib)  # QAT forward: observe + fake-quantize in one pass, gradients flow
    out.sum().backward()
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# PT2E


pt2e_missing = not _compat.has_torchao()


def pt2e_quantize(model, calib, a_bits, w_bits, act, wt):
    ns = _compat.torchao_pt2e()
    act_spec, wt_spec = pt2e_specs(ns, act, wt, a_bits, w_bits)
    config = ns.QuantizationConfig(act_spec, None, wt_spec, None, False)
    exported = torch.export.export(
        copy.deepcopy(model), (calib[:2],), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    ).module()
    prepared = ns.prepare_pt2e(exported, ns.X86InductorQuantizer().set_global(config))
    ours = [m for m in prepared.modules() if isinstance(m, act if isinstance(act, type) else act.p.func)]
    assert ours, "prepare_pt2e did not insert our observers"
    with torch.no_grad():
        for batch in calib.split(16):
            prepared(batch)
    return ns.convert_pt2e(prepared)


@pytest.mark.skipif(pt2e_missing, reason="torchao is not installed")
@pytest.mark.parametrize("stat", STATS)
def test_prepare_pt2e_convert_pt2e(tiny_bn_net, calib, stat):
    from zq_plugin.observers import pt2e

    act, wt = pair(pt2e, stat)
    q8 = pt2e_quantize(tiny_bn_net, calib, 8, 8, act, wt)
    targets = [str(n.target) for n in q8.graph.nodes]
    assert any("quantize_per_tensor" in t for t in targets)
    assert any("dequantize_per_channel" in t for t in targets)
    with torch.no_grad():
        assert sqnr(tiny_bn_net(calib), q8(calib)) > 20
    q4 = pt2e_quantize(tiny_bn_net, calib, 4, 4, act.with_args(), wt)
    # quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    ranges = {tuple(n.args[3:5]) for n in q4.graph.nodes if "quantize_per_tensor" in str(n.target)}
    assert (0, 15) in ranges
    with torch.no_grad():
        assert torch.isfinite(q4(calib)).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_fast_fake_quantize_scripts_like_torch_fake_quantize(calib, per_channel):
    """torch.jit.script of FastFakeQuantize with torch's observer works and computes the same values."""
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

    if per_channel:
        kw = {"observer": PerChannelMinMaxObserver, "quant_min": -8, "quant_max": 7, "dtype": torch.qint8}
        kw.update(qscheme=torch.per_channel_symmetric, ch_axis=1)
    else:
        kw = {"observer": MinMaxObserver, "quant_min": 0, "quant_max": 15}
    eager, ref = FastFakeQuantize(**kw), FakeQuantize(**kw)
    scripted = torch.jit.script(FastFakeQuantize(**kw))
    for m in (eager, ref, scripted):
        m.disable_fake_quant()
        for batch in calib.split(16):
            m(batch)
        m.disable_observer()
        m.enable_fake_quant()
    x = 1.5 * calib[:8]
    with torch.no_grad():
        out = scripted(x)
        assert torch.equal(out, eager(x)) and torch.equal(out, ref(x))
    assert torch.equal(scripted.scale, ref.scale) and torch.equal(scripted.zero_point, ref.zero_point)
    assert torch.unique(out[:, :1] if per_channel else out).numel() <= 16


def test_fast_fake_quantize_with_our_observer_refuses_scripting_by_name():
    from zq_plugin.errors import ModelError

    fq = FastFakeQuantize(observer=ao.PercentileObserver, quant_min=0, quant_max=15)
    with pytest.raises(ModelError, match=r"PercentileObserver cannot be compiled by torch\.jit\.script"):
        torch.jit.script(fq)
