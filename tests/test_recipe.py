"""zq_plugin.quantize: the best recipe from the model alone, and its named errors."""

import dataclasses

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError, DataMismatchError, ModelError
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
    assert q.zq_carried["weight_steps"] == q.zq_carried["layers"] == 3 and q.zq_carried["act_steps"] == 3
    # the same simulation carried: one run of the stage, then the carrier (two runs of a reconstruction
    # may differ in the last float bit under multithreaded convolutions)
    from zq_plugin.pipeline import Request, carry, simulate

    request = Request(reconstruction_config=QUICK, backend="brevitas")
    sim, _ = simulate(_net(), x, request, progress=False)
    q, _ = carry(_net(), sim, x, request)
    with torch.no_grad():
        carried, layer = q.get_submodule("3").quant_weight(), sim.get_submodule("3")
        ints = torch.round(layer.weight / layer.weight_fake_quant.scale.reshape(-1, 1, 1, 1))
        assert torch.equal(carried.int().float(), ints)  # the integers bit for bit
        # the values to one float ulp: Brevitas cannot hold every step exactly (carry._rescale)
        torch.testing.assert_close(carried.value, layer.weight_fake_quant(layer.weight), rtol=2.5e-7, atol=0)


def test_pt2e_backend_gives_a_converted_pt2e_model_holding_the_reconstruction():
    x = torch.randn(16, 1, 8, 8)
    q = zq_plugin.quantize(_net(), data=x, config=QUICK, backend="pt2e", progress=False)
    assert q.zq_carried == {"weight_steps": 3, "act_steps": 3, "layers": 3} and q.zq_calibration is x
    assert any("quantize_per_tensor" in str(n.target) for n in q.graph.nodes)
    assert q(torch.randn(5, 1, 8, 8)).shape[0] == 5


def test_named_errors():
    net = _net()
    with pytest.raises(ConfigError, match="input_shape"):
        zq_plugin.quantize(net, progress=False)
    with pytest.raises(ConfigError, match="backend='tflite' is unknown"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), backend="tflite")
    with pytest.raises(ConfigError, match="unknown reconstruction method"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), reconstruction="adaquant")
    with pytest.raises(ConfigError, match="unknown synthesizer"):
        zq_plugin.quantize(net, input_shape=(1, 8, 8), synthesizer="qimera")
    no_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    with pytest.raises(ModelError, match=r"BatchNorm.*synthesizer='retro'"):
        zq_plugin.quantize(no_bn, input_shape=(1, 8, 8), num_samples=4, progress=False)


def test_method_is_refused_by_name_and_the_synthesizer_keyword_works_everywhere():
    """Found from outside: quantize(method='noise') raised a bare TypeError from synthesize()."""
    with pytest.raises(ConfigError, match=r"synthesizer=.*reconstruction="):
        zq_plugin.quantize(_net(), input_shape=(1, 8, 8), method="noise")
    a = zq_plugin.synthesize(_net(), synthesizer="noise", num_samples=4, input_shape=(1, 8, 8), progress=False)
    assert a.method == "noise"
    with pytest.raises(ConfigError, match="drop data="):
        zq_plugin.quantize(_net(), data=torch.randn(8, 1, 8, 8), steps=3)


def test_synthesize_needs_input_shape_unless_the_model_declares_it():
    """Found from outside: synthesize(model) silently made 3x224x224 images for a 32x32 net."""
    net = _net()
    with pytest.raises(ConfigError, match=r"input_shape=\(C, H, W\)"):
        zq_plugin.synthesize(net, "noise", num_samples=2, progress=False)
    net.input_shape = (1, 8, 8)
    assert zq_plugin.synthesize(net, "noise", num_samples=2, progress=False).images.shape == (2, 1, 8, 8)


def test_input_range_is_a_keyword_of_quantize():
    x = zq_plugin.quantize(
        _net(), input_shape=(1, 8, 8), num_samples=8, steps=2, input_range=(-0.5, 0.5), stage="calibrate",
        progress=False,
    ).zq_calibration.images
    assert float(x.min()) >= -0.5 and float(x.max()) <= 0.5


@pytest.mark.parametrize("backend", ["pt2e", "brevitas"])
def test_finetune_deploys_on_every_backend(backend):
    pytest.importorskip("torchao" if backend == "pt2e" else "brevitas")
    net, x = _net(), torch.randn(32, 1, 8, 8)
    fx = zq_plugin.finetune(net, x, steps=3, batch_size=8, progress=False)
    q = zq_plugin.finetune(net, x, steps=3, batch_size=8, progress=False, backend=backend)
    report = zq_plugin.describe(q)
    assert report.build.stage == "finetune" and {r.weight_step for r in report.layers} == {"carried"}
    t = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(t), fx(t), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"wbits": 3}, ConfigError, "did you mean w_bits="),
        ({"bias_correction": True}, ConfigError, "a Brevitas tool"),
        ({"act_observer": "mse"}, ConfigError, "observer="),
        ({"config": {"iterations": 2}}, ConfigError, "pass a ReconstructConfig"),
        ({"stage": "calibrate", "config": "CONFIG"}, ConfigError, "applies to stage='reconstruct'"),
        ({"w_bits": 3, "plan": "PLAN"}, ConfigError, "plan= sets every layer"),
        ({"reconstruction": "adaround", "config": "CONFIG"}, ConfigError, "replaces reconstruction='adaround'"),
        ({"data": "OTHER"}, DataMismatchError, "synthesized from another model"),
    ],
)
def test_quantize_names_what_a_user_gets_wrong(kwargs, error, match):
    """Found from outside (issue 29): typos, keywords of other calls and ignored keywords are named."""
    from zq_plugin.mixed_precision import BitPlan

    net = _net()
    before = snapshot(net)
    other = _net()
    other[0].weight.data.mul_(2)  # another model's weights
    values = {
        "CONFIG": dataclasses.replace(METHODS["genie-m"], iterations=2),
        "PLAN": BitPlan.uniform(net, w_bits=4, a_bits=4),
        "OTHER": zq_plugin.synthesize(other, "noise", num_samples=8, input_shape=(1, 8, 8)),
    }
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("data", torch.randn(16, 1, 8, 8))
    with pytest.raises(error, match=match):
        zq_plugin.quantize(net, progress=False, **kwargs)
    assert_unchanged(net, before)
