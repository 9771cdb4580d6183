"""Every range torch's observers take (issue 29, part 8): 16- and 32-bit grids, and all of float32.

torch's MinMaxObserver and HistogramObserver calibrate at ``dtype=torch.qint32`` and on a Hugging
Face attention mask (``0`` and ``torch.finfo(torch.float32).min``, added to the scores); so must
these observers. docs/observers.md, "Ranges", lists what they accept and refuse.
"""

import copy
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from zq_plugin import _compat
from zq_plugin.errors import ConfigError
from zq_plugin.observers import ao, stats
from zq_plugin.observers.histogram import nonempty_bins, observe
from zq_plugin.qparams import fake_quantize, quant_range

STATS = ("MSE", "Percentile", "ACIQ", "Entropy")
FAMILIES = ["ao"]
if _compat.has_torchao():
    from zq_plugin.observers import pt2e

    FAMILIES.append("pt2e")
F32 = torch.finfo(torch.float32)

# 16- and 32-bit grids as torch's observers take them: (keyword arguments, quant_min, quant_max)
WIDE = {
    "qint32": ({"dtype": torch.qint32}, -(2**31), 2**31 - 1),
    "int32": ({"dtype": torch.int32, "quant_min": -(2**31), "quant_max": 2**31 - 1}, -(2**31), 2**31 - 1),
    "quint8-31bit": ({"dtype": torch.quint8, "quant_min": 0, "quant_max": 2**31 - 1}, 0, 2**31 - 1),
    "int16": ({"dtype": torch.int16}, -(2**15), 2**15 - 1),
    "uint16": ({"dtype": torch.uint16}, 0, 2**16 - 1),
}
WIDE_32 = ("qint32", "int32", "quint8-31bit")


def observer_class(family: str, stat: str, per_channel: bool):
    module = ao if family == "ao" else pt2e
    return getattr(module, ("PerChannel" if per_channel else "") + stat + "Observer")


def scheme(per_channel: bool, symmetric: bool) -> torch.qscheme:
    if per_channel:
        return torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    return torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine


def torch_minmax(per_channel: bool, **kwargs):
    return (PerChannelMinMaxObserver if per_channel else MinMaxObserver)(**kwargs)


def assert_same_qparams(obs, ref):
    for a, b in zip(obs.calculate_qparams(), ref.calculate_qparams(), strict=True):
        assert torch.equal(a, b.to(a.dtype)), (a, b)


@st.composite
def data(draw, max_rows=3):
    """``[C, N]`` float32: a bulk at a drawn scale, sometimes ReLU'd, sometimes with an outlier."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(rows, cols, generator=gen) * 2.0 ** draw(st.integers(-12, 12))
    if draw(st.booleans()):
        x = x.relu()
    if draw(st.booleans()):
        x[0, 0] = x.abs().max() * draw(st.sampled_from([8.0, 1000.0]))
    return x


# ---------------------------------------------------------------------------------------------
# 16- and 32-bit grids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("grid", WIDE_32)
def test_entropy_observer_at_32_bits_answers_like_minmax(family, per_channel, symmetric, grid):
    """The regression: ``calculate_qparams`` asked for 2,199,023,255,552 bytes (one float64 per level and candidate)."""
    kwargs = {**WIDE[grid][0], "qscheme": scheme(per_channel, symmetric)}
    obs, ref = observer_class(family, "Entropy", per_channel)(**kwargs), torch_minmax(per_channel, **kwargs)
    x = torch.tensor([[0.0, 1.0]]) if per_channel else torch.tensor([0.0, 1.0])
    obs(x)
    ref(x)
    assert_same_qparams(obs, ref)


@pytest.mark.parametrize("stat", ["MSE", "Entropy"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@settings(max_examples=25)
@given(x=data(), grid=st.sampled_from(WIDE_32), symmetric=st.booleans())
@example(x=torch.tensor([[0.0, 1.0]]), grid="qint32", symmetric=False)
@example(x=torch.tensor([[-1e-30, 3e-30, 0.0]]), grid="int32", symmetric=True)  # eps-clamped scale
def test_at_32_bits_the_searches_keep_the_full_range(stat, per_channel, x, grid, symmetric):
    """With 2^32 levels clipping cannot pay, so MSE and entropy answer torch's MinMaxObserver exactly.

    MSE: the smallest clip the search tries (``delta = 1 / 2112`` of the range with the defaults)
    costs at least ``(delta max)^3 / (3 w)`` on the bin at the end (bin width ``w <= max / 512``),
    while the rounding error it saves is at most ``N delta s^2 / 2`` with ``s <= 2 max / 2^32``:
    clipping pays only beyond ~10^14 values. Entropy: a candidate must span ``levels`` histogram
    bins and there are at most 2^20, so only the full range qualifies (with an ``eps``-clamped step
    every candidate has the same grid, and the full range wins the tie).
    """
    kwargs = {**WIDE[grid][0], "qscheme": scheme(per_channel, symmetric)}
    obs, ref = observer_class("ao", stat, per_channel)(**kwargs), torch_minmax(per_channel, **kwargs)
    x = x if per_channel else x.reshape(-1)
    obs(x)
    ref(x)
    assert_same_qparams(obs, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@settings(max_examples=12)
@given(x=data(), grid=st.sampled_from(sorted(WIDE)), symmetric=st.booleans())
def test_wide_grids_give_valid_qparams(family, stat, per_channel, x, grid, symmetric):
    """Every statistic at 16 and 32 bits: finite, 0 exact, the values inside the range within half a step."""
    kwargs, qmin, qmax = WIDE[grid]
    obs = observer_class(family, stat, per_channel)(**kwargs, qscheme=scheme(per_channel, symmetric))
    x = x if per_channel else x.reshape(-1)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= qmin) & (zp <= qmax)).all()
    # quantize in float64: in float32, x / s + zero_point near 2^31 moves in steps of 256
    shape = (-1, 1) if per_channel else (-1,)
    s, z = scale.to(torch.float64).reshape(shape), zp.to(torch.float64).reshape(shape)

    def roundtrip(v: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(torch.round(v / s) + z, qmin, qmax) - z) * s

    assert torch.equal(roundtrip(torch.zeros_like(x, dtype=torch.float64)), torch.zeros_like(x, dtype=torch.float64))
    lo, hi = obs.calculate_range()
    inside = (x >= lo.reshape(shape)) & (x <= hi.reshape(shape))
    err = (roundtrip(x.to(torch.float64)) - x).abs()
    # half a step, plus the float32 rounding of the scale times up to 2^32 levels (torch's formula; MinMax too)
    bound = s * 0.5 * (1 + 1e-6) + torch.maximum(-lo, hi).to(torch.float64).reshape(shape) * 2.0**-22
    assert (err <= bound)[inside].all()


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    bits=st.integers(9, 14),
    signed=st.booleans(),
    bins=st.sampled_from([16, 64, 256]),
    scale_exp=st.integers(-10, 10),
)
@example(seed=0, bits=16, signed=True, bins=64, scale_exp=0)
def test_kl_with_more_levels_than_bins_equals_the_prefix_sum_kl(seed, bits, signed, bins, scale_exp):
    """``kl_loss`` numbers the occupied cells when levels outnumber the bins; ``kl_loss_sums`` is the reference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, generator=gen) * 2.0**scale_exp
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if not signed:
        x = x.abs()
    b = nonempty_bins(observe(None, x, ch_axis=0, bins=bins), drop_zero_bins=True)
    assert qmax - qmin + 1 > b.count.shape[1]
    amax = x.abs().amax(1).to(torch.float64)
    s = (torch.rand(6, 2, generator=gen, dtype=torch.float64) * 3 + 0.05) * amax / (qmax - qmin)
    z = torch.zeros_like(s)
    direct = stats.kl_loss(b, s, z, qmin, qmax, 0.001)
    reference = stats.kl_loss_sums(stats.kl_sums(b), s, z, qmin, qmax, 0.001)
    assert torch.equal(torch.isinf(direct), torch.isinf(reference))
    finite = torch.isfinite(direct)
    torch.testing.assert_close(direct[finite], reference[finite], rtol=1e-9, atol=1e-12)


def test_aciq_clip_is_an_interior_optimum_at_every_width():
    """The candidates of ``aciq_alpha`` reach past the optimum for any int32 grid (and beyond)."""
    for dist in stats.DISTRIBUTIONS:
        for two_sided in (True, False):
            alphas = [stats.aciq_alpha(dist, 2**b, two_sided) for b in (2, 4, 8, 16, 24, 32, 40, 62)]
            assert alphas == sorted(alphas)
            for b, a in zip((2, 4, 8, 16, 24, 32, 40, 62), alphas, strict=True):
                assert a < max(60.0, 2 * math.log(2**b) + 10.0) - 1.0, (dist, b, a)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"quant_min": 0, "quant_max": 2**31},
        {"quant_min": -(2**31) - 1, "quant_max": 0},
        {"quant_min": 0, "quant_max": 2**40},
    ],
)
def test_ranges_beyond_int32_are_refused_by_name(family, kwargs):
    """torch's observers fail on them too, in calculate_qparams (int32 zero points); these refuse at once."""
    with pytest.raises(ConfigError, match="int32"):
        observer_class(family, "MSE", False)(dtype=torch.qint32, **kwargs)
    with pytest.raises((AssertionError, RuntimeError)):
        ref = MinMaxObserver(dtype=torch.qint32, **kwargs)
        ref(torch.tensor([0.0, 1.0]))
        ref.calculate_qparams()


# ---------------------------------------------------------------------------------------------
# all of float32: attention masks at finfo.min


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["min", "max"])
def test_a_finfo_min_mask_calibrates_like_torch(family, stat, per_channel, sign):
    """The regression: ``[0, finfo.min]`` raised ConfigError ("magnitude >= 2^100"); torch calibrates it."""
    x = torch.tensor([0.0, F32.min]) * sign
    x = x.reshape(1, -1) if per_channel else x
    options = {"percentile": 100.0} if stat == "Percentile" else {}
    obs = observer_class(family, stat, per_channel)(**options)
    obs(x)
    ref = torch_minmax(per_channel)
    ref(x)
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all()
    if stat == "Percentile":  # percentile=100 is MinMax
        assert_same_qparams(obs, ref)
    value = fake_quantize(torch.tensor([F32.min * sign]), scale, zp, 0, 255, 0 if per_channel else None)
    assert float(value) * sign < -1e38  # a mask value still masks after quantization (MSE clips 0.05% of it)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@settings(max_examples=12)
@given(
    x=data(),
    shift=st.integers(0, 127),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    p=st.sampled_from([2.0, 2.4, 12.0]),
)
def test_a_power_of_two_scaling_scales_the_answer_exactly(
    family, stat, per_channel, x, shift, bits, signed, symmetric, p
):
    """Up to float32's largest numbers, ``2^k x`` gets the range ``2^k (lo, hi)``, scale ``2^k s``, the same zero point.

    Powers of two are exact, the histogram's grid follows the data's exponent and every search is
    scale-free, so this holds bit for bit. It covers the ``histc``/``bincount`` switch near 2^128,
    the overflowing ``hi - lo`` of data on both sides, and the Lp error's unit scaling (``p=12``:
    ``(2^127)^13`` overflows float64).
    """
    rows = x.abs().amax(1)
    assume(bool((rows > 0).all()))
    # each row's max |x| in [1/2, 1): 2^127 x is finite, and no candidate step comes near eps
    x = x * torch.pow(2.0, -torch.frexp(rows).exponent.to(torch.float32)).unsqueeze(1)
    x = x if per_channel else x.reshape(-1)
    qmin, qmax = quant_range(bits, signed)
    kwargs = {"quant_min": qmin, "quant_max": qmax, "qscheme": scheme(per_channel, symmetric)}
    kwargs["dtype"] = torch.qint8 if signed else torch.quint8
    if stat == "MSE":
        kwargs["p"] = p
    cls = observer_class(family, stat, per_channel)
    small, big = cls(**kwargs), cls(**kwargs)
    small(x)
    big(x * 2.0**shift)
    factor = 2.0**shift
    for a, b in zip(small.calculate_range(), big.calculate_range(), strict=True):
        assert torch.equal(a * factor, b)
    (s1, z1), (s2, z2) = small.calculate_qparams(), big.calculate_qparams()
    assert torch.equal(z1, z2)
    assert torch.equal(s1 * factor, s2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stat", STATS)
def test_a_range_wider_than_float32_gets_a_finite_scale(family, stat):
    """``[finfo.min, finfo.max]``: torch's MinMaxObserver answers ``scale=inf``; here ``(hi - lo)`` is halved first."""
    x = torch.tensor([F32.min, 0.0, F32.max])
    options = {"percentile": 100.0} if stat == "Percentile" else {}
    obs = observer_class(family, stat, False)(**options)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all()
    if stat == "Percentile":  # the full range: 2 max / 255, zero point 128
        assert float(scale) == pytest.approx(2 * F32.max / 255, rel=1e-6) and int(zp) == 128
    ref = MinMaxObserver()
    ref(x)
    assert math.isinf(float(ref.calculate_qparams()[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_two_level_grid_wider_than_float32_is_refused_by_name(family):
    obs = observer_class(family, "Percentile", False)(quant_min=0, quant_max=1, percentile=100.0)
    obs(torch.tensor([F32.min, F32.max]))
    with pytest.raises(ConfigError, match="float32's largest number"):
        obs.calculate_qparams()


class MaskedAttention(nn.Module):
    """Scores plus a Hugging Face additive mask (0 to attend, finfo.min to mask), then softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2)
        return torch.softmax(scores + mask, dim=-1)


@pytest.mark.parametrize("stat", STATS)
def test_fx_prepare_calibrate_convert_with_a_finfo_min_mask(stat):
    """As with torch's MinMaxObserver/HistogramObserver: the masked keys get probability 0 after convert."""
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, 3:] = F32.min
    act = observer_class("ao", stat, False).with_args(dtype=torch.quint8)
    wt = observer_class("ao", stat, True).with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=wt))
    prepared = prepare_fx(copy.deepcopy(model), mapping, (x, mask))
    for _ in range(2):
        prepared(x, mask)
    for module in prepared.modules():
        if hasattr(module, "calculate_qparams"):
            assert torch.isfinite(module.calculate_qparams()[0]).all()
    out = convert_fx(prepared)(x, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 3:], torch.zeros_like(out[..., 3:]))
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5), atol=0.02, rtol=0)
