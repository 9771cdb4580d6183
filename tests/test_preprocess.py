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


# --- BatchNorm statistics: high-bias absorption and analytic bias correction -------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from zq_plugin.preprocess import InputStatistics, absorb_high_bias, correct_bias, input_statistics  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    beta=st.floats(-4.0, 8.0),
    gamma=st.floats(0.05, 4.0),
    activation=st.sampled_from(["none", "relu", "relu6"]),
)
def test_expected_activation_matches_monte_carlo(beta, gamma, activation):
    info = InputStatistics(bn="bn", activation=activation, beta=torch.tensor([beta]), gamma=torch.tensor([gamma]))
    z = beta + gamma * torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = {"none": z, "relu": z.clamp_min(0), "relu6": z.clamp(0, 6)}[activation]
    assert abs(float(info.mean()[0]) - float(z.mean())) < 0.01 * gamma + 1e-4


def _bn_chain(activation: nn.Module) -> nn.Module:
    """conv -> BN -> act -> 1x1 conv -> flatten -> linear, BN statistics from Gaussian inputs (its assumption holds)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, momentum=1.0), activation, nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6, momentum=1.0), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip
    with torch.no_grad():
        net[1].bias.copy_(torch.linspace(-1.0, 8.0, 8))
        net[1].weight.copy_(torch.linspace(0.3, 1.5, 8))
        net.train()(torch.randn(4096, 3, 4, 4))
    return net.eval()


def test_input_statistics_follow_bn_through_activations_and_pooling():
    net = _bn_chain(nn.ReLU6())
    stats = input_statistics(net)
    assert sorted(stats) == ["3", "8"]  # the first conv reads the image
    assert (stats["3"].bn, stats["3"].activation) == ("1", "relu6")
    assert (stats["8"].bn, stats["8"].activation) == ("4", "relu")  # through pooling and flatten
    torch.testing.assert_close(stats["3"].beta, net[1].bias.detach())


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6()])
def test_high_bias_absorption_keeps_the_function_and_narrows_the_range(activation):
    net = _bn_chain(activation)
    before = snapshot(net)
    out = absorb_high_bias(net)
    assert_unchanged(net, before)
    x = torch.randn(256, 3, 4, 4)
    with torch.no_grad():
        diff = (out(x) - net(x)).abs()  # 1x1 convs: only pre-activations below beta - 3 gamma differ
        assert float(diff.mean()) < 2e-3 and float(diff.max()) < 0.1
        assert out.zq_absorbed["0"] > 1.0
        inner_before = net[:3](x)
        inner_after = out.get_submodule("2")(out.get_submodule("0")(x))  # the activation's output, shifted down
        assert float(inner_after.amax()) < float(inner_before.amax()) - 0.5


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.ReLU6()])
def test_equalize_then_absorb_keeps_the_function(activation):
    net = _bn_chain(activation)
    eq = equalize(net, absorb_bias=True)
    assert eq.zq_equalized_pairs and eq.zq_absorbed["0"] > 1.0
    x = torch.randn(256, 3, 4, 4)
    with torch.no_grad():
        assert float((eq(x) - net(x)).abs().mean()) < 2e-3
    # the zoo's BatchNorms have no channel with beta > 3 gamma: nothing to absorb, nothing changes
    assert equalize(zoo.load("resnet_s"), absorb_bias=True).zq_absorbed == {}


def test_analytic_bias_correction_cancels_the_mean_output_error():
    from torch.fx.experimental.optimization import fuse

    net = _bn_chain(nn.ReLU())
    folded = fuse(net)
    x = torch.randn(2048, 3, 4, 4)
    sim = zq_plugin.quantize_fx(folded, x, w_bits=2, a_bits=8, first_last_bits=None, fold=False)
    before = snapshot(net)

    def mean_error():  # mean per-channel error of the second conv's pre-activation, on the float input
        layer = sim.get_submodule("3")
        with torch.no_grad():
            h = folded.get_submodule("0")(x).relu()
            quantized = torch.nn.functional.conv2d(h, layer.weight_fake_quant(layer.weight), layer.bias)
            return float((quantized - folded.get_submodule("3")(h)).mean((0, 2, 3)).abs().max())

    worst = mean_error()
    corrected = correct_bias(sim, net)
    assert_unchanged(net, before)
    assert sorted(corrected) == ["3", "8"]
    assert mean_error() < 0.1 * worst


def test_bias_correction_needs_the_quantizers():
    net = _bn_chain(nn.ReLU())
    folded = zq_plugin.quantize_fx(net, torch.randn(64, 3, 4, 4))  # folded: quantizers gone
    assert correct_bias(folded, net) == {}
    with pytest.raises(ConfigError, match="sigmas"):
        absorb_high_bias(net, sigmas=-1)
