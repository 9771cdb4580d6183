"""zq_plugin.quantize: the best recipe from the model alone, and its named errors."""

import dataclasses

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.reconstruct import METHODS

QUICK = dataclasses.replace(METHODS["genie-m"], iterations=10, batch_size=8)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 8, 8))  # BN statistics that are not the identity
    return net.eval()


def test_from_the_model_alone_deterministic_and_unchanged():
    net = _net()
    before = snapshot(net)
    kw = {"input_shape": (1, 8, 8), "num_samples": 16, "steps": 3, "config": QUICK, "progress": False}
    a = zq_plugin.quantize(net, w_bits=4, a_bits=4, **kw)
    b = zq_plugin.quantize(net, w_bits=4, a_bits=4, **kw)
    assert_unchanged(net, before)
    assert len(a.zq_calibration) == 16 and [r["unit"] for r in a.zq_reconstruction] == ["0", "3", "6"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.get_submodule("3").weight_fake_quant.quant_max == 7  # 4-bit middle layer


def test_given_data_skip_synthesis():
    x = torch.randn(16, 1, 8, 8)
    sim = zq_plugin.quantize(_net(), data=x, config=QUICK, progress=False)
    assert sim.zq_calibration is x


def test_brevitas_backend_gives_a_calibrated_brevitas_model():
    pytest.importorskip("brevitas")
    x = torch.randn(16, 1, 8, 8)
    q = zq_plugin.quantize(_net(), data=x, config=QUICK, backend="brevitas", progress=False)
    assert q.zq_carried["weight_steps"] == q.zq_carried["layers"] == 3 and q.zq_carried["act_steps"] >= 1
    sim = zq_plugin.quantize(_net(), data=x, config=QUICK, progress=False)
    with torch.no_grad():
        assert torch.equal(
            q.get_submodule("3").quant_weight().value,
            sim.get_submodule("3").weight_fake_quant(sim.get_submodule("3").weight),
        )


def test_pt2e_backend_gives_a_converted_pt2e_model_holding_the_reconstruction():
    x = torch.randn(16, 1, 8, 8)
    q = zq_plugin.quantize(_net(), data=x, config=QUICK, backend="pt2e", progress=False)
    assert q.zq_carried == {"weight_steps": 3, "act_steps": 3} and q.zq_calibration is x
    assert any("quantize_per_tensor" in str(n.target) for n in q.graph.nodes)
    assert q(torch.randn(5, 1, 8, 8)).shape[0] == 5


def test_named_errors():
    net = _net()
    with pytest.raises(ConfigError, match="input_shape"):
        zq_plugin.quantize(net, progress=False)
    with pytest.raises(ConfigError, match="backend 'tflite'"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), backend="tflite")
    with pytest.raises(ConfigError, match="unknown reconstruction method"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), reconstruction="adaquant")
    with pytest.raises(ConfigError, match="unknown synthesizer"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), synthesizer="qimera")
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    with pytest.raises(ModelError, match="BatchNorm"):
        zq_plugin.quantize(no_bn, input_shape=(1, 8, 8), num_samples=4, progress=False)
