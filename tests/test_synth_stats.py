"""The fused BN-statistics path: values, gradients and the hook that folds in the BN backward."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from zq_plugin.synth import losses
from zq_plugin.synth.hooks import batchnorm_layers, bn_sums, bn_targets, capture_inputs, frozen


def reference(feats, statistics):
    """Means and stds by torch.var_mean, the definitions of losses' module docstring."""
    means, stds = [], []
    for f in feats:
        n = f.shape[0]
        if statistics == "per_sample" and f.dim() > 2 and f[0, 0].numel() > 1:
            var, mean = torch.var_mean(f, dim=tuple(range(2, f.dim())))
        else:
            var, mean = torch.var_mean(f, dim=(0, *range(2, f.dim())))
            if statistics == "per_sample":
                var, mean = var.expand(n, -1), mean.expand(n, -1)
        means.append(mean)
        stds.append(torch.sqrt(var + 1e-6))
    dim = 1 if statistics == "per_sample" else 0
    return torch.cat(means, dim), torch.cat(stds, dim)


def features(n=3):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(n, 2, 4, 5, dtype=torch.float64, generator=gen) * 3 + 5,  # conv map
        torch.randn(n, 4, dtype=torch.float64, generator=gen),  # BatchNorm1d on [N, C]
        torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=gen),  # one position: batch fallback
        torch.randn(n, 1, 2, 3, 2, dtype=torch.float64, generator=gen),  # 3-d
    ]


@pytest.mark.parametrize("statistics", ["batch", "per_sample"])
def test_channel_moments_match_var_mean_with_exact_gradients(statistics):
    feats = [f.requires_grad_(True) for f in features()]
    for got, want in zip(losses.channel_moments(feats, statistics), reference(feats, statistics), strict=True):
        torch.testing.assert_close(got, want)

    def fn(*fs):
        return losses.channel_moments(list(fs), statistics)

    assert torch.autograd.gradcheck(fn, feats)
    assert torch.autograd.gradgradcheck(fn, feats)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    offset=st.floats(-15, 15),
    scale=st.floats(0.01, 100),
)
def test_float32_moments_stay_close_to_var_mean(n, c, h, w, offset, scale):
    """The sums formula in float32 against var_mean in float64: the error stays at float32 rounding of mean^2 + var."""
    assume(h * w > 1 or n > 1)  # one value has no unbiased variance (var_mean: NaN; here: 0)
    f = (torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n * 7 + c)) + offset) * scale
    for statistics in ("batch", "per_sample"):
        mean, std = losses.channel_moments([f], statistics)
        want_mean, want_std = reference([f.double()], statistics)
        var, want_var = std.double().square() - 1e-6, want_std.square() - 1e-6
        assert torch.allclose(mean.double(), want_mean, rtol=1e-5, atol=1e-5 * scale)
        # (sum f^2 - n mean^2) / (n - 1) loses about eps * (mean^2 + var) to cancellation (losses' docstring)
        assert torch.all((var - want_var).abs() <= 1e-6 * (want_mean.square() + want_var))


def test_a_single_value_has_variance_zero():
    mean, std = losses.channel_moments([torch.full((1, 2, 1, 1), 3.0)], "batch")
    assert mean.tolist() == [3.0, 3.0] and torch.allclose(std, torch.full((2,), 1e-3))


def randomized_bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 5),
        nn.BatchNorm1d(5),
    ).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                nn.init.normal_(m.weight)
    return model.eval()


class SubclassedBN(nn.BatchNorm2d):
    """A subclass: the hook cannot assume its forward, so it takes the generic path."""


@pytest.mark.parametrize("statistics", ["batch", "per_sample"])
def test_folded_bn_backward_equals_plain_autograd(statistics):
    """bn_sums' fast path (BN backward folded in) gives the loss and pixel gradient of the plain definition."""
    model = randomized_bn_model()
    bns = batchnorm_layers(model)
    targets = losses.MomentTargets.build(bn_targets(bns), input_channels=1)
    weights = torch.rand(sum(targets.channels), dtype=torch.float64)
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)

    def step(collect):
        x.grad = None
        out = model(x)
        m, s = collect()
        loss = losses.moment_distance(m, s, targets, weights) + out.square().mean()
        loss.backward()
        return loss.detach(), x.grad.clone()

    with frozen(model):
        with capture_inputs(dict(bns)) as feats:
            want = step(lambda: reference(targets.gather(feats, x), statistics))
        with bn_sums(dict(bns)) as sums:
            got = step(lambda: targets.collect(sums, x, statistics))
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(got, want)


def test_generic_path_for_subclasses_and_trainable_bn():
    torch.manual_seed(0)
    plain, sub = nn.BatchNorm2d(3).eval(), SubclassedBN(3).eval()
    sub.load_state_dict(plain.state_dict())
    sub.requires_grad_(False)
    plain.requires_grad_(False)
    trainable = nn.BatchNorm2d(3).eval()  # parameters with grad: its own backward must run
    trainable.load_state_dict(plain.state_dict())
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    grads = []
    for bn in (plain, sub, trainable):
        f.grad = None
        with bn_sums({"bn": bn}) as sums:
            y = bn(f)
            s1, s2, _ = sums["bn"]
            (y.sum() + s2.sum() + s1.sum()).backward()
        grads.append(f.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(grads[2], grads[0])
    assert trainable.weight.grad is not None  # the generic path keeps the BN's own graph


def test_hook_leaves_the_model_unchanged_and_outputs_identical():
    model = randomized_bn_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    with frozen(model), bn_sums(dict(batchnorm_layers(model))), torch.no_grad():
        got = model(x)
    assert torch.equal(got, want)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training and all(p.requires_grad for p in model.parameters())


class InplaceAfterBN(nn.Module):
    """Every in-place pattern torchvision uses after a BatchNorm, and a BN output read by two branches."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), act
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity  # in place on a BN output
        out = torch.nn.functional.relu(out, inplace=True)
        y = self.bn3(self.conv3(out))
        branch = torch.tanh(y).mean((2, 3)) + y.mean((2, 3))  # the BN output read by two branches
        y.add_(1.0)
        return self.fc(branch + y.mean((2, 3)))


@pytest.mark.parametrize(
    "act", [nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardswish(inplace=True), nn.SiLU(inplace=True)]
)
def test_inplace_ops_after_bn_get_the_plain_autograd_gradient(act):
    """The fast path hands the BN output back as a fresh tensor: in-place ops after it run and stay exact."""
    model = randomize_model_bn(InplaceAfterBN(act).double())
    bns = batchnorm_layers(model)
    targets = losses.MomentTargets.build(bn_targets(bns), input_channels=1)
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)

    def step(collect):
        x.grad = None
        out = model(x)
        loss = losses.moment_distance(*collect(), targets, torch.ones(())) + out.square().mean()
        loss.backward()
        return loss.detach(), x.grad.clone()

    with frozen(model):
        with capture_inputs(dict(bns)) as feats:
            want = step(lambda: reference([f.clone() for f in targets.gather(feats, x)], "per_sample"))
        with bn_sums(dict(bns)) as sums:
            got = step(lambda: targets.collect(sums, x, "per_sample"))
    torch.testing.assert_close(got, want)


def randomize_model_bn(model):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
    return model.eval()
