"""Each synthesis method on a tiny in-test model: it lowers its loss, and its parts behave as stated."""

import math

import pytest
import torch
from torch import nn

import zq_plugin
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.synth import dsg, registry

SHAPE = (1, 12, 12)


def context(n=6, seed=0, log=None):
    return registry.BatchContext(
        batch_size=n,
        input_shape=SHAPE,
        input_range=(-2.0, 2.0),
        generator=torch.Generator().manual_seed(seed),
        loss_log=log,
    )


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("zeroq", {"steps": 40}),
        ("dsg", {"steps": 40}),
        ("dsg", {"steps": 40, "statistics": "per_sample"}),
        ("dsg", {"steps": 40, "statistics": "per_sample", "batch_weight": 1.0}),
        ("dsg", {"steps": 40, "sci_weight": 0.1}),
        ("retro", {"steps": 40}),
        ("genie", {"steps": 40, "width": 16, "latent_dim": 16}),
    ],
)
def test_method_lowers_its_loss(tiny_bn_net, method, options):
    spec = registry.get_method(method)
    log: list[float] = []
    with zq_plugin.synth.hooks.frozen(tiny_bn_net):
        out = spec.make_batch(tiny_bn_net, spec.config(options), context(log=log))
    x = out[0] if isinstance(out, tuple) else out
    assert x.shape == (6, *SHAPE) and torch.isfinite(x).all()
    assert len(log) == options["steps"]
    # on this random tiny model retro's class term competes with the BN term, and genie's generator
    # (batch-normalised output, clamped to the box) cannot reach every per-sample target: both still fall
    factor = {"retro": 0.7, "genie": 0.95}.get(method, 0.5)
    assert min(log[-5:]) < factor * log[0], (log[0], log[-5:])


def test_margins_grow_with_epsilon_and_shrink_with_more_values():
    sigma = torch.rand(16) + 0.5
    d5, g5 = dsg.statistic_margins(sigma, 49, 0.5)
    d9, g9 = dsg.statistic_margins(sigma, 49, 0.9)
    assert d9 > d5 > 0 and g9 > g5 > 0
    d_big, g_big = dsg.statistic_margins(sigma, 4900, 0.9)
    assert d_big < d9 / 5 and g_big < g9 / 5  # 1/sqrt(n) scaling


@pytest.mark.parametrize("n", [1, 2, 9, 49, 400])
def test_margins_are_the_quantiles_of_sampled_feature_maps(n):
    """The closed-form margins equal the epsilon-quantiles of |mean - mu|, |std - sigma| of real Gaussian maps."""
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(6, generator=gen, dtype=torch.float64) * 2 + 0.2
    maps = torch.randn(20000, 6, n, generator=gen, dtype=torch.float64) * sigma[:, None]  # mean 0
    mean_dev = maps.mean(2).abs()
    std = maps.std(2) if n > 1 else maps.squeeze(2).abs()  # k = 1 for one value: |x| ~ sigma sqrt(chi2_1)
    std_dev = (std - sigma).abs()
    delta, gamma = dsg.statistic_margins(sigma, n, 0.9)
    assert delta == pytest.approx(float(mean_dev.flatten().quantile(0.9)), rel=0.02)
    assert gamma == pytest.approx(float(std_dev.flatten().quantile(0.9)), rel=0.02)


def test_slack_loss_is_zero_inside_the_margins():
    feat = torch.randn(4, 3, 8, 8)
    m, s = feat.mean(dim=(2, 3)), feat.std(dim=(2, 3))
    center_m, center_s = m.mean(0), s.mean(0)
    wide = (float((m - center_m).abs().max()) + 1e-3, float((s - center_s).abs().max()) + 1e-3)
    assert torch.all(dsg.slack_loss(feat, center_m, center_s, wide, "per_sample") == 0)
    assert torch.all(dsg.slack_loss(feat, center_m, center_s, (0.0, 0.0), "per_sample") > 0)


@pytest.mark.parametrize(("n", "layers"), [(3, 2), (5, 5), (40, 20), (7, 53)])
def test_lse_enhances_one_layer_per_sample_for_any_depth(n, layers):
    w = dsg.lse_weights(n, layers, 2.0)
    assert w.shape == (n, layers)
    assert torch.all((w == 2.0).sum(1) == 1)  # every sample enhances exactly one layer
    assert set(torch.nonzero(w == 2.0)[:, 1].tolist()) == set(range(min(n, layers)))


def test_sci_loss_is_lower_for_decorrelated_images():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(8, *SHAPE, generator=gen)
    same = torch.randn(1, *SHAPE, generator=gen).expand(8, *SHAPE) + 0.01 * torch.randn(8, *SHAPE, generator=gen)
    fresh = torch.randn(8, *SHAPE, generator=gen)
    assert dsg.sci_loss(fresh, noise) < dsg.sci_loss(same, noise)


def test_dsg_needs_batchnorm_and_names_alternatives(tiny_plain_net):
    with pytest.raises(ModelError, match="noise"):
        zq_plugin.synthesize(tiny_plain_net, "dsg", num_samples=2, input_shape=SHAPE, progress=False)


@pytest.mark.parametrize(
    "options", [{"epsilon": 0}, {"epsilon": 1.5}, {"statistics": "pixel"}, {"lse_weight": 0.5}, {"margin": 1}]
)
def test_dsg_bad_options(tiny_bn_net, options):
    with pytest.raises(ConfigError):
        zq_plugin.synthesize(tiny_bn_net, "dsg", num_samples=2, input_shape=SHAPE, progress=False, **options)


def test_dsg_images_are_more_diverse_than_zeroq_per_sample(tiny_bn_net):
    """Slack margins leave per-sample statistics free to differ (the point of DSG)."""
    common = {"num_samples": 8, "input_shape": SHAPE, "progress": False, "steps": 60, "batch_size": 8}
    z = zq_plugin.synthesize(tiny_bn_net, "zeroq", statistics="per_sample", **common).images
    d = zq_plugin.synthesize(tiny_bn_net, "dsg", statistics="per_sample", **common).images
    spread = lambda x: float(x.mean(dim=(1, 2, 3)).std())  # noqa: E731
    assert spread(d) > spread(z)


def test_unknown_option_lists_the_accepted_ones(tiny_bn_net):
    with pytest.raises(ConfigError, match="epsilon"):
        zq_plugin.synthesize(tiny_bn_net, "dsg", num_samples=2, input_shape=SHAPE, progress=False, epsilonn=0.9)


def test_retro_is_class_balanced_and_targets_its_classes(tiny_plain_net):
    data = zq_plugin.synthesize(
        tiny_plain_net, "retro", num_samples=9, batch_size=4, input_shape=(1, 8, 8), progress=False, steps=60
    )
    assert data.labels is not None and data.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    with torch.no_grad():
        predicted = tiny_plain_net(data.images).argmax(1)
    assert (predicted == data.labels).float().mean() >= 0.8


def test_retro_target_fixes_the_logit_gap(tiny_plain_net):
    """The class term alone pins the top-1 logit gap between log(c / (1 - c)) and log(c (K - 1) / (1 - c))."""
    gaps = {}
    for confidence in (0.98, 0.9999, 1.0):
        data = zq_plugin.synthesize(
            tiny_plain_net,
            "retro",
            num_samples=6,
            input_shape=(1, 8, 8),
            progress=False,
            confidence=confidence,
            input_range=None,
            input_weight=0.0,
            tv_weight=0.0,
        )
        with torch.no_grad():
            top2 = tiny_plain_net(data.images).topk(2, 1).values
        gaps[confidence] = float((top2[:, 0] - top2[:, 1]).median())
    for c in (0.98, 0.9999):
        assert 0.9 * math.log(c / (1 - c)) < gaps[c] < 1.1 * math.log(c * 2 / (1 - c)), gaps
    assert gaps[0.98] < gaps[0.9999] and gaps[0.98] < gaps[1.0], gaps


def test_retro_rejects_a_confidence_outside_0_1(tiny_plain_net):
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="confidence"):
            zq_plugin.synthesize(tiny_plain_net, "retro", num_samples=2, input_shape=(1, 8, 8), confidence=bad)


def test_retro_bn_free_path_runs_on_a_model_without_bn(tiny_plain_net):
    log: list[float] = []
    spec = registry.get_method("retro")
    with zq_plugin.synth.hooks.frozen(tiny_plain_net):
        ctx = registry.BatchContext(
            batch_size=6, input_shape=(1, 8, 8), input_range=(-2.0, 2.0), generator=torch.Generator(), loss_log=log
        )
        x, labels = spec.make_batch(tiny_plain_net, spec.config({"steps": 40}), ctx)
    assert x.shape == (6, 1, 8, 8)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert min(log[-5:]) < 0.5 * log[0]


def test_retro_labels_survive_cache_and_resume(tiny_bn_net, tmp_path):
    kw = {"num_samples": 7, "batch_size": 3, "input_shape": SHAPE, "progress": False, "steps": 5}
    first = zq_plugin.synthesize(tiny_bn_net, "retro", cache_dir=tmp_path, **kw)
    again = zq_plugin.synthesize(tiny_bn_net, "retro", cache_dir=tmp_path, **kw)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_retro_rejects_a_model_without_logits():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ModelError, match="logits"):
        zq_plugin.synthesize(net, "retro", num_samples=2, input_shape=SHAPE, progress=False, steps=2)


@pytest.mark.parametrize("shape", [(1, 12, 12), (3, 10, 14), (2, 9, 7)])
def test_genie_generator_follows_input_shape(shape):
    from zq_plugin.synth.genie import Generator

    out = Generator(shape, latent_dim=8, width=8)(torch.randn(4, 8))
    assert out.shape == (4, *shape)


def test_genie_is_deterministic_and_leaves_the_model_and_global_rng_alone(tiny_bn_net):
    from conftest import assert_unchanged, snapshot

    before = snapshot(tiny_bn_net)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    kw = {"num_samples": 4, "input_shape": SHAPE, "progress": False, "steps": 6, "width": 8, "latent_dim": 8}
    a = zq_plugin.synthesize(tiny_bn_net, "genie", **kw).images
    assert torch.equal(torch.rand(1), expected_next)  # the generator's init used a forked RNG
    b = zq_plugin.synthesize(tiny_bn_net, "genie", **kw).images
    assert torch.equal(a, b)
    assert_unchanged(tiny_bn_net, before)


def test_swing_convolution_hooks_only_strided_convs_and_are_removed(tiny_bn_net):
    from zq_plugin.synth.genie import swing_convolutions

    with swing_convolutions(tiny_bn_net, torch.Generator().manual_seed(0)) as count:
        assert count == 2  # conv2 and the 1x1 shortcut have stride 2
        out = tiny_bn_net(torch.randn(2, *SHAPE))
    assert out.shape == (2, 3)
    assert all(len(m._forward_pre_hooks) == 0 for m in tiny_bn_net.modules())


@pytest.mark.parametrize("method", ["zeroq", "dsg", "retro", "genie"])
@pytest.mark.parametrize(
    "act", [nn.ReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardswish(inplace=True), nn.SiLU(inplace=True)]
)
def test_every_bn_method_runs_with_an_inplace_activation_after_bn(method, act):
    """The issue's smallest input: torchvision's in-place activations right after a BatchNorm."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), act, nn.Flatten(), nn.Linear(144, 3)).eval()
    data = zq_plugin.synthesize(m, method, num_samples=4, input_shape=(1, 8, 8), steps=5, progress=False)
    assert data.images.shape == (4, 1, 8, 8) and torch.isfinite(data.images).all()


def test_zeroq_jitter_and_flip_are_seeded_change_the_images_and_off_draws_nothing(tiny_bn_net):
    """DeepInversion's augmentation as a ZeroQ option (issue 30): off gives the images of a run without it."""
    import zq_plugin
    from zq_plugin.synth.optimize import jitter_and_flip

    kw = {"num_samples": 8, "input_shape": (1, 8, 8), "input_range": (-1.0, 2.0), "seed": 1, "steps": 20, "progress": False}
    plain = zq_plugin.synthesize(tiny_bn_net, "zeroq", **kw).images
    off = zq_plugin.synthesize(tiny_bn_net, "zeroq", jitter=0, flip=False, **kw).images
    assert torch.equal(plain, off)
    jittered = zq_plugin.synthesize(tiny_bn_net, "zeroq", jitter=2, flip=True, **kw).images
    again = zq_plugin.synthesize(tiny_bn_net, "zeroq", jitter=2, flip=True, **kw).images
    assert torch.equal(jittered, again) and not torch.equal(jittered, plain)
    assert float(jittered.min()) >= -1.0 and float(jittered.max()) <= 2.0
    aug = jitter_and_flip(1, False, torch.Generator().manual_seed(0))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    shifted = aug(x)
    assert sorted(shifted.flatten().tolist()) == sorted(x.flatten().tolist())  # a roll: the same pixels
    with pytest.raises(ConfigError, match="jitter"):
        zq_plugin.synthesize(tiny_bn_net, "zeroq", jitter=-1, **kw)
