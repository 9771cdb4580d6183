import copy
import warnings

import pytest
import torch
from conformance import pattern_model
from conftest import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import zq_plugin
from zq_plugin import qparams
from zq_plugin.backends import fx
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.fake_quant import FastFakeQuantize

SHAPE = (1, 12, 12)


@pytest.fixture
def calib():
    return torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))


def activation_fqs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantize) and "weight_fake_quant" not in n}


def test_calibrator_in_users_own_prepare_fx_flow(tiny_bn_net, calib):
    mapping = QConfigMapping().set_global(torch.ao.quantization.get_default_qconfig("x86"))
    prepared = prepare_fx(copy.deepcopy(tiny_bn_net), mapping, (calib[:1],))
    prepared.train()  # the calibrator must run in eval mode and give the mode back
    data = zq_plugin.synthesize(tiny_bn_net, "zeroq", num_samples=16, input_shape=SHAPE, steps=5, progress=False)
    assert zq_plugin.calibrate(prepared, data, batch_size=8) == zq_plugin.CalibrationSummary(batches=2, samples=16)
    assert prepared.training
    observers = [m for m in prepared.modules() if isinstance(m, torch.ao.quantization.ObserverBase)]
    assert observers and all(torch.isfinite(o.min_val).all() and torch.isfinite(o.max_val).all() for o in observers)
    q = convert_fx(prepared.eval())
    torch.testing.assert_close(q(calib), tiny_bn_net(calib), atol=0.3, rtol=0.1)


def test_calibrator_keeps_bn_statistics_of_qat_model(tiny_bn_net, calib):
    qc = zq_plugin.qconfig(8, 8)
    prepared = prepare_qat_fx(copy.deepcopy(tiny_bn_net).train(), QConfigMapping().set_global(qc), (calib[:1],))
    before = {k: v.clone() for k, v in prepared.state_dict().items() if "running" in k}
    zq_plugin.calibrate(prepared, calib, batch_size=16)
    assert prepared.training
    after = prepared.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_calibrate_accepts_pairs_and_rejects_bad_data(tiny_bn_net, calib):
    prepared = fx.quantize_fx(tiny_bn_net, calib)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(64)), batch_size=16)
    zq_plugin.calibrate(prepared, loader)
    with pytest.raises(ConfigError, match="no batch"):
        zq_plugin.calibrate(prepared, [])
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fx.quantize_fx(tiny_bn_net, iter([calib]))
    with pytest.raises(ConfigError, match="NaN"):
        zq_plugin.calibrate(prepared, torch.full((2, *SHAPE), float("nan")))


@pytest.mark.parametrize("a_bits", [2, 4, 8])
def test_simulation_clamps_activations(tiny_bn_net, calib, a_bits):
    sim = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=a_bits, first_last_bits=None)
    levels = 2**a_bits
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (m, o)))
        for n, m in activation_fqs(sim).items()
    ]
    with torch.no_grad():
        sim(calib * 3)  # far outside the calibrated ranges
    for h in hooks:
        h.remove()
    assert seen
    for name, (m, out) in seen.items():
        assert m.quant_max - m.quant_min + 1 == levels, name
        assert torch.unique(out).numel() <= levels, name
        lo = float((m.quant_min - m.zero_point) * m.scale)
        hi = float((m.quant_max - m.zero_point) * m.scale)
        assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6, name


def test_simulation_quantizes_weights_on_narrow_grid(tiny_bn_net, calib):
    sim = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=8, first_last_bits=None, fold=False)
    wfq = [m for n, m in sim.named_modules() if n.endswith("weight_fake_quant")]
    assert wfq and all((m.quant_min, m.quant_max) == (-7, 7) for m in wfq)
    assert all(
        int(m.observer_enabled[0]) == 0 and int(m.fake_quant_enabled[0]) == 1
        for m in sim.modules()
        if isinstance(m, FakeQuantize)
    )


def test_first_and_last_layers_stay_8bit(tiny_bn_net, calib):
    assert fx.weight_layer_names(tiny_bn_net) == ["conv1", "conv2", "short", "dw", "fc"]
    sim = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4, fold=False)
    wq = {
        n.removesuffix(".weight_fake_quant"): m.quant_max
        for n, m in sim.named_modules()
        if n.endswith("weight_fake_quant")
    }
    assert wq["conv1"] == 127 and wq["fc"] == 127 and wq["conv2"] == 7 and wq["dw"] == 7


def test_a_traced_model_keeps_its_first_and_last_layers():
    # a GraphModule holds its submodules in plain nn.Module containers, which torch.fx's leaf rule
    # calls leaves: the first layer was missed and quantized at 4 bits (found on fuse()'s output)
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Flatten(), nn.Sequential(nn.Linear(144, 3)))
    traced = torch.fx.symbolic_trace(net)
    assert fx.weight_layer_names(traced) == fx.weight_layer_names(net) == ["0.0", "2.0"]
    sim = fx.quantize_fx(traced, torch.randn(8, 1, 8, 8), w_bits=4, a_bits=4, fold=False)
    assert sim.get_submodule("0.0").weight_fake_quant.quant_max == 127


def test_source_model_unchanged(tiny_bn_net, calib):
    tiny_bn_net.train()
    before = snapshot(tiny_bn_net)
    fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4)
    assert_unchanged(tiny_bn_net, before)


def test_eight_bit_simulation_is_close_to_float(tiny_bn_net, calib):
    sim = fx.quantize_fx(tiny_bn_net, calib)
    ref = tiny_bn_net(calib)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (sim(calib) - ref).pow(2).mean())
    assert sqnr > 25


def test_int8_model_matches_simulation(tiny_bn_net, calib):
    int8 = fx.convert_int8_fx(tiny_bn_net, calib)
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    sim = fx.quantize_fx(tiny_bn_net, calib, first_last_bits=None)
    torch.testing.assert_close(int8(calib), sim(calib), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bad_bits(tiny_bn_net, calib, bits):
    with pytest.raises(ConfigError, match="2 to 8"):
        fx.quantize_fx(tiny_bn_net, calib, w_bits=bits)
    with pytest.raises(ConfigError, match="a_bits"):
        zq_plugin.qconfig(8, bits)


@given(
    bits=st.integers(2, 8),
    per_channel=st.booleans(),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 100),
)
def test_fast_fake_quantize_equals_torch(bits, per_channel, symmetric, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, generator=gen) * scale
    if per_channel:
        qmin, qmax = qparams.quant_range(bits, signed=True, narrow=True)
        kw = {
            "observer": PerChannelMinMaxObserver,
            "dtype": torch.qint8,
            "ch_axis": 0,
            "qscheme": torch.per_channel_symmetric if symmetric else torch.per_channel_affine,
        }
    else:
        qmin, qmax = qparams.quant_range(bits, signed=False)
        kw = {
            "observer": MinMaxObserver,
            "dtype": torch.quint8,
            "qscheme": torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        }
    ref, fast = (
        FakeQuantize(quant_min=qmin, quant_max=qmax, **kw),
        FastFakeQuantize(quant_min=qmin, quant_max=qmax, **kw),
    )
    ref(x), fast(x)
    ref.disable_observer(), fast.disable_observer()
    y = torch.randn(4, 3, 5, generator=gen) * scale * 1.5
    with torch.no_grad():
        assert torch.equal(fast(y), ref(y))
    # with a gradient the torch path (straight-through estimator) is used
    y.requires_grad_(True)
    fast(y).sum().backward()
    assert y.grad is not None


def test_folded_weights_lie_on_the_grid(tiny_bn_net, calib):
    folded = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4)
    for name in ("conv2", "dw"):  # 4-bit layers: at most 15 levels per output channel
        w = folded.get_submodule(name)
        w = (w[0] if isinstance(w, torch.nn.Sequential) else w).weight
        assert all(torch.unique(w[c]).numel() <= 15 for c in range(w.shape[0])), name


def test_folded_simulation_equals_qat_modules(tiny_bn_net, calib):
    qat = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4, fold=False)
    folded = fx.quantize_fx(tiny_bn_net, calib, w_bits=4, a_bits=4)
    assert any(n.endswith("weight_fake_quant") for n, _ in qat.named_modules())
    assert not any(n.endswith("weight_fake_quant") for n, _ in folded.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(calib * 2), qat(calib * 2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- issue 13: models this project did not write


def _weights_used(sim, name):
    """The weight a layer of a simulation actually multiplies with (fake-quantized when not folded)."""
    m = sim.get_submodule(name)
    return m.weight_fake_quant(m.weight) if hasattr(m, "weight_fake_quant") else m.weight


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "qat"])
def test_conv_transpose_weight_is_quantized_per_output_channel(fold):
    model, shape = pattern_model("conv_transpose")
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    sim = fx.quantize_fx(model, data, w_bits=4, a_bits=4, fold=fold)
    w = _weights_used(sim, "2")  # ConvTranspose2d weight [C_in, C_out, k, k]: output channels on axis 1
    assert w.shape[1] == 6
    assert all(torch.unique(w[:, c]).numel() <= 2**4 - 1 for c in range(w.shape[1]))
    assert sim.zq_float_layers == ()
    with torch.no_grad():
        assert torch.isfinite(sim(data)).all()


def test_conv_transpose_as_last_layer_keeps_first_last_bits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.ConvTranspose2d(4, 2, 3)).eval()
    data = torch.randn(8, 1, 8, 8)
    sim = fx.quantize_fx(model, data, w_bits=2, a_bits=4, first_last_bits=4, fold=False)
    assert sim.get_submodule("2").weight_fake_quant.quant_max == 7  # the last layer: 4 bits, not 2
    w = _weights_used(sim, "2")
    assert all(torch.unique(w[:, c]).numel() <= 15 for c in range(2))


def test_conv_transpose_int8_model():
    model, shape = pattern_model("conv_transpose")
    data = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    int8 = fx.convert_int8_fx(model, data)  # torch's bare AssertionError before (per-channel ConvTranspose)
    assert "quantized" in type(int8.get_submodule("2")).__module__
    assert int8.zq_float_layers == ()
    torch.testing.assert_close(int8(data), model(data), atol=0.05, rtol=0.05)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.attn, self.fc = (
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.MultiheadAttention(8, 2),
            torch.nn.Linear(8, 3),
        )

    def forward(self, x):
        h = self.conv(x).flatten(2).permute(2, 0, 1)  # [L, N, 8]
        h, _ = self.attn(h, h, h)
        return self.fc(h.mean(0))


@pytest.mark.parametrize("entry", ["quantize_fx", "convert_int8_fx"])
def test_float_layers_are_listed_and_warned(entry):
    torch.manual_seed(0)
    model = _Attention().eval()
    with pytest.warns(UserWarning, match=r"1 weight layer\(s\) left in float \(attn\)"):
        q = getattr(fx, entry)(model, torch.randn(8, 1, 6, 6))
    assert q.zq_float_layers == ("attn",)


def test_float_layers_from_a_none_qconfig(tiny_bn_net, calib):
    mapping = fx.uniform_qconfig_mapping(tiny_bn_net, 4, 4).set_module_name("dw", None)
    with pytest.warns(UserWarning, match="left in float"):
        sim = fx.quantize_fx(tiny_bn_net, calib, mapping=mapping)
    assert sim.zq_float_layers == ("dw",)
    assert fx.quantize_fx(tiny_bn_net, calib).zq_float_layers == ()


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


@pytest.mark.parametrize("entry", ["quantize_fx", "convert_int8_fx"])
def test_untraceable_model_raises_model_error(entry):
    model = _Branchy().eval()
    before = snapshot(model)
    with pytest.raises(ModelError, match=r"not symbolically traceable.*if x\.sum\(\) > 0.*torch\.export"):
        getattr(fx, entry)(model, torch.randn(4, 1, 6, 6))
    assert_unchanged(model, before)


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x, mask):
        return self.conv(x) * mask


def test_calibrate_passes_extra_inputs_with_input_fn():
    x, mask = torch.randn(6, 1, 5, 5), torch.full((6, 2, 3, 3), 2.0)
    seen = []
    model = _Masked()
    model.register_forward_hook(lambda m, args, out: seen.append([a.clone() for a in args]))
    zq_plugin.calibrate(model, [(x, mask)], input_fn=lambda b: (b[0], b[1]))
    assert torch.equal(seen[0][0], x) and torch.equal(seen[0][1], mask)
    # the rule without input_fn: a batch is x or (x, label, ...), the model gets x
    seen.clear()
    plain = torch.nn.Identity()
    plain.register_forward_hook(lambda m, args, out: seen.append(args))
    zq_plugin.calibrate(plain, [(x, torch.zeros(6)), x])
    assert [len(a) for a in seen] == [1, 1] and all(torch.equal(a[0], x) for a in seen)
    with pytest.raises(ConfigError, match="input_fn"):
        zq_plugin.calibrate(plain, [("not", "tensors")])


def test_quantize_fx_with_extra_inputs():
    torch.manual_seed(0)
    x, mask = torch.randn(6, 1, 5, 5), torch.ones(6, 2, 3, 3)
    sim = fx.quantize_fx(_Masked().eval(), [(x, mask)], w_bits=4, a_bits=4, input_fn=tuple)
    assert sim(x, mask).shape == (6, 2, 3, 3)


def test_calibrate_moves_batches_to_the_model_device():
    model = torch.nn.Linear(3, 2, device="meta")  # any non-CPU device shows the move; meta runs anywhere
    devices = []
    model.register_forward_pre_hook(lambda m, args: devices.append(args[0].device))
    zq_plugin.calibrate(model, torch.randn(4, 3), batch_size=2)
    assert devices == [torch.device("meta")] * 2


def test_calibrate_prepared_pt2e_model():
    pt2e = pytest.importorskip("zq_plugin.observers.pt2e")
    ao = zq_plugin._compat.torchao_pt2e()

    class FourBit(ao.Quantizer):
        def annotate(self, gm):
            for n in gm.graph.nodes:
                if n.op == "call_function" and n.target in (
                    torch.ops.aten.conv2d.default,
                    torch.ops.aten.linear.default,
                ):
                    act = ao.QuantizationSpec(
                        dtype=torch.uint8, quant_min=0, quant_max=15, qscheme=torch.per_tensor_affine,
                        observer_or_fake_quant_ctr=pt2e.PercentileObserver,
                    )  # fmt: skip
                    wt = ao.QuantizationSpec(
                        dtype=torch.int8, quant_min=-7, quant_max=7, qscheme=torch.per_channel_symmetric, ch_axis=0,
                        observer_or_fake_quant_ctr=pt2e.PerChannelMSEObserver,
                    )  # fmt: skip
                    n.meta["quantization_annotation"] = ao.QuantizationAnnotation(
                        input_qspec_map={n.args[0]: act, n.args[1]: wt}, _annotated=True
                    )
            return gm

        def validate(self, gm):
            pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3),
    ).eval()  # fmt: skip
    data = torch.randn(8, 1, 8, 8)
    prepared = ao.prepare_pt2e(torch.export.export(copy.deepcopy(model), (data,)).module(), FourBit())
    code = prepared.code
    summary = zq_plugin.calibrate(prepared, data, batch_size=8)  # NotImplementedError from eval() before
    assert summary == zq_plugin.CalibrationSummary(batches=1, samples=8)
    assert prepared.code == code  # the graph is given back as it was (eval dropout stays eval, p=0.2)
    with pytest.raises(NotImplementedError):
        prepared.eval()  # the exported model's own switches are as they were
    converted = ao.convert_pt2e(prepared)
    levels = [n.args[-2] - n.args[-3] + 1 for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target)]
    assert levels and set(levels) == {16}
    # accuracy() runs exported models too (their eval() raises), and gives the graph back as it was
    labels = model(data).argmax(1)
    code = converted.code
    expected = 100.0 * float((converted(data).argmax(1) == labels).float().mean())
    assert zq_plugin.accuracy(converted, data, labels) == expected
    assert converted.code == code
    out = converted(data)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(data), atol=1.0, rtol=0.5)


def test_exported_model_of_a_fixed_batch_gets_a_named_error():
    """torch.export specializes the batch size unless told otherwise; calibrate names the fix."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()).eval()
    exported = torch.export.export(model, (torch.randn(1, 1, 5, 5),)).module()
    with pytest.raises(ConfigError, match=r"specialized it to the example's shape.*Dim\.AUTO"):
        zq_plugin.calibrate(exported, torch.randn(8, 1, 5, 5), batch_size=4)


def test_calibrate_returns_a_one_line_summary(tiny_bn_net):
    """In a REPL, calibrate(...) shows what it saw, not a 1,300-line model repr; the model is calibrated in place."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = zq_plugin.uniform_qconfig_mapping(tiny_bn_net, 4, 4)
    data = torch.randn(10, 1, 12, 12)
    prepared = prepare_fx(copy.deepcopy(tiny_bn_net), mapping, (data[:1],))
    summary = zq_plugin.calibrate(prepared, data, batch_size=4)
    assert summary == zq_plugin.CalibrationSummary(batches=3, samples=10)
    assert repr(summary) == "CalibrationSummary(batches=3, samples=10)"
    observed = [m for m in prepared.modules() if isinstance(getattr(m, "min_val", None), torch.Tensor)]
    assert observed and all(torch.isfinite(m.min_val).all() for m in observed)


def test_int8_depthwise_conv_does_not_saturate():
    """x86/fbgemm's depthwise kernel saturates uint8 x int8 pairs in int16 with 8-bit activations: 7 bits there."""
    m = torch.nn.Conv2d(144, 144, 3, groups=144, padding=1, bias=False).eval()
    with torch.no_grad():
        m.weight.fill_(1.0)
    x = torch.ones(4, 144, 16, 16)
    x[0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = zq_plugin.convert_int8_fx(m, x)
    with torch.no_grad():
        got = q(x)[1, :, 3, 3]
    torch.testing.assert_close(got, torch.full_like(got, 9.0), atol=0.1, rtol=0)  # was 5.05 with 8-bit activations


class SpatialMean(torch.nn.Module):
    """torchvision's MNASNet/ShuffleNetV2 head: x.mean([2, 3]) after the last conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.mean([2, 3])) + torch.mean(h, (-2, -1), keepdim=True).flatten(1).sum(1, keepdim=True)


def test_int8_model_with_spatial_means_runs_and_matches_float():
    torch.manual_seed(0)
    m = SpatialMean().eval()
    x = torch.rand(16, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = zq_plugin.convert_int8_fx(m, x)  # torch's quantized mean over [2, 3] raised at run time
    with torch.no_grad():
        got, want = q(x), m(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def _bn_net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(inplace=True),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 3),
    )
    m.train()
    m(torch.randn(16, 1, 8, 8))
    return m.eval()


def test_float64_model_through_every_fx_entry_point():
    """Found from outside: a .double() model hit 'Input type (float) and bias type (double)' in every backend call."""
    from zq_plugin.mixed_precision import pareto_plan

    model, x = _bn_net().double(), torch.randn(16, 1, 8, 8)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = zq_plugin.quantize_fx(model, x, w_bits=4, a_bits=4)
        int8 = zq_plugin.convert_int8_fx(model, x)  # torch's int8 kernels: converted to float32 first
        pareto_plan(model, x, budget="MP4", bits=(4, 8), progress=False)
    assert torch.isfinite(sim(x.double())).all() and torch.isfinite(int8(x)).all()
    assert 0 <= zq_plugin.accuracy(model, x, torch.zeros(16, dtype=torch.long)) <= 100
    assert_unchanged(model, before)
    mixed = _bn_net()
    mixed[4].double()
    with pytest.raises(zq_plugin.ConfigError, match="mixes floating dtypes"):
        zq_plugin.quantize_fx(mixed, x)


class _MaskedBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _bn_net()

    def forward(self, x, mask):
        return self.net(x * mask)


@pytest.mark.parametrize("entry", ["quantize_fx", "convert_int8_fx", "calibrate"])
def test_extra_inputs_without_input_fn_get_a_named_error(entry):
    """Found from outside: forward(x, mask) without input_fn raised a bare TypeError (ShapeProp printed one too)."""
    fn = getattr(zq_plugin, entry)
    with pytest.raises(zq_plugin.ConfigError, match=r"missing 1 required positional argument: 'mask'.*input_fn"):
        fn(_MaskedBN(), torch.randn(8, 1, 8, 8))


def test_calibration_data_of_the_wrong_shape_get_a_named_error():
    with pytest.raises(zq_plugin.ConfigError, match=r"first calibration batch, inputs of shape \(4, 3, 8, 8\)"):
        zq_plugin.quantize_fx(_bn_net(), torch.randn(4, 3, 8, 8))


@pytest.mark.parametrize("kind", ["module", "functional", "hardtanh"])
def test_relu6_after_conv_bn_is_observed_after_the_activation(kind):
    """FX would observe the signed conv output before a ReLU6 (half a 4-bit grid wasted); zero point 0 now."""
    import torch.nn.functional as F

    from zq_plugin.backends.fx import relu6_as_relu_then_clamp

    act = {"module": nn.ReLU6(), "functional": F.relu6, "hardtanh": lambda t: F.hardtanh(t, 0.0, 6.0)}[kind]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)
            self.act = act if isinstance(act, nn.Module) else nn.Identity()

        def forward(self, x):
            y = self.bn(self.conv(x))
            y = self.act(y) if kind == "module" else act(y)
            return self.fc(torch.flatten(y, 1))

    torch.manual_seed(0)
    net = Net().eval()
    x = 4 * torch.randn(64, 1, 8, 8)
    torch.testing.assert_close(relu6_as_relu_then_clamp(net)(x), net(x))  # the same function
    sim = zq_plugin.quantize_fx(net, x, w_bits=4, a_bits=4, first_last_bits=None)
    fqs = [m for m in sim.modules() if hasattr(m, "zero_point") and not m.is_per_channel]
    assert len(fqs) == 2  # the two layers' inputs: the image, the ReLU6 output (the logits stay float)
    assert int(fqs[1].zero_point) == 0 and int(fqs[1].quant_max) == 15
    # the shared observer sees the clamped tensor only: its grid ends at 6, not at the ReLU's max
    assert float(net.bn(net.conv(x)).max()) > 9.0
    assert float(fqs[1].scale) * 15 == pytest.approx(6.0, rel=1e-5)


def test_clip_before_shared_observer_keeps_the_function_and_narrows_the_range():
    """``fq(x) -> clamp -> fq`` (one instance) becomes ``fq(clamp(x)) -> clamp -> fq``; float outputs unchanged."""
    from zq_plugin import _compat
    from zq_plugin.backends.fx import clip_before_shared_observer, relu6_as_relu_then_clamp, uniform_qconfig_mapping

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 3)).eval()
    x = 4 * torch.randn(16, 1, 8, 8)
    mapping = uniform_qconfig_mapping(net, 4, 4, first_last_bits=None)
    prepared = _compat.prepare_qat_fx(relu6_as_relu_then_clamp(copy.deepcopy(net)), mapping, (x,)).eval()
    prepared.apply(_compat.disable_fake_quant)
    assert len(clip_before_shared_observer(prepared)) == 1
    torch.testing.assert_close(prepared(x), net(x))
    assert clip_before_shared_observer(prepared) == []  # the pattern is gone: a second call changes nothing


@pytest.mark.parametrize("kind", ["hardswish", "silu", "gelu", "functional_hardswish", "functional_silu"])
def test_negative_lobe_activations_keep_their_minimum(kind):
    """Hardswish/SiLU/GELU outputs keep a negative level at 4 bits (a shrinking search rounded the lobe to 0)."""
    import torch.nn.functional as F

    from zq_plugin.observers import MSEObserver, PerChannelMSEObserver

    modules = {"hardswish": nn.Hardswish(), "silu": nn.SiLU(), "gelu": nn.GELU()}
    functions = {"functional_hardswish": F.hardswish, "functional_silu": F.silu}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)
            self.act = modules.get(kind, nn.Identity())

        def forward(self, x):
            y = self.bn(self.conv(x))
            y = self.act(y) if kind in modules else functions[kind](y)
            return self.fc(torch.flatten(y, 1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # conv and BN pass the image through: the activation sees N(0, 1) and a long tail
        net.conv.weight.zero_()[:, 0, 1, 1] = 1.0
        net.conv.bias.zero_()
    x = torch.randn(64, 1, 8, 8)
    x.view(-1)[::97] = 12 * torch.rand(x.numel() // 97 + 1)[: x.view(-1)[::97].numel()]
    sim = zq_plugin.quantize_fx(
        net, x, w_bits=4, a_bits=4, first_last_bits=None,
        act_observer=MSEObserver, weight_observer=PerChannelMSEObserver,
    )  # fmt: skip
    fqs = [m for m in sim.modules() if hasattr(m, "zero_point") and not m.is_per_channel]
    assert len(fqs) == 2  # the two layers' inputs: the image, the activation output behind the flatten
    assert [fq.activation_post_process.keep_min for fq in fqs] == [False, True]
    fq, observer = fqs[1], fqs[1].activation_post_process
    assert float(observer.calculate_range()[0]) == float(observer.min_val) < 0
    assert float(-fq.zero_point * fq.scale) <= float(observer.min_val) + float(fq.scale) / 2
    if kind == "hardswish":
        assert int(fq.zero_point) == 1  # 0 before: every negative value rounded to zero
