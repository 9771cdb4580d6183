import builtins
import copy

import pytest
import torch
from torch import nn

from tests.conftest import assert_unchanged, snapshot
from zq_plugin.data import SyntheticDataset
from zq_plugin.errors import ConfigError, MissingDependencyError, NotCalibratedError
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
    q = zb.calibrate(zb.to_brevitas(tiny_bn_net, w_bits=8, a_bits=8), x)
    ref = tiny_bn_net(x)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    assert sqnr > 25
    zb.bias_correct(q, x)
    sqnr_bc = 10 * torch.log10(ref.pow(2).mean() / (q(x) - ref).pow(2).mean())
    assert sqnr_bc > 25


def test_gptq_runs_after_calibration_and_keeps_the_output_close(tiny_bn_net):
    x = _data(128)
    q = zb.calibrate(zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=8), x)
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
    outs = [zb.calibrate(zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4), s)(x[:8]) for s in sources]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_export_onnx_and_onnxruntime_agree(tiny_bn_net, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxoptimizer")
    x = _data(64)
    q = zb.calibrate(zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4), x)
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
    with pytest.raises(ConfigError, match="plans cover Conv1d, Conv2d, Conv3d, Linear"):
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

    monkeypatch.setattr(builtins, "__import__", fake_import)
    zb._brevitas.cache_clear()  # imported by earlier tests
    monkeypatch.setattr(zb, "_brevitas", zb._brevitas.__wrapped__)
    monkeypatch.setattr(
        zb.importlib, "import_module", lambda name: fake_import(name) if name.startswith("brevitas") else None
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
    q = zb.calibrate(zb.to_brevitas(tiny_bn_net, w_bits=4, a_bits=4, act_stats=stat), x)
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
