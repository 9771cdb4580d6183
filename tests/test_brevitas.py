import builtins
import copy
import importlib
import io

import pytest
import torch
import torch.nn.functional as F
from conformance import conv_transpose_net
from torch import nn

import zq_plugin
from tests.conftest import assert_unchanged, snapshot
from zq_plugin.data import SyntheticDataset
from zq_plugin.errors import ConfigError, MissingDependencyError, ModelError, NotCalibratedError
from zq_plugin.mixed_precision import BitPlan, LayerBits

pytest.importorskip("brevitas")
zb = pytest.importorskip("zq_plugin.backends.brevitas")

pytestmark = pytest.mark.filterwarnings("ignore")


def _data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_plan_bits_reach_the_layers_and_source_is_untouched(tiny_bn_net):
    before = snapshot(tiny_bn_net)
    plan = BitPlan(
        {
            "conv1": LayerBits(w_bits=8, a_bits=8),
            "conv2": LayerBits(w_bits=4, a_bits=5),
            "short": LayerBits(w_bits=3, a_bits=6),
            "dw": LayerBits(w_bits=6, a_bits=4),
            "fc": LayerBits(w_bits=5, a_bits=7, granularity="per_tensor"),
        }
    )
    q = zb.to_brevitas(tiny_bn_net, plan)
    assert_unchanged(tiny_bn_net, before)  # Brevitas's preprocessing ran on a copy
    for name, b in plan.layers.items():
        layer = q.get_submodule(name)
        assert int(layer.weight_quant.bit_width()) == b.w_bits, name
        assert int(layer.input_quant.bit_width()) == b.a_bits, name
    # the image and the residual sum are signed; inputs after ReLU/ReLU6 (through pooling) are not
    signed = {n: bool(q.get_submodule(n).input_quant.is_signed) for n in plan.layers}
    assert signed == {"conv1": True, "conv2": False, "short": False, "dw": False, "fc": False}
    assert zb.nonnegative_inputs(tiny_bn_net) == {n: not s for n, s in signed.items()}


def test_uncalibrated_use_raises_then_calibration_enables(tiny_bn_net):
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        q(_data(2))
    assert zb.uncalibrated(q)
    zb.calibrate(q, _data())
    assert not zb.uncalibrated(q)
    out = q(_data(4))
    ref = tiny_bn_net(_data(4))
    assert out.shape == ref.shape
    # W4A4 is close to, not equal to, the float model
    assert 0 < float((out - ref).abs().max()) < float(ref.abs().max())


def test_w8a8_close_to_float_and_bias_correction_runs(tiny_bn_net):
    x = _data(128)
    q = zb.to_brevitas(tiny_bn_net, w_bits=8, a_bits=8)
    zb.calibrate(q, x)
    ref = tiny_bn_net(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    assert sqnr > 25
    zb.bias_correct(q, x)
    sqnr_bc = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    assert sqnr_bc > 25


def test_gptq_runs_after_calibration_and_keeps_the_output_close(tiny_bn_net):
    x = _data(128)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=8)
    zb.calibrate(q, x)
    ref = tiny_bn_net(x)
    before = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    zb.gptq(q, x)
    after = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    assert after > before - 1.0  # GPTQ minimises each layer's output error; it must not wreck the model


def test_backend_does_not_care_where_data_come_from(tiny_bn_net):
    x = _data(96)
    sources = [
        x,
        SyntheticDataset(x, method="zeroq", seed=0),
        SyntheticDataset(x, method="retro", seed=1),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(96)), batch_size=64),
    ]
    outs = []
    for s in sources:
        q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
        assert zb.calibrate(q, s) == zq_plugin.CalibrationSummary(batches=2, samples=96)
        outs.append(q(x[:8]))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_export_onnx_and_onnxruntime_agree(tiny_bn_net, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxoptimizer")
    x = _data(64)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    zb.calibrate(q, x)
    with pytest.raises(NotCalibratedError):
        zb.export_onnx(zb.to_brevitas(tiny_bn_net), x[:1], tmp_path / "raw.onnx")
    assert not (tmp_path / "raw.onnx").exists()
    path = zb.export_onnx(q, x[:1], tmp_path / "sub" / "model.onnx")
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Clip"} <= ops
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:  # Constant nodes hold the rest
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    bounds = {
        (float(consts[n.input[1]]), float(consts[n.input[2]]))
        for n in graph.node
        if n.op_type == "Clip" and len(n.input) == 3 and n.input[1] in consts and n.input[2] in consts
    }
    assert (-7.0, 7.0) in bounds  # 4-bit narrow weights keep their range in the file
    out = zb.run_onnx(path, x[:16])
    ref = q(x[:16])
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 40
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_bad_plans(tiny_bn_net):
    with pytest.raises(ConfigError, match="does not exist"):
        zb.to_brevitas(tiny_bn_net, BitPlan({"conv9": LayerBits(w_bits=4, a_bits=4)}))
    with pytest.raises(ConfigError, match=r"plans cover Conv1d, Conv2d, Conv3d, ConvTranspose1d.*Linear"):
        zb.to_brevitas(tiny_bn_net, BitPlan({"bn1": LayerBits(w_bits=4, a_bits=4)}))
    with pytest.raises(ConfigError, match="non-uniform grid"):
        zb.to_brevitas(tiny_bn_net, BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8, grid="nonuniform"))
    with pytest.raises(ConfigError, match="act_stats"):
        zb.to_brevitas(tiny_bn_net, act_stats="median")
    with pytest.raises(ConfigError, match="no batch"):
        zb.calibrate(zb.to_brevitas(tiny_bn_net), [])


def test_missing_extra_is_named(tiny_bn_net, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("brevitas"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    layers = importlib.import_module("zq_plugin.backends.brevitas.layers")  # where to_brevitas reads _brevitas
    monkeypatch.setattr(builtins, "__import__", fake_import)
    zb._brevitas.cache_clear()  # imported by earlier tests
    monkeypatch.setattr(layers, "_brevitas", layers._brevitas.__wrapped__)
    monkeypatch.setattr(
        layers.importlib, "import_module", lambda name: fake_import(name) if name.startswith("brevitas") else None
    )
    with pytest.raises(MissingDependencyError, match=r"zq-plugin\[brevitas\]"):
        zb.to_brevitas(copy.deepcopy(tiny_bn_net))


def test_untraceable_model_is_a_model_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)  # data-dependent control flow

    with pytest.raises(zb.ModelError, match="could not trace Branchy"):
        zb.to_brevitas(Branchy().eval())


def test_depthwise_and_linear_kinds(tiny_bn_net):
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=8)
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if n in {"conv1", "dw", "fc"}}
    assert kinds == {"conv1": "QuantConv2d", "dw": "QuantConv2d", "fc": "QuantLinear"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # merged into the convs


@pytest.mark.parametrize("stat", ["zq-mse", "zq-percentile", "zq-aciq", "zq-entropy"])
def test_plugin_statistics_drive_brevitas_scales(tiny_bn_net, stat):
    x = _data(128)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4, act_stats=stat)
    zb.calibrate(q, x)
    assert any(isinstance(m, zb.PluginStatistic) for m in q.modules())
    ref = tiny_bn_net(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean()) > 25


def test_plugin_statistic_threshold_matches_the_observer_statistic():
    from zq_plugin.observers import stats
    from zq_plugin.observers.histogram import observe

    x = torch.cat([torch.rand(5000), torch.tensor([30.0])])  # one outlier
    stat = zb.PluginStatistic("zq-mse", bit_width=4, signed=False, narrow_range=False)
    _, hi = stats.lp_range(observe(None, x), 0, 15, False)
    assert float(stat(x)) == pytest.approx(float(hi))
    assert float(stat(x)) < 30.0  # the MSE search clips the outlier
    signed = zb.PluginStatistic("zq-percentile", bit_width=8, signed=True, narrow_range=True)
    assert float(signed(torch.linspace(-3, 1, 1001))) == pytest.approx(3.0, rel=0.01)


# --- issue 13: models this project did not write ---------------------------------------------------------


def _conv_transpose_net() -> nn.Module:
    torch.manual_seed(0)
    return conv_transpose_net().eval()


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean().clamp_min(1e-30)))


def _onnx_ops(path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_conv_transpose_is_quantized_per_output_channel_at_the_plan_bits(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxoptimizer")
    net, x = _conv_transpose_net(), _data(64)
    plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)
    plan = BitPlan({**plan.layers, "2": LayerBits(w_bits=3, a_bits=5)})
    q = zb.to_brevitas(net, plan)
    zb.calibrate(q, x)
    layer = q.get_submodule("2")
    assert type(layer).__name__ == "QuantConvTranspose2d"
    assert q.zq_float_layers == ()
    assert int(layer.weight_quant.bit_width()) == 3 and int(layer.input_quant.bit_width()) == 5
    w = layer.quant_weight()
    assert w.scale.shape == (1, 6, 1, 1)  # one scale per output channel: axis 1 of [C_in, C_out, k, k]
    codes = (w.value / w.scale).round()
    assert codes.abs().max() == 3  # 3-bit narrow: [-3, 3], each channel reaches its own max
    for c in range(6):
        assert 2 < len(torch.unique(codes[:, c])) <= 7
    path = zb.export_onnx(q, x[:1], tmp_path / "ct.onnx")
    assert {"ConvTranspose", "QuantizeLinear", "DequantizeLinear"} <= _onnx_ops(path)
    assert _sqnr(q(x[:16]), zb.run_onnx(path, x[:16])) > 40


def test_weight_layers_left_in_float_are_listed():
    class OwnConv(nn.Conv2d):  # a subclass with its own forward: Brevitas must not swap it
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), OwnConv(4, 4, 1), nn.Flatten(), nn.Linear(144, 3)).eval()
    with pytest.warns(UserWarning, match=r"to_brevitas: 1 weight layer\(s\) left in float \(2\)"):
        q = zb.to_brevitas(net)
    assert q.zq_float_layers == ("2",)  # Brevitas's tracer inlined it into a float torch.conv2d on 2.weight
    assert not isinstance(q.get_submodule("2"), zb._brevitas()["QuantWBIOL"])
    assert zb.to_brevitas(_conv_transpose_net()).zq_float_layers == ()


def _thresholds(q: nn.Module) -> list[float]:
    return [float(m.value) for m in q.modules() if type(m).__name__ == "ParameterFromRuntimeStatsScaling"]


def test_a_second_calibration_continues_the_average(tiny_bn_net):
    x = _data(64)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    zb.calibrate(q, x)
    first = _thresholds(q)
    zb.calibrate(q, 10 * x)
    # the same as one call over the batches of both (one batch each at batch_size 64)
    both = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    zb.calibrate(both, torch.cat([x, 10 * x]))
    assert _thresholds(q) == pytest.approx(_thresholds(both), rel=1e-6)
    assert _thresholds(q)[0] == pytest.approx(5.5 * first[0], rel=1e-5)  # (max + 10 max) / 2 on the image
    assert torch.equal(q(x), both(x))


def test_calibrated_state_dict_round_trips_into_a_fresh_copy(tiny_bn_net):
    x = _data(64)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    zb.calibrate(q, x)
    state = q.state_dict()  # right after calibration: weight scales included
    assert sum(k.endswith("weight_quant.tensor_quant.scaling_impl.value") for k in state) == 5
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    fresh.load_state_dict(torch.load(buf, weights_only=True))  # strict
    assert not zb.uncalibrated(fresh)
    assert torch.equal(fresh(x), q(x))
    # and it continues calibrating like the original
    zb.calibrate(q, 3 * x)
    zb.calibrate(fresh, 3 * x)
    assert torch.equal(fresh(x), q(x))


def test_bias_corrected_state_dict_round_trips_for_layers_without_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3, bias=False)).eval()
    x = _data(64)
    q = zb.to_brevitas(net, w_bits=4, a_bits=4)
    zb.calibrate(q, x)
    q = zb.bias_correct(q, x)
    assert float(q.get_submodule("0").bias.abs().max()) > 0  # the zero bias to_brevitas gave it was corrected
    fresh = zb.to_brevitas(net, w_bits=4, a_bits=4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


class _ConvNeXtMLP(nn.Module):
    """ConvNeXt's block MLP: Linear layers on the channels-last 4-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        h = self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean((1, 2)))


def test_bias_correction_of_a_linear_on_a_4d_tensor(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxoptimizer")
    torch.manual_seed(0)
    net, x = _ConvNeXtMLP().eval(), _data(64)
    q = zb.to_brevitas(net, w_bits=4, a_bits=8)
    zb.calibrate(q, x)
    fc1 = q.get_submodule("fc1")
    # expected: mean over N, H, W of float - quantized fc1 output on the float model's fc1 input
    inp = net.conv(x).permute(0, 2, 3, 1)
    with torch.no_grad():
        expected = (F.linear(inp, fc1.weight, fc1.bias) - fc1(inp)).mean((0, 1, 2))
        before = fc1.bias.detach().clone()
    zb.bias_correct(q, x)
    torch.testing.assert_close(fc1.bias.detach() - before, expected, atol=1e-6, rtol=1e-4)
    assert all(not m._forward_hooks for m in q.modules())  # hooks gone: the model runs quantized
    path = zb.export_onnx(q, x[:1], tmp_path / "mlp.onnx")
    assert "QuantizeLinear" in _onnx_ops(path)
    assert _sqnr(q(x[:16]), zb.run_onnx(path, x[:16])) > 40


def test_a_failing_calibration_or_bias_correction_leaves_the_model_as_it_was(tiny_bn_net):
    x = _data(64)
    q = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    zb.calibrate(q, x)
    out, state = q(x), {k: v.clone() for k, v in q.state_dict().items()}
    bad = torch.randn(8, 3, 8, 8)  # 3 channels for a 1-channel model
    with pytest.raises(ModelError, match=r"bias correction failed on batch 0.*no bias was changed"):
        zb.bias_correct(q, bad)
    with pytest.raises(ModelError, match=r"calibration failed on batch 1.*as it was"):
        zb.calibrate(q, [x, bad])
    assert all(not m._forward_hooks for m in q.modules())
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in state.items())
    assert torch.equal(q(x), out)
    fresh = zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4)
    with pytest.raises(ModelError):
        zb.calibrate(fresh, [x, bad])
    assert zb.uncalibrated(fresh)  # half a calibration does not count
    with pytest.raises(NotCalibratedError):
        fresh(x)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_every_output_of_a_two_head_model_reaches_onnx(tmp_path, as_dict):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxoptimizer")

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.aux = nn.Conv2d(1, 4, 3), nn.Linear(144, 10), nn.Linear(144, 2)

        def forward(self, x):
            h = torch.flatten(F.relu(self.conv(x)), 1)
            # the dict puts the logits second: select_output picks them by key
            return {"aux": self.aux(h), "logits": self.fc(h)} if as_dict else (self.fc(h), self.aux(h))

    torch.manual_seed(0)
    x = _data(64)
    q = zb.to_brevitas(TwoHeads().eval(), w_bits=8, a_bits=8)
    zb.calibrate(q, x)
    path = zb.export_onnx(q, x[:1], tmp_path / "two.onnx")
    ref = q(x[:16])
    logits, aux = (ref["logits"], ref["aux"]) if as_dict else ref
    out = zb.run_onnx(path, x[:16])
    assert out.shape == (16, 10) and _sqnr(logits, out) > 40
    both = zb.run_onnx(path, x[:16], all_outputs=True)
    assert [t.shape for t in both] == [(16, 10), (16, 2)]
    assert _sqnr(logits, both[0]) > 40 and _sqnr(aux, both[1]) > 40


def test_batches_follow_the_model_device_and_dtype(tiny_bn_net):
    # no GPU here: the meta device stands in for "not the data's device"
    model = copy.deepcopy(tiny_bn_net).to(device="meta", dtype=torch.float64)
    batches = zb._batches(model, _data(10), batch_size=4)
    assert [(b.device.type, b.dtype, len(b)) for b in batches] == [("meta", torch.float64, n) for n in (4, 4, 2)]


def test_grouped_conv_transpose_is_scaled_per_tensor_with_a_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3, groups=2)).eval()
    with pytest.warns(UserWarning, match=r"grouped ConvTranspose layers \['2'\].*per tensor"):
        q = zb.to_brevitas(net, w_bits=4, a_bits=8, first_last_bits=None)
    zb.calibrate(q, _data(16))
    w = q.get_submodule("2").quant_weight()
    assert w.scale.numel() == 1 and (w.value / w.scale).round().abs().max() == 7
    assert _sqnr(net(_data(16)), q(_data(16))) > 20


def test_forward_with_extra_inputs_is_refused_by_name():
    """Found from outside: the error named neither the one-input rule nor the wrapper."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(144, 3)

        def forward(self, x, mask):
            return self.fc(torch.relu(self.conv(x * mask)).flatten(1))

    qmodel = zb.to_brevitas(Masked().eval(), w_bits=4, a_bits=8)
    with pytest.raises(ConfigError, match=r"one image input.*missing 1 required positional argument.*wrap the model"):
        zb.calibrate(qmodel, torch.randn(8, 1, 8, 8))


def test_reconstruction_is_carried_into_brevitas_and_survives_onnx(tiny_bn_net, tmp_path):
    """Brevitas's weights are the simulation's rounded ones on the same steps, and ONNX agrees."""
    import dataclasses

    from zq_plugin.reconstruct import METHODS

    images = _data(48)
    before = snapshot(tiny_bn_net)
    config = dataclasses.replace(METHODS["genie-m"], iterations=60, batch_size=16)
    q = zq_plugin.backends.brevitas.reconstruct_brevitas(
        tiny_bn_net, images, w_bits=4, a_bits=4, config=config, progress=False
    )
    assert_unchanged(tiny_bn_net, before)
    sim = zq_plugin.reconstruct_fx(tiny_bn_net, images, w_bits=4, a_bits=4, config=config, progress=False)
    assert q.zq_carried["weight_steps"] == q.zq_carried["layers"] == 5
    assert q.zq_carried["act_steps"] >= 1  # ReLU outputs take the learned steps
    checked = 0
    for name, layer in q.named_modules():
        if not hasattr(layer, "quant_weight"):
            continue
        fx_layer = sim.get_submodule(name)
        with torch.no_grad():
            qw = layer.quant_weight()
            torch.testing.assert_close(qw.scale.reshape(-1), fx_layer.weight_fake_quant.scale, rtol=1e-6, atol=0)
            torch.testing.assert_close(qw.value, fx_layer.weight_fake_quant(fx_layer.weight), rtol=0, atol=1e-6)
        checked += 1
    assert checked == 5
    path = zq_plugin.backends.brevitas.export_onnx(q, images[:1], tmp_path / "r.onnx")
    x = _data(32)
    with torch.no_grad():
        ref = q(x)
    out = zq_plugin.backends.brevitas.run_onnx(path, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_run_onnx_gives_each_weight_its_own_zero_point(tiny_bn_net, tmp_path):
    """onnxruntime's x86 precision mode (its U8U8 kernels) refuses a weight zero point that two layers share."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    x = _data(32)
    q = zb.to_brevitas(tiny_bn_net, w_bits=8, a_bits=8)
    zb.calibrate(q, x)
    path = zb.export_onnx(q, x[:1], tmp_path / "m.onnx")

    def weight_zero_points(graph) -> list[str]:
        clips = {n.output[0] for n in graph.node if n.op_type == "Clip"}
        return [n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in clips]

    shared = weight_zero_points(onnx.load(str(path)).graph)
    assert len(set(shared)) < len(shared) == 5  # the exporter's deduplication: conv2, short and dw share one
    own = weight_zero_points(onnx.load_from_string(zb._own_weight_zero_points(path)).graph)
    assert len(set(own)) == len(own) == 5
    assert _sqnr(q(x), zb.run_onnx(path, x)) > 40
