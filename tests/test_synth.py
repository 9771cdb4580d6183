import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth import losses
from zq_plugin.synth.hooks import batchnorm_layers, bn_targets, capture_inputs, frozen

SHAPE = (1, 12, 12)


def zeroq(model, **kw):
    kw.setdefault("num_samples", 6)
    kw.setdefault("input_shape", SHAPE)
    kw.setdefault("steps", 8)
    kw.setdefault("progress", False)
    return zq_plugin.synthesize(model, "zeroq", **kw)


def total_loss(model, x, statistics):
    bns = batchnorm_layers(model)
    with torch.no_grad(), capture_inputs(dict(bns)) as feats:
        model(x)
        loss = losses.bn_statistics_loss(feats, bn_targets(bns), statistics)
        return float(loss + losses.stats_loss(x, torch.zeros(1), torch.ones(1), statistics))


def test_shape_dtype_and_metadata(tiny_bn_net):
    data = zeroq(tiny_bn_net, num_samples=7, batch_size=3)
    assert data.images.shape == (7, *SHAPE) and data.images.dtype == torch.float32
    assert data.method == "zeroq" and data.seed == 0
    assert data.options["steps"] == 8 and data.model_fingerprint == zq_plugin.model_fingerprint(tiny_bn_net)
    assert [b.shape[0] for b in data.loader(batch_size=4)] == [4, 3]


def test_same_seed_same_images_other_seed_other(tiny_bn_net):
    a, b = zeroq(tiny_bn_net, seed=3), zeroq(tiny_bn_net, seed=3)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, zeroq(tiny_bn_net, seed=4).images)


@pytest.mark.parametrize("statistics", ["per_sample", "batch"])
@pytest.mark.parametrize("init", ["uniform", "gaussian"])
def test_loss_decreases(tiny_bn_net, statistics, init):
    from zq_plugin.synth.api import batch_seed
    from zq_plugin.synth.zeroq import init_pixels

    data = zeroq(tiny_bn_net, num_samples=8, batch_size=8, steps=60, statistics=statistics, init=init, input_range=None)
    x0 = init_pixels(init, (8, *SHAPE), torch.Generator().manual_seed(batch_seed(0, 0)))
    assert total_loss(tiny_bn_net, data.images, statistics) < 0.75 * total_loss(tiny_bn_net, x0, statistics)


def test_input_range_clamps(tiny_bn_net):
    data = zeroq(tiny_bn_net, input_range=(-0.5, 0.25), init="gaussian", steps=20)
    assert data.images.min() >= -0.5 and data.images.max() <= 0.25
    tiny_bn_net.input_range = (-0.1, 0.1)  # "auto" reads the model attribute
    auto = zeroq(tiny_bn_net, init="gaussian")
    assert auto.images.abs().max() <= 0.1 and auto.options["input_range"] == (-0.1, 0.1)


def test_model_unchanged_after_synthesis(tiny_bn_net):
    tiny_bn_net.train()
    tiny_bn_net.fc.weight.requires_grad_(False)
    tiny_bn_net.register_forward_hook(lambda *a: None)
    before = snapshot(tiny_bn_net)
    zeroq(tiny_bn_net)
    assert_unchanged(tiny_bn_net, before)


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_model_unchanged_when_loop_raises(tiny_bn_net, monkeypatch, exc_type):
    tiny_bn_net.train()
    before = snapshot(tiny_bn_net)
    calls = {"n": 0}
    original = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc_type("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(exc_type):
        zeroq(tiny_bn_net)
    assert calls["n"] == 3
    assert_unchanged(tiny_bn_net, before)


def test_frozen_restores_on_error(tiny_bn_net):
    tiny_bn_net.train()
    before = snapshot(tiny_bn_net)
    with pytest.raises(ValueError), frozen(tiny_bn_net):
        assert not tiny_bn_net.training
        raise ValueError
    assert_unchanged(tiny_bn_net, before)


def test_model_without_bn_is_rejected(tiny_plain_net):
    with pytest.raises(ModelError, match="no BatchNorm") as info:
        zeroq(tiny_plain_net)
    assert "noise" in str(info.value)
    assert zq_plugin.synthesize(tiny_plain_net, "noise", num_samples=2, input_shape=(1, 8, 8), progress=False)


def test_model_with_nan_output_is_rejected(tiny_bn_net):
    with torch.no_grad():
        tiny_bn_net.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        zeroq(tiny_bn_net)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": -3}, "num_samples"),
        ({"input_shape": (12, 12, 1, 4)}, "input_shape"),
        ({"input_shape": (1, 0, 12)}, "input_shape"),
        ({"input_shape": "1,12,12"}, "input_shape"),
        ({"steps": 0}, "steps"),
        ({"statistics": "channel"}, "per_sample"),
        ({"input_range": (1.0, -1.0)}, "lo < hi"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(tiny_bn_net, kwargs, match):
    before = snapshot(tiny_bn_net)
    with pytest.raises(ConfigError, match=match):
        zeroq(tiny_bn_net, **kwargs)
    assert_unchanged(tiny_bn_net, before)


def test_unknown_method_and_option(tiny_bn_net):
    with pytest.raises(ConfigError, match=r"known methods: .*zeroq"):
        zq_plugin.synthesize(tiny_bn_net, "zeroqq", input_shape=SHAPE)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['stepz'\].*'steps'"):
        zq_plugin.synthesize(tiny_bn_net, "zeroq", input_shape=SHAPE, stepz=3)


def test_bn_hooks_keyed_by_name_not_position():
    class Odd(nn.Module):  # BN before its conv in declaration order; a BN1d after a Linear
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(2)
            self.conv = nn.Conv2d(1, 2, 3)
            self.lin = nn.Linear(2, 4)
            self.bn1d = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn1d(self.lin(self.bn(self.conv(x)).mean((2, 3))))

    model = Odd().eval()
    x = torch.randn(3, 1, 6, 6)
    with capture_inputs(dict(batchnorm_layers(model))) as feats:
        model(x)
        assert torch.equal(feats["bn"], model.conv(x))
        assert feats["bn1d"].shape == (3, 4)
    data = zq_plugin.synthesize(model, "zeroq", num_samples=4, input_shape=(1, 6, 6), steps=3, progress=False)
    assert data.images.shape == (4, 1, 6, 6)


def test_per_sample_stats_match_definition():
    f = torch.randn(3, 2, 4, 5)
    mean, std = losses.feature_stats(f, "per_sample")
    torch.testing.assert_close(mean, f.mean((2, 3)))
    torch.testing.assert_close(std, torch.sqrt(f.var((2, 3)) + 1e-6))
    bmean, bstd = losses.feature_stats(f, "batch")
    torch.testing.assert_close(bmean, f.mean((0, 2, 3)))
    torch.testing.assert_close(bstd, torch.sqrt(f.transpose(0, 1).reshape(2, -1).var(1) + 1e-6))


def _inplace_bn_net(dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(144, 3))
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 1, 8, 8) * 2 + 1)
    return m.eval().to(dtype)


@pytest.mark.parametrize("method", ["zeroq", "dsg", "retro", "genie"])
def test_float64_model_is_distilled_in_float64_like_float32(method):
    """A .double() model was refused with a ConfigError blaming input_shape; now it runs in its own dtype."""
    kw = {"num_samples": 4, "input_shape": (1, 8, 8), "steps": 20, "progress": False}
    want = zq_plugin.synthesize(_inplace_bn_net(torch.float32), method, **kw).images
    got = zq_plugin.synthesize(_inplace_bn_net(torch.float64), method, **kw).images
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    tol = 2e-2 if method == "genie" else 1e-3  # a generator's 20 Adam steps amplify rounding more than pixels'
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["zeroq", "genie"])
def test_low_precision_model_converges_with_float32_sums(dtype, method):
    """bfloat16/float16 models are distilled with float32 pixels, sums and targets: the loss falls as in float32."""
    from zq_plugin.synth.registry import BatchContext, get_method

    spec = get_method(method)
    config = spec.config({"steps": 60})
    logs = {}
    for dt in (dtype, torch.float32):
        model, logs[dt] = _inplace_bn_net(dt), []
        ctx = BatchContext(
            batch_size=4,
            input_shape=(1, 8, 8),
            input_range=None,
            generator=torch.Generator().manual_seed(0),
            loss_log=logs[dt],
            dtype=dt,
        )
        with frozen(model):
            images = spec.make_batch(model, config, ctx)
        assert images.dtype == torch.float32
    assert logs[dtype][-1] < 0.5 * logs[dtype][0]
    assert logs[dtype][-1] < 2 * logs[torch.float32][-1] + 0.05


def test_mixed_dtypes_and_extra_inputs_are_refused_by_name():
    net = _inplace_bn_net(torch.float32)
    net[4].to(torch.float64)
    with pytest.raises(ConfigError, match="mixes floating dtypes"):
        zq_plugin.synthesize(net, "zeroq", num_samples=2, input_shape=(1, 8, 8), steps=1, progress=False)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _inplace_bn_net(torch.float32)

        def forward(self, x, mask):
            return self.net(x * mask)

    with pytest.raises(ConfigError, match=r"forward\(x, mask\) needs more than one input.*mask"):
        zq_plugin.synthesize(Masked(), "zeroq", num_samples=2, input_shape=(1, 8, 8), steps=1, progress=False)
