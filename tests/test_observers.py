"""Hypothesis properties of every observer, in both families (torch.ao and torchao).

Each property runs the default profile's 100 examples per statistic and family.
"""

import inspect
import io
import math
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from zq_plugin import _compat
from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.observers import ao, histogram, stats
from zq_plugin.qparams import fake_quantize, quant_range

STATS = ("MSE", "Percentile", "ACIQ", "Entropy")
FAMILIES = ["ao"]
if _compat.has_torchao():
    from zq_plugin.observers import pt2e

    FAMILIES.append("pt2e")


def observer_class(family: str, stat: str, per_channel: bool):
    module = ao if family == "ao" else pt2e
    return getattr(module, ("PerChannel" if per_channel else "") + stat + "Observer")


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def grids(draw, per_channel=False):
    """(kwargs for an observer, qmin, qmax, symmetric)."""
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    narrow = draw(st.booleans())
    symmetric = draw(st.booleans())
    qmin, qmax = quant_range(bits, signed, narrow)
    if per_channel:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    else:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    dtype = torch.qint8 if signed else torch.quint8
    return {"dtype": dtype, "qscheme": qscheme, "quant_min": qmin, "quant_max": qmax}


@st.composite
def tensors(draw, min_rows=1, max_rows=1):
    """``[C, N]`` float32 data: a bulk with a drawn scale, optionally a few outliers."""
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, 48))
    values = draw(st.lists(finite, min_size=rows * cols, max_size=rows * cols))
    scale = 2.0 ** draw(st.integers(-12, 8))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, cols) * scale
    if draw(st.booleans()):  # a heavy-tailed bulk, as activations have
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        bulk = torch.randn(rows, 256, generator=gen) * scale
        x = torch.cat([x, bulk, bulk.relu() * 3], dim=1)
    return x


def make(family, stat, per_channel, grid, **options):
    return observer_class(family, stat, per_channel)(**grid, **options)


def _zero_representable(scale, zp, qmin, qmax):
    zero = torch.zeros_like(scale)
    assert torch.equal(fake_quantize(zero, scale, zp, qmin, qmax), zero)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@given(grid=grids(), x=tensors())
def test_qparams_valid_and_in_range_values_reconstruct(family, stat, grid, x):
    obs = make(family, stat, False, grid)
    assert obs(x) is x
    scale, zp = obs.calculate_qparams()
    qmin, qmax = grid["quant_min"], grid["quant_max"]
    assert scale.shape == (1,) and zp.shape == (1,)
    assert float(scale) > 0
    assert qmin <= int(zp) <= qmax
    _zero_representable(scale, zp, qmin, qmax)
    lo, hi = obs.calculate_range()
    assert float(x.min()) <= float(lo) <= float(hi) <= float(x.max())
    if grid["qscheme"] == torch.per_tensor_symmetric:
        m = max(-float(lo), float(hi))
        lo, hi = torch.tensor(-m), torch.tensor(m)
    inside = x[(x >= min(float(lo), 0.0)) & (x <= max(float(hi), 0.0))]
    err = (fake_quantize(inside, scale, zp, qmin, qmax) - inside).abs()
    tol = float(scale) / 2 * (1 + 1e-5) + 1e-6 * float(x.abs().max())
    assert float(torch.cat([err, torch.zeros(1)]).max()) <= tol


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@given(grid=grids(per_channel=True), x=tensors(min_rows=1, max_rows=4))
def test_per_channel_qparams_valid_and_idempotent(family, stat, grid, x):
    obs = make(family, stat, True, grid)
    obs(x)
    scale, zp = obs.calculate_qparams()
    qmin, qmax = grid["quant_min"], grid["quant_max"]
    assert scale.shape == zp.shape == (x.shape[0],)
    assert bool((scale > 0).all()) and bool(((zp >= qmin) & (zp <= qmax)).all())
    _zero_representable(scale, zp, qmin, qmax)
    lo, hi = obs.calculate_range()
    if grid["qscheme"] == torch.per_channel_symmetric:
        m = torch.maximum(-lo, hi)
        lo, hi = -m, m
    once = fake_quantize(x, scale, zp, qmin, qmax, axis=0)
    assert torch.equal(fake_quantize(once, scale, zp, qmin, qmax, axis=0), once)
    inside = (x >= lo.clamp(max=0).unsqueeze(1)) & (x <= hi.clamp(min=0).unsqueeze(1))
    tol = scale.unsqueeze(1) / 2 * (1 + 1e-5) + 1e-6 * x.abs().amax(1, keepdim=True)
    assert bool(((once - x).abs() <= tol)[inside].all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@given(grid=grids(), x=tensors())
def test_fake_quantization_is_idempotent(family, stat, grid, x):
    obs = make(family, stat, False, grid)
    obs(x)
    scale, zp = obs.calculate_qparams()
    qmin, qmax = grid["quant_min"], grid["quant_max"]
    once = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quantize(once, scale, zp, qmin, qmax), once)
    # and it is what torch's own kernel computes with these qparams
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    assert torch.equal(once, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@given(grid=grids(per_channel=True), x=tensors(min_rows=1, max_rows=4), axis=st.integers(0, 2))
def test_per_channel_equals_per_tensor_on_each_slice(family, stat, grid, x, axis):
    data = x.unsqueeze(2).movedim(0, axis)  # channels along `axis`, [.., C, ..]
    bins = {"bins": 2048}  # the per-channel entropy default is smaller; compare like with like
    pc = make(family, stat, True, grid, ch_axis=axis, **bins)
    pc(data)
    scale, zp = pc.calculate_qparams()
    assert scale.shape == (x.shape[0],) and zp.shape == (x.shape[0],)
    tensor_grid = dict(grid)
    tensor_grid["qscheme"] = (
        torch.per_tensor_symmetric if grid["qscheme"] == torch.per_channel_symmetric else torch.per_tensor_affine
    )
    for c in range(x.shape[0]):
        pt = make(family, stat, False, tensor_grid, **bins)
        pt(data.select(axis, c))
        s, z = pt.calculate_qparams()
        assert torch.equal(s, scale[c : c + 1]), (c, s, scale)
        assert int(z) == int(zp[c])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True])
@given(data=st.data())
def test_merging_batches_equals_observing_the_concatenation(family, stat, per_channel, data):
    """Stated tolerance: none. The histogram grid depends only on the data, so merging is exact."""
    grid = data.draw(grids(per_channel=per_channel))
    rows = 3 if per_channel else 1
    x = data.draw(tensors(min_rows=rows, max_rows=rows))
    y = data.draw(tensors(min_rows=rows, max_rows=rows)) * 2.0 ** data.draw(st.integers(-6, 6))
    streamed, whole = make(family, stat, per_channel, grid), make(family, stat, per_channel, grid)
    streamed(x)
    streamed(y)
    whole(torch.cat([x, y], dim=1))
    assert torch.equal(streamed.histogram, whole.histogram)
    for a, b in zip(streamed.calculate_qparams(), whole.calculate_qparams(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True])
@given(data=st.data())
def test_state_dict_round_trip_reproduces_qparams(family, stat, per_channel, data):
    grid = data.draw(grids(per_channel=per_channel))
    x = data.draw(tensors(min_rows=2 if per_channel else 1, max_rows=3 if per_channel else 1))
    obs = make(family, stat, per_channel, grid)
    obs(x)
    expected = obs.calculate_qparams()
    buf = io.BytesIO()
    torch.save(obs.state_dict(), buf)
    buf.seek(0)
    fresh = make(family, stat, per_channel, grid)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(fresh.calculate_qparams(), expected, strict=True):
        assert torch.equal(a, b)
    # torch's helper swallows load errors: check that it really restored the statistics
    parent, other = torch.nn.Module(), torch.nn.Module()
    parent.activation_post_process = obs
    other.activation_post_process = make(family, stat, per_channel, grid)
    helpers = _compat if family == "ao" else _compat.torchao_pt2e()
    helpers.load_observer_state_dict(other, helpers.get_observer_state_dict(parent))
    for a, b in zip(other.activation_post_process.calculate_qparams(), expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_channel", [False, True])
@given(data=st.data())
def test_percentile_100_is_minmax(family, per_channel, data):
    grid = data.draw(grids(per_channel=per_channel))
    x = data.draw(tensors(min_rows=1, max_rows=3 if per_channel else 1))
    obs = make(family, "Percentile", per_channel, grid, percentile=100)
    ref = (_compat.PerChannelMinMaxObserver if per_channel else _compat.MinMaxObserver)(**grid)
    if not per_channel:
        x = x.reshape(-1)
    obs(x)
    ref(x)
    for a, b in zip(obs.calculate_qparams(), ref.calculate_qparams(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(len(FAMILIES) < 2, reason="torchao is not installed")
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True])
@given(data=st.data())
def test_torch_ao_and_torchao_variants_agree(stat, per_channel, data):
    grid = data.draw(grids(per_channel=per_channel))
    x = data.draw(tensors(min_rows=1, max_rows=3 if per_channel else 1))
    a, b = make("ao", stat, per_channel, grid), make("pt2e", stat, per_channel, grid)
    a(x)
    b(x)
    for u, v in zip(a.calculate_qparams(), b.calculate_qparams(), strict=True):
        assert torch.equal(u, v)


@given(x=tensors(), y=tensors(), p=st.sampled_from([2.0, 2.4]))
@example(x=torch.tensor([[5.1656e-26]]), y=torch.tensor([[5.1656e-26]]), p=2.0)  # issue 14: float32 underflow
def test_lp_histogram_error_matches_direct_error(x, y, p):
    """The binned Lp error is the exact error up to the bin width (here: within 1 % + one bin), at every scale.

    The direct error is summed in float64 (``|e|^p`` of a 1e-26 error underflows in float32) and the
    grid step is relative to the data (no absolute offset), so the bound holds at any magnitude.
    """
    data = torch.cat([x, y], 1).reshape(-1)
    hist = histogram.observe(None, data)
    amax = float(data.abs().max())
    scale, zp = torch.tensor([amax / 10 if amax > 1e-30 else 1.0]), torch.tensor([0])
    est = float(stats.lp_error(histogram.nonempty_bins(hist), scale[None], zp[None], -4, 4, p))
    direct = float((fake_quantize(data, scale, zp, -4, 4).double() - data.double()).abs().pow(p).sum())
    width = float(hist.bin_width[0])
    bound = data.numel() * (amax + width) ** (p - 1) * width * p
    assert math.isclose(est, direct, rel_tol=0.01, abs_tol=bound)


@given(
    x=tensors(min_rows=1, max_rows=3),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    p=st.sampled_from([1, 2, 3, 4]),
    seed=st.integers(0, 2**16),
    bins=st.sampled_from([16, 256, 2048]),
)
def test_lp_error_from_prefix_sums_equals_the_direct_error(x, bits, symmetric, p, seed, bins):
    """Issue 13 (cost): the prefix-sum Lp error is the direct per-bin formula, to float rounding, at every scale."""
    hist = histogram.observe(None, x, ch_axis=0, bins=bins)
    qmin, qmax = quant_range(bits, symmetric or bits % 2 == 0, False)
    alpha = torch.rand(5, x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo, hi = (alpha * hist.min_val.double()).float(), (alpha * hist.max_val.double()).float()
    scale, zp = stats.compute_qparams(lo, hi, qmin, qmax, symmetric)
    scale, zp = scale.double(), zp.double()
    direct = stats.lp_error(histogram.nonempty_bins(hist), scale, zp, qmin, qmax, float(p))
    fast = stats.lp_error_moments(stats.bin_moments(hist, p), scale, zp, qmin, qmax, p)
    assert torch.allclose(fast, direct, rtol=1e-10, atol=0.0), (fast, direct)


def _conv_weights(large):
    from conformance import import_torchvision

    models = import_torchvision()
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10)
    weights = {"layer1.0.conv1": net.layer1[0].conv1.weight.detach()}
    if large:  # the slow reference on 256 channels costs seconds: MSE only
        weights["layer3.0.conv2"] = net.layer3[0].conv2.weight.detach()
    return weights


@pytest.mark.parametrize("p", [2.0, 2.4, 3.0])
def test_lp_search_by_prefix_sums_picks_the_reference_ranges_on_resnet18_weights(p, monkeypatch):
    """Issue 13 (cost): the fast per-channel search picks the ranges of the direct search (p=2.4 is the direct one)."""
    calls = []
    original = stats.lp_error_moments
    monkeypatch.setattr(stats, "lp_error_moments", lambda *a: calls.append(1) or original(*a))
    for name, weight in _conv_weights(p == 2.0).items():
        hist = histogram.observe(None, weight, ch_axis=0)
        for qmin, qmax, symmetric in ((-7, 7, True), (-8, 7, False)):
            ref = stats._lp_search(hist, qmin, qmax, symmetric, p=p, coarse=64, fine=32, eps=1e-7, fast=False)
            got = stats.lp_range(hist, qmin, qmax, symmetric, p=p, eps=1e-7)
            for a, b in zip(ref, got, strict=True):
                assert torch.equal(a, b), (name, p, qmin, int((a != b).sum()))
    assert bool(calls) == (p != 2.4)  # whole p: the prefix-sum route ran; 2.4: only the direct one


def test_lp_search_routes_only_channels_with_enough_bins_to_prefix_sums():
    """A channel with few non-empty bins (a depthwise 3x3) keeps the direct sum; the answers agree per channel."""
    gen = torch.Generator().manual_seed(0)
    w = torch.cat([torch.randn(3, 2048, generator=gen), torch.randn(2, 9, generator=gen).repeat(1, 228)[:, :2048]])
    hist = histogram.observe(None, w, ch_axis=0)
    got = stats.lp_range(hist, -7, 7, True)
    ref = stats._lp_search(hist, -7, 7, True, p=2.0, coarse=64, fine=32, eps=stats.EPS, fast=False)
    assert torch.equal(got[1], ref[1])
    for c in range(5):  # per-tensor search of each slice = row c of the per-channel search
        assert torch.equal(stats.lp_range(histogram.observe(None, w[c]), -7, 7, True)[1], got[1][c : c + 1])


def _candidates(hist, bits, symmetric, seed, count=6):
    """The full range and ``count`` random clipped ranges per channel: ``(scale, zero_point, qmin, qmax)``."""
    qmin, qmax = quant_range(bits, symmetric or bits % 2 == 0, False)
    alpha = torch.rand(count, hist.counts.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    alpha[0] = 1.0
    lo, hi = (alpha * hist.min_val.double()).float(), (alpha * hist.max_val.double()).float()
    scale, zp = stats.compute_qparams(lo, hi, qmin, qmax, symmetric)
    return scale.double(), zp.double(), qmin, qmax


@given(
    x=tensors(min_rows=1, max_rows=3),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    bins=st.sampled_from([16, 256, 2048]),
    min_bins_per_level=st.sampled_from([1.0, 0.01]),
    grid=st.sampled_from([None, 8, 64]),
)
@example(  # 100 values, 7 each: the full range scores exactly 0 (a uniform count in every cell)
    x=(torch.linspace(-1, 1, 100) * 0.731).repeat_interleave(7)[None],
    bits=4,
    symmetric=True,
    seed=0,
    bins=2048,
    min_bins_per_level=1.0,
    grid=None,
)
def test_kl_from_prefix_sums_equals_the_direct_kl(x, bits, symmetric, seed, bins, min_bins_per_level, grid):
    """Issue 13 (cost): the prefix-sum KL is the direct per-bin KL to float rounding, at every scale.

    ``grid`` snaps the data to that many levels (an already-quantized weight), where many
    candidates score exactly 0: the prefix-sum KL must give exactly 0 there too (relative tolerance).
    """
    if grid is not None:
        step = float(x.abs().max()) / grid or 1.0
        x = torch.round(x / step) * step
    hist = histogram.observe(None, x, ch_axis=0, bins=bins)
    scale, zp, qmin, qmax = _candidates(hist, bits, symmetric, seed)
    bins_ = histogram.nonempty_bins(hist, drop_zero_bins=True)
    direct = stats.kl_loss(bins_, scale, zp, qmin, qmax, min_bins_per_level)
    fast = stats.kl_loss_sums(stats.kl_sums(bins_), scale, zp, qmin, qmax, min_bins_per_level)
    assert torch.equal(torch.isinf(fast), torch.isinf(direct))
    finite = torch.isfinite(direct)
    assert torch.allclose(fast[finite], direct[finite], rtol=1e-9, atol=0.0), (fast, direct)


@pytest.mark.parametrize("per_channel", [True, False])
def test_entropy_search_by_prefix_sums_picks_the_reference_ranges_on_resnet18_weights(per_channel, monkeypatch):
    """Issue 13 (cost): the fast entropy search picks the ranges of the direct one, per channel and per tensor."""
    calls = []
    original = stats.kl_loss_sums
    monkeypatch.setattr(stats, "kl_loss_sums", lambda *a: calls.append(1) or original(*a))
    # per channel: layer1.0.conv1 (64 channels of 576 values); per tensor (cheap): also a 256-channel conv, 8 bits too
    weights = _conv_weights(large=not per_channel)
    for name, weight in weights.items():
        hist = histogram.observe(None, weight, ch_axis=0 if per_channel else None, bins=2048 if per_channel else 8192)
        grids = ((-7, 7, True), (-8, 7, False)) + (() if per_channel else ((-128, 127, False), (0, 255, False)))
        for qmin, qmax, symmetric in grids:
            options = {"min_bins_per_level": 1.0, "coarse": 64, "fine": 32, "eps": 1e-7}
            ref = stats._entropy_search(hist, qmin, qmax, symmetric, **options, fast=False)
            got = stats.entropy_range(hist, qmin, qmax, symmetric, **options)
            for a, b in zip(ref, got, strict=True):
                assert torch.equal(a, b), (name, qmin, qmax, int((a != b).sum()))
    assert calls  # the prefix-sum route ran


def test_entropy_search_routes_only_channels_with_enough_bins_to_prefix_sums(monkeypatch):
    """A channel with few non-empty bins keeps the direct KL; an already-quantized channel (exact KL ties) is
    routed to prefix sums and keeps the reference's tie rule; per-channel = per-tensor search of each slice."""
    gen = torch.Generator().manual_seed(0)
    few = torch.randn(1, 9, generator=gen).repeat(1, 228)[:, :2048]  # a depthwise 3x3: 9 values
    snapped = torch.linspace(-1, 1, 128).repeat_interleave(16).unsqueeze(0)  # 128 levels, 16 each: KL 0 at alpha 1
    w = torch.cat([torch.randn(2, 2048, generator=gen), few, snapped])
    hist = histogram.observe(None, w, ch_axis=0)
    routed = []
    original = stats.kl_loss_sums
    monkeypatch.setattr(
        stats, "kl_loss_sums", lambda sums, *a: routed.append(sums.count.shape[0]) or original(sums, *a)
    )
    got = stats.entropy_range(hist, -7, 7, True)
    assert set(routed) == {3}  # channels 0, 1 and 3
    ref = stats._entropy_search(
        hist, -7, 7, True, min_bins_per_level=1.0, coarse=64, fine=32, eps=stats.EPS, fast=False
    )
    assert torch.equal(got[1], ref[1])
    assert float(got[1][3]) == 1.0  # the exact zero at the full range wins the tie, as in the reference
    for c in range(4):
        assert torch.equal(stats.entropy_range(histogram.observe(None, w[c]), -7, 7, True)[1], got[1][c : c + 1])


# ---------------------------------------------------------------------------------------------
# examples and bad input


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
def test_empty_tensor_is_ignored_and_empty_observer_answers_like_torch(family, stat):
    for per_channel in (False, True):
        obs = make(family, stat, per_channel, {"quant_min": 0, "quant_max": 15})
        shape = (0, 4) if per_channel else (0,)
        obs(torch.empty(shape))
        ref = (_compat.PerChannelMinMaxObserver if per_channel else _compat.MinMaxObserver)(quant_min=0, quant_max=15)
        for a, b in zip(obs.calculate_qparams(), ref.calculate_qparams(), strict=True):
            assert torch.equal(a.to(b.dtype), b)
        assert "quant_max=15" in repr(obs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
def test_nan_input_raises_and_leaves_the_statistics(family, stat):
    obs = make(family, stat, False, {})
    obs(torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="NaN"):
        obs(torch.tensor([0.0, float("nan"), float("inf")]))
    assert float(obs.max_val) == 2.0 and int(obs.histogram.sum()) == 2  # the statistics were not touched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_infinite_values_are_skipped_with_a_warning(family, stat, per_channel):
    """Like torch's HistogramObserver: +-inf (an attention mask) is left out, with a warning, instead of raising."""
    grid = {"quant_min": 0, "quant_max": 15}
    finite = torch.tensor([[0.5, -1.0, 3.0, 2.0], [4.0, 0.25, -0.5, 1.0]])
    masked = torch.cat([finite, torch.tensor([[-math.inf, math.inf], [-math.inf, -math.inf]])], 1)
    x, ref_x = (masked, finite) if per_channel else (masked.reshape(-1), finite.reshape(-1))
    obs, ref = make(family, stat, per_channel, grid), make(family, stat, per_channel, grid)
    with pytest.warns(UserWarning, match="inf") as record:
        assert obs(x) is x
    assert record[0].filename == __file__  # the warning points at the caller, not at torch's Module
    ref(ref_x)
    assert torch.equal(obs.histogram, ref.histogram)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    for a, b in zip(obs.calculate_qparams(), ref.calculate_qparams(), strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obs(ref_x)  # finite data: no warning


@pytest.mark.parametrize("family", FAMILIES)
def test_a_channel_of_only_infinities_gets_a_zero_range(family):
    obs = make(family, "MSE", True, {"quant_min": -7, "quant_max": 7, "qscheme": torch.per_channel_symmetric})
    with pytest.warns(UserWarning, match="inf"):
        obs(torch.tensor([[1.0, -2.0], [-math.inf, -math.inf]]))
    scale, zp = obs.calculate_qparams()
    assert float(scale[1]) == pytest.approx(torch.finfo(torch.float32).eps) and int(zp[1]) == 0
    assert float(scale[0]) == pytest.approx(2.0 / 7, rel=0.05)


# torch's positional orders, and the attributes each argument must land in
TORCH_ORDER = {
    "tensor": (torch.qint8, torch.per_tensor_symmetric, False, -7, 7, None, 1e-5, False),
    "histogram": (512, torch.qint8, torch.per_tensor_symmetric, False, -7, 7, None, 1e-5, False),
    "channel": (1, torch.qint8, torch.per_channel_symmetric, False, -7, 7, None, 1e-5, False),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("order", list(TORCH_ORDER))
def test_positional_arguments_follow_torch_signatures(family, stat, order):
    """MinMaxObserver(dtype, ...), HistogramObserver(bins, dtype, ...), PerChannelMinMaxObserver(ch_axis, ...)."""
    args = TORCH_ORDER[order]
    per_channel = order == "channel"
    ours = observer_class(family, stat, per_channel)(*args)
    helpers = _compat if family == "ao" else _compat.torchao_pt2e()
    torch_cls = {"tensor": "MinMaxObserver", "histogram": "HistogramObserver", "channel": "PerChannelMinMaxObserver"}
    theirs = getattr(helpers, torch_cls[order])(*args)
    for attr in ("dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "is_dynamic"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert float(ours.eps) == pytest.approx(1e-5) and float(theirs.eps) == pytest.approx(1e-5)
    if order == "histogram":
        assert ours.bins == theirs.bins == 512
    if per_channel:
        assert ours.ch_axis == theirs.ch_axis == 1
        ours(torch.randn(2, 3, 4))
        assert ours.calculate_qparams()[0].shape == (3,)
    params = list(inspect.signature(type(ours)).parameters)
    assert params[:3] == (["ch_axis", "dtype", "qscheme"] if per_channel else ["dtype", "qscheme", "reduce_range"])


@pytest.mark.parametrize("family", FAMILIES)
def test_positional_misuse_raises_config_error(family):
    with pytest.raises(ConfigError, match="both by position and by keyword"):
        observer_class(family, "MSE", False)(torch.quint8, dtype=torch.qint8)
    with pytest.raises(ConfigError, match="at most 9 positional"):
        observer_class(family, "MSE", True)(*TORCH_ORDER["channel"], 0)
    with pytest.raises(ConfigError, match="ch_axis"):  # torch's per-channel order starts with ch_axis
        observer_class(family, "MSE", True)(torch.qint8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("bins", [1, 3, 100, 1000, 2048, 3000, 10**7])
def test_bins_accepts_what_torch_histogram_observer_accepts(family, stat, bins):
    helpers = _compat if family == "ao" else _compat.torchao_pt2e()
    assert helpers.HistogramObserver(bins=bins).bins == bins  # torch takes it
    obs = make(family, stat, False, {"quant_min": 0, "quant_max": 15}, bins=bins)
    assert obs.bins == bins
    resolution = obs.histogram.shape[1]
    assert resolution == obs.histogram_bins == histogram.check_bins(bins)
    assert resolution >= min(bins, 2**20) and resolution & (resolution - 1) == 0  # at least as fine as asked
    x = torch.linspace(-1, 3, 101)
    obs(x)
    lo, hi = obs.calculate_range()
    assert -1.0 <= float(lo) <= float(hi) <= 3.0


@pytest.mark.parametrize("bins", [0, -4, 2.5, True, "2048"])
def test_bins_that_torch_cannot_use_raise_config_error(bins):
    with pytest.raises(ConfigError, match="positive integer"):
        ao.MSEObserver(bins=bins)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_float_qparams_is_refused_naming_the_torch_class(family, stat, per_channel):
    with pytest.raises(ConfigError, match=r"per_channel_affine_float_qparams.*PerChannelMinMaxObserver"):
        observer_class(family, stat, per_channel)(qscheme=torch.per_channel_affine_float_qparams)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_torch_jit_script_is_refused_with_a_named_error(family, per_channel):
    obs = make(family, "MSE", per_channel, {"quant_min": 0, "quant_max": 15})
    with pytest.raises(ModelError, match=r"MSEObserver cannot be compiled by torch.jit.script.*convert"):
        torch.jit.script(obs)
    parent = torch.nn.Sequential(torch.nn.ReLU(), obs)  # also inside a model
    with pytest.raises(ModelError, match=r"torch\.jit\.script"):
        torch.jit.script(parent)
    assert parent[1] is obs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quant_min": 15, "quant_max": 0}, "quant_min <= 0 <= quant_max"),
        ({"quant_min": 3, "quant_max": 3}, "quant_min < quant_max"),
        ({"quant_min": 0}, "pass both"),
        ({"qscheme": torch.per_channel_affine}, "PerChannel"),
        ({"qscheme": torch.per_channel_affine_float_qparams}, "PerChannelMinMaxObserver"),
        ({"percentile": 0}, r"outside \(0, 100\]"),
        ({"percentile": 100.5}, r"outside \(0, 100\]"),
        ({"percentil": 99}, "unknown argument"),
        ({"bins": 0}, "positive integer"),
    ],
)
def test_bad_arguments_raise_config_error(family, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        observer_class(family, "Percentile", False)(**kwargs)


def test_bad_statistic_options_raise_config_error():
    with pytest.raises(ConfigError, match="distribution"):
        ao.ACIQObserver(distribution="cauchy")
    with pytest.raises(ConfigError, match="Lp exponent"):
        ao.MSEObserver(p=0.5)
    with pytest.raises(ConfigError, match="ch_axis"):
        ao.PerChannelMSEObserver(ch_axis="0")
    with pytest.raises(ConfigError, match="out of range"):
        ao.PerChannelMSEObserver(ch_axis=3)(torch.ones(2, 2))
    with pytest.raises(ConfigError, match="or MSEObserver for"):
        ao.PerChannelMSEObserver(qscheme=torch.per_tensor_affine)


def test_clipping_observers_clip_an_outlier_and_minmax_does_not():
    x = torch.cat([torch.linspace(0, 1, 20000), torch.tensor([50.0])])
    for stat in STATS:
        obs = make("ao", stat, False, {"quant_min": 0, "quant_max": 15})
        obs(x)
        assert float(obs.calculate_range()[1]) < 25.0, stat
    # and on a uniform bulk with no outlier, no statistic clips much
    for stat in ("MSE", "Percentile", "Entropy"):
        obs = make("ao", stat, False, {"quant_min": 0, "quant_max": 255})
        obs(torch.linspace(0, 1, 20000))
        assert float(obs.calculate_range()[1]) > 0.9, stat


def test_aciq_alpha_is_bit_aware():
    for dist in stats.DISTRIBUTIONS:
        alphas = [stats.aciq_alpha(dist, 2**b, True) for b in range(2, 9)]
        assert alphas == sorted(alphas)  # more levels -> clip less
    # Banner et al. model the step as 2 alpha / 2^M (we use levels - 1 = 2^M - 1 steps); with their
    # step (levels = 2^M + 1) the optimum is their published 2.83 b, 5.03 b and 9.89 b (2, 4, 8 bits)
    assert abs(stats.aciq_alpha("laplace", 5, True) - 2.83) < 0.01
    assert abs(stats.aciq_alpha("laplace", 17, True) - 5.03) < 0.01
    assert abs(stats.aciq_alpha("laplace", 257, True) - 9.89) < 0.01
    # Gaussian: 1.71 sigma at 2 bits, 2.55 sigma at 4 bits
    assert abs(stats.aciq_alpha("gaussian", 5, True) - 1.71) < 0.01
    assert abs(stats.aciq_alpha("gaussian", 17, True) - 2.55) < 0.01


def test_entropy_uses_the_real_number_of_levels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200000, generator=gen).abs()
    ranges = []
    for bits in (3, 8):
        obs = ao.EntropyObserver(quant_min=0, quant_max=2**bits - 1)
        obs(x)
        ranges.append(float(obs.calculate_range()[1]))
    assert ranges[0] < ranges[1]  # fewer levels -> tighter clip


def test_missing_torchao_names_the_extra(monkeypatch):
    import sys

    from zq_plugin.errors import MissingDependencyError

    monkeypatch.setattr(_compat, "_TORCHAO", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"zq-plugin\[pt2e\]"):
        _compat.torchao_pt2e()
    assert not _compat.has_torchao()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"quant_min": 0.0, "quant_max": 15}, "quant_min=0.0"), ({"quant_min": 0, "quant_max": "15"}, "quant_max='15'")],
)
def test_non_integer_range_raises_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ao.MSEObserver(**kwargs)


@given(
    seed=st.integers(0, 2**16),
    lobe=st.floats(0.01, 1.0),
    tail=st.floats(2.0, 50.0),
    bits=st.integers(2, 8),
)
def test_keep_min_keeps_the_low_end_and_searches_only_the_high_end(seed, lobe, tail, bits):
    """keep_min: lo is the observed min for any data; hi lies in (0, max]; the free search clips more or as much."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([-lobe * torch.rand(2000, generator=gen), torch.rand(2000, generator=gen).pow(4) * tail])
    hist = histogram.observe(None, x)
    qmin, qmax = quant_range(bits, signed=False)
    lo, hi = stats.lp_range(hist, qmin, qmax, False, keep_min=True)
    assert float(lo) == float(x.min())
    assert 0.0 < float(hi) <= float(x.max())
    free_lo, _ = stats.lp_range(hist, qmin, qmax, False)
    assert float(free_lo) >= float(lo)  # the free search may clip the low end; keep_min never does


def test_keep_min_gives_a_hardswish_output_a_negative_level_at_4_bits():
    """Smallest case of the MobileNetV3 collapse: a long-tailed Hardswish output got zero point 0 (lobe lost)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(20000, generator=gen), 12 * torch.rand(50, generator=gen)])
    y = torch.nn.functional.hardswish(z)
    obs = ao.MSEObserver(dtype=torch.quint8, quant_min=0, quant_max=15)
    obs(y)
    _, zp_free = obs.calculate_qparams()
    obs.keep_min = True  # drops the cached answer
    scale, zp = obs.calculate_qparams()
    assert int(zp_free) == 0  # the fault: every negative value quantizes to 0
    assert int(zp) >= 1 and float(-zp * scale) <= float(y.min()) + float(scale) / 2
    assert obs.keep_min and not ao.MSEObserver().keep_min
