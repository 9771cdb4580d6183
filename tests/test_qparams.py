import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zq_plugin import qparams
from zq_plugin.errors import ConfigError

bits_st = st.integers(2, 8)
finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def ranges(draw):
    a, b = draw(finite), draw(finite)
    return min(a, b), max(a, b)


@st.composite
def qrange(draw):
    bits = draw(bits_st)
    signed = draw(st.booleans())
    narrow = draw(st.booleans())
    return qparams.quant_range(bits, signed, narrow)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, "4", True])
def test_bad_bits_raise_config_error(bits):
    with pytest.raises(ConfigError, match="2 to 8"):
        qparams.quant_range(bits, signed=True)


@given(bits_st, st.booleans(), st.booleans())
def test_quant_range_levels(bits, signed, narrow):
    qmin, qmax = qparams.quant_range(bits, signed, narrow)
    assert qmin <= 0 <= qmax
    assert qmax - qmin + 1 == 2**bits - int(narrow)
    if signed and narrow:
        assert qmin == -qmax


@given(ranges(), qrange(), st.booleans())
def test_qparams_valid_and_zero_exact(rng, qr, symmetric):
    lo, hi = rng
    qmin, qmax = qr
    scale, zp = qparams.compute_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, symmetric)
    assert float(scale) > 0
    assert qmin <= int(zp) <= qmax
    zero = qparams.fake_quantize(torch.zeros(1), scale, zp, qmin, qmax)
    assert float(zero) == 0.0


@given(ranges(), qrange(), st.booleans(), st.integers(0, 2**31 - 1))
def test_in_range_values_reconstruct_within_half_step(rng, qr, symmetric, seed):
    lo, hi = rng
    qmin, qmax = qr
    scale, zp = qparams.compute_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, symmetric)
    # The representable interval: affine covers [min(lo,0), max(hi,0)] exactly (up to rounding of zp).
    rep_lo = float((qmin - zp) * scale)
    rep_hi = float((qmax - zp) * scale)
    x = torch.rand(256, generator=torch.Generator().manual_seed(seed)) * (rep_hi - rep_lo) + rep_lo
    err = (qparams.fake_quantize(x, scale, zp, qmin, qmax) - x).abs().max()
    assert float(err) <= float(scale) / 2 * (1 + 1e-4) + 1e-6


@given(ranges(), qrange(), st.booleans(), st.integers(0, 2**31 - 1))
def test_fake_quantize_idempotent_and_level_count(rng, qr, symmetric, seed):
    lo, hi = rng
    qmin, qmax = qr
    scale, zp = qparams.compute_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, symmetric)
    x = torch.randn(512, generator=torch.Generator().manual_seed(seed)) * (abs(hi - lo) + 1)
    once = qparams.fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(qparams.fake_quantize(once, scale, zp, qmin, qmax), once)
    assert torch.unique(once).numel() <= qmax - qmin + 1


@given(ranges(), bits_st, st.booleans(), st.integers(0, 2**31 - 1))
def test_matches_torch_observer_and_kernel(rng, bits, symmetric, seed):
    from torch.ao.quantization import MinMaxObserver

    lo, hi = rng
    x = torch.tensor([lo, hi])
    for dtype, signed in ((torch.quint8, False), (torch.qint8, True)):
        qmin, qmax = qparams.quant_range(bits, signed)
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        obs(x)
        ref_scale, ref_zp = obs.calculate_qparams()
        scale, zp = qparams.compute_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax, symmetric)
        torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
        assert int(zp) == int(ref_zp)
        y = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * (hi - lo + 1)
        ref = torch.fake_quantize_per_tensor_affine(y, float(scale), int(zp), qmin, qmax)
        torch.testing.assert_close(qparams.fake_quantize(y, scale, zp, qmin, qmax), ref, rtol=0, atol=0)


@given(st.integers(1, 6), bits_st, st.booleans(), st.integers(0, 2**31 - 1))
def test_per_channel_equals_per_tensor_per_slice(channels, bits, symmetric, seed):
    w = torch.randn(channels, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
    qmin, qmax = qparams.quant_range(bits, signed=True, narrow=True)
    mn, mx = w.amin((1, 2, 3)), w.amax((1, 2, 3))
    scale, zp = qparams.compute_qparams(mn, mx, qmin, qmax, symmetric)
    per_channel = qparams.fake_quantize(w, scale, zp, qmin, qmax, axis=0)
    for c in range(channels):
        s, z = qparams.compute_qparams(mn[c : c + 1], mx[c : c + 1], qmin, qmax, symmetric)
        assert torch.equal(per_channel[c], qparams.fake_quantize(w[c], s, z, qmin, qmax))
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, qmin, qmax)
    assert torch.equal(per_channel, ref)


@pytest.mark.parametrize(
    ("lo", "hi", "qmin", "qmax", "match"),
    [
        (1.0, 0.0, 0, 15, "exceeds"),
        (float("nan"), 1.0, 0, 15, "NaN"),
        (0.0, float("inf"), 0, 15, "NaN or Inf"),
        (0.0, 1.0, 5, 15, "quant_min"),
        (0.0, 1.0, 0, 0, "quant_min"),
    ],
)
def test_bad_ranges_raise(lo, hi, qmin, qmax, match):
    with pytest.raises(ConfigError, match=match):
        qparams.compute_qparams(torch.tensor([lo]), torch.tensor([hi]), qmin, qmax)
