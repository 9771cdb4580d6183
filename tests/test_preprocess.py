"""Data-free cross-layer equalization: same function, equal ranges per pair, the source untouched."""

import pytest
import torch
from conformance import torchvision_model
from conftest import assert_unchanged, snapshot

import zq_plugin
from zq_plugin import zoo
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.preprocess import ChannelClippedReLU, _ranges, equalize, find_pairs


def _spread(model):
    """Mean over conv layers of (largest / smallest) per-output-channel max |w|."""
    ratios = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            r = m.weight.detach().abs().flatten(1).amax(1)
            ratios.append(float(r.max() / r.clamp_min(1e-12).min()))
    return sum(ratios) / len(ratios)


@pytest.mark.parametrize("name", ["mobilenetv2_s", "resnet_s"])
def test_zoo_outputs_unchanged_and_ranges_equalized(name):
    """Also through the clamping simulation: the equalized model is a float model like any other."""
    from torch.fx.experimental.optimization import fuse

    model = zoo.load(name)
    before = snapshot(model)
    eq = equalize(model)
    assert_unchanged(model, before)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eq(x), model(x), atol=1e-4, rtol=1e-4)
    modules = dict(eq.named_modules())
    assert eq.zq_equalized_pairs
    for pair in eq.zq_equalized_pairs:
        r1, r2 = _ranges(pair, modules)
        torch.testing.assert_close(r1, r2, rtol=2e-3, atol=1e-6)  # both sides of a pair meet
    assert _spread(eq) < _spread(fuse(model, inplace=False))
    sim = zq_plugin.quantize_fx(eq, x, w_bits=8, a_bits=8)
    assert (sim(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.9


def test_depthwise_net_ranges_narrow_a_lot():
    from torch.fx.experimental.optimization import fuse

    model = zoo.load("mobilenetv2_s")
    assert _spread(equalize(model)) < 0.25 * _spread(fuse(model, inplace=False))  # 16.3 -> 2.2 measured


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_torchvision_architectures_keep_their_outputs(arch):
    model, shape = torchvision_model(arch)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    eq = equalize(model)
    with torch.no_grad():
        ref = model.eval()(x)
    torch.testing.assert_close(eq(x), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_relu6_between_a_pair_becomes_a_per_channel_clip_and_a_shared_one_is_left_alone():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU6(), torch.nn.Conv2d(4, 4, 3, groups=4), torch.nn.ReLU6(),
        torch.nn.Conv2d(4, 2, 1),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([10.0, 0.1, 1.0, 3.0]).reshape(-1, 1, 1, 1))
    x = 3 * torch.randn(8, 1, 9, 9)
    eq = equalize(net)
    assert [type(m).__name__ for m in eq.children()].count("ChannelClippedReLU") == 2
    torch.testing.assert_close(eq(x), net(x), atol=1e-5, rtol=1e-5)  # relu6 clipping kept exactly
    torch.fx.symbolic_trace(eq)  # still traceable: every backend takes it

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(2, 2, 1), torch.nn.ReLU6()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    gm = torch.fx.symbolic_trace(Shared())
    assert find_pairs(gm) == []  # replacing the shared ReLU6 would change its other call
    assert not any(isinstance(m, ChannelClippedReLU) for m in equalize(Shared()).modules())


def test_grouped_and_transposed_layers_are_left_alone():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, groups=2))
    assert find_pairs(torch.fx.symbolic_trace(net)) == []
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ConvTranspose2d(4, 4, 2))
    assert find_pairs(torch.fx.symbolic_trace(net)) == []


def test_bad_input_raises_named_errors():
    with pytest.raises(ConfigError, match="iterations"):
        equalize(torch.nn.Linear(2, 2), iterations=0)

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ModelError, match="traceable"):
        equalize(Untraceable())
