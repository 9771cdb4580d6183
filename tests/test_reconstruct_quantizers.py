"""The quantizers reconstruction learns: AdaRound/Genie-M rounding and LSQ/QDrop activations."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zq_plugin.errors import ConfigError
from zq_plugin.qparams import fake_quantize
from zq_plugin.reconstruct import LearnedRoundingWeight, LSQActivation, beta_at, rounding_regularizer
from zq_plugin.reconstruct.quantizers import inverse_rectified_sigmoid, qdrop_mask, rectified_sigmoid


def _weight(seed, shape=(4, 3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    scale = w.abs().flatten(1).amax(1) / 7
    return w, scale


@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), push=st.floats(-8.0, 8.0))
def test_hard_rounding_moves_a_weight_by_one_grid_step_at_most(seed, bits, push):
    """Whatever V learned, each weight lands on floor or floor + 1 of W / s0 (inside the range)."""
    w, scale = _weight(seed)
    qmax = 2 ** (bits - 1) - 1
    q = LearnedRoundingWeight(w, scale * 7 / qmax, -qmax, qmax, learn_scale=False)
    with torch.no_grad():
        q.v.add_(push * torch.randn(q.v.shape, generator=torch.Generator().manual_seed(seed + 1)))
    q.hard = True
    s = (scale * 7 / qmax).reshape(-1, 1, 1, 1)
    integer = q() / s
    torch.testing.assert_close(integer, integer.round(), atol=1e-4, rtol=0)
    ratio = (w / s).clamp(-qmax, qmax)
    assert bool(((integer - ratio).abs() <= 1 + 1e-4).all())  # one grid step from the float weight
    assert bool((integer >= torch.floor(w / s).clamp(-qmax, qmax) - 1e-4).all())


def test_soft_rounding_starts_at_the_float_weight_and_hard_at_nearest():
    w, scale = _weight(0)
    q = LearnedRoundingWeight(w, scale, -7, 7)
    torch.testing.assert_close(q(), w, atol=1e-5, rtol=1e-5)
    q.hard = True
    nearest = fake_quantize(w, scale.reshape(-1, 1, 1, 1), torch.zeros(4, 1, 1, 1), -7, 7)
    torch.testing.assert_close(q(), nearest, atol=1e-6, rtol=0)


def test_genie_m_base_rounding_is_frozen_while_the_step_learns():
    """B = floor(W / s0) stays; only s and V train; the weight itself is never changed."""
    w, scale = _weight(1)
    original = w.clone()
    q = LearnedRoundingWeight(w, scale, -7, 7)
    base = q.base.clone()
    opt = torch.optim.Adam([q.v, q.scale_factor], lr=1e-2)
    target = 1.3 * w
    for _ in range(20):
        opt.zero_grad()
        loss = (q() - target).pow(2).sum() + 0.01 * q.regularizer(10.0)
        loss.backward()
        opt.step()
    assert not torch.equal(q.scale.detach(), scale)  # the step learned
    assert torch.equal(q.base, base) and torch.equal(w, original)
    assert [n for n, p in q.named_parameters() if p.requires_grad] == ["v", "scale_factor"]
    fixed = LearnedRoundingWeight(w, scale, -7, 7, learn_scale=False)
    assert [n for n, p in fixed.named_parameters() if p.requires_grad] == ["v"]  # AdaRound


@given(h=st.floats(0.0, 0.999))
def test_rectified_sigmoid_inverse(h):
    v = inverse_rectified_sigmoid(torch.tensor([h], dtype=torch.float64))
    torch.testing.assert_close(rectified_sigmoid(v), torch.tensor([h], dtype=torch.float64), atol=1e-9, rtol=0)


def test_regularizer_and_beta_schedule():
    assert float(rounding_regularizer(torch.tensor([-50.0, 50.0]), 2.0)) == 0.0
    half = inverse_rectified_sigmoid(torch.tensor([0.5, 0.5, 0.5]))
    assert float(rounding_regularizer(half, 20.0)) == pytest.approx(3.0)
    assert [beta_at(s, 1000) for s in (0, 199, 200, 600, 1000)] == [None, None, 20.0, 11.0, 2.0]
    with pytest.raises(ConfigError):
        beta_at(0, 0)


def test_bad_steps_are_refused():
    w, scale = _weight(2)
    with pytest.raises(ConfigError, match="finite and > 0"):
        LearnedRoundingWeight(w, torch.zeros_like(scale), -7, 7)
    with pytest.raises(ConfigError, match="channels"):
        LearnedRoundingWeight(w, scale[:2], -7, 7)
    with pytest.raises(ConfigError):
        LSQActivation(0.0, 0, 0, 15)
    with pytest.raises(ConfigError):
        LSQActivation(1.0, 0, 0, 15, drop_prob=1.5)


@given(seed=st.integers(0, 2**16), zp=st.integers(0, 8))
def test_lsq_forward_is_the_fake_quantize_formula(seed, zp):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 3
    q = LSQActivation(torch.tensor(0.25), zp, 0, 15).eval()
    torch.testing.assert_close(q(x), fake_quantize(x, torch.tensor(0.25), torch.tensor(float(zp)), 0, 15))


def test_lsq_step_gets_a_gradient_and_ste_passes_inside_the_range():
    q = LSQActivation(torch.tensor(0.5), 0, 0, 15)
    x = torch.tensor([0.3, 2.2, 100.0], requires_grad=True)
    q(x).sum().backward()
    assert q.scale.grad is not None and float(q.scale.grad) != 0.0
    assert x.grad.tolist() == [1.0, 1.0, 0.0]  # straight through inside, zero where clamped


def test_qdrop_mixes_float_and_quantized_elements_only_in_training():
    x = torch.linspace(0.01, 3.0, 4000)
    q = LSQActivation(torch.tensor(0.5), 0, 0, 15, drop_prob=0.5)
    q.generator = torch.Generator().manual_seed(0)
    out = q(x)
    kept = out == x
    assert 0.4 < float(kept.float().mean()) < 0.6  # about half keep their float value
    torch.testing.assert_close(out[~kept], q.quantize(x)[~kept])
    q.generator = torch.Generator().manual_seed(0)
    assert torch.equal(q(x), out)  # seeded: the same mix
    assert torch.equal(q.eval()(x), q.quantize(x))


@given(
    prob=st.floats(0.0, 1.0),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_qdrop_mask_holds_zeros_and_ones_and_is_seeded(prob, shape, seed):
    mask = qdrop_mask(shape, prob, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert mask.shape == shape and mask.dtype == torch.float64
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(
        mask, qdrop_mask(shape, prob, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    if prob in (0.0, 1.0):
        assert torch.equal(mask, torch.full(shape, prob, dtype=torch.float64))


@pytest.mark.parametrize("prob", [0.01, 0.25, 0.5, 0.9, 0.999])
def test_qdrop_mask_keeps_the_share_asked_and_lerp_gives_each_element_exactly(prob):
    n = 200_000
    mask = qdrop_mask((n,), prob, generator=torch.Generator().manual_seed(1))
    # binomial: 5 standard deviations (the 16-bit threshold moves the share by at most 2**-17)
    assert abs(float(mask.mean()) - prob) <= 5 * (prob * (1 - prob) / n) ** 0.5 + 2**-17
    x, q = torch.randn(n), torch.randn(n)
    mixed = torch.lerp(q, x, mask)
    assert torch.equal(mixed[mask == 1], x[mask == 1]) and torch.equal(mixed[mask == 0], q[mask == 0])
    runs = (mask[1:] != mask[:-1]).float().mean()  # neighbours independent: a change with 2 p (1 - p)
    assert abs(float(runs) - 2 * prob * (1 - prob)) < 0.01


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _lsq_composed(x, scale, zp, qmin, qmax, keep_float):
    """LSQ + QDrop from autograd's own ops (the reference the fused node must equal)."""
    import math

    factor = 1.0 / math.sqrt(x.numel() * max(abs(qmax), 1))
    scaled = scale * factor
    s = scale.detach() + (scaled - scaled.detach())
    q = (torch.clamp(_RoundSTE.apply(x * (1.0 / s)) + zp, qmin, qmax) - zp) * s
    return q if keep_float is None else torch.lerp(q, x, keep_float)


@given(seed=st.integers(0, 2**16), zp=st.integers(0, 8), drop=st.sampled_from([0.0, 0.5]), x_grad=st.booleans())
def test_lsq_node_equals_the_composed_ops_forward_and_backward(seed, zp, drop, x_grad):
    """The fused LSQ/QDrop node: the same values and the same gradients for the input and the step."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 3).requires_grad_(x_grad)
    grad = torch.randn(4, 3, 5, 5, generator=g)
    q = LSQActivation(torch.tensor(0.3), zp, 0, 15, drop_prob=drop)
    q.generator = torch.Generator().manual_seed(seed)
    out = q(x)
    out.backward(grad)
    x2 = x.detach().clone().requires_grad_(x_grad)
    s2 = torch.tensor(0.3, requires_grad=True)
    mask = qdrop_mask(x.shape, drop, generator=torch.Generator().manual_seed(seed)) if drop else None
    ref = _lsq_composed(x2, s2, zp, 0, 15, mask)
    ref.backward(grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(q.scale.grad, s2.grad, rtol=1e-5, atol=1e-6)
    if x_grad:  # the composed ops pass s * (1 / s), one ulp from 1
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


def _soft_composed(q, beta):
    """The soft weight and the regularizer from autograd's own ops (the reference for the fused node)."""
    shape = [-1] + [1] * (q.base.dim() - 1)
    h = rectified_sigmoid(q.v)
    weight = (q.scale0 * q.scale_factor).reshape(shape) * torch.clamp(q.base + h, q.quant_min, q.quant_max)
    return weight, rounding_regularizer(q.v, beta)


@given(seed=st.integers(0, 2**16), beta=st.floats(2.0, 20.0), bits=st.integers(2, 4), push=st.floats(0.0, 6.0))
def test_soft_rounding_node_equals_the_composed_ops_forward_and_backward(seed, beta, bits, push):
    """One node for the weight and the regularizer: the same values and gradients for V and the step factor."""
    w, scale = _weight(seed)
    qmax = 2 ** (bits - 1) - 1
    q = LearnedRoundingWeight(w, scale * 7 / qmax, -qmax, qmax)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        q.v.add_(push * torch.randn(q.v.shape, generator=g))  # some h at 0 or 1, some integers clamped
        q.scale_factor.mul_(1 + 0.1 * torch.randn(q.scale_factor.shape, generator=g))
    grad = torch.randn(w.shape, generator=g)
    q.beta = beta
    weight = q()
    (weight * grad).sum().add(0.3 * q.regularizer(beta)).backward()
    fused = q.v.grad.clone(), q.scale_factor.grad.clone()
    q.zero_grad()
    ref_weight, ref_reg = _soft_composed(q, beta)
    (ref_weight * grad).sum().add(0.3 * ref_reg).backward()
    torch.testing.assert_close(weight, ref_weight, rtol=0, atol=0)
    torch.testing.assert_close(fused[0], q.v.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], q.scale_factor.grad, rtol=1e-5, atol=1e-5)


def test_regularizer_after_a_forward_is_that_forwards_and_equals_a_fresh_one():
    w, scale = _weight(3)
    q = LearnedRoundingWeight(w, scale, -7, 7)
    with torch.no_grad():
        q.v.add_(torch.randn(q.v.shape, generator=torch.Generator().manual_seed(4)))
    fresh = rounding_regularizer(q.v, 7.0)
    q.beta = 7.0
    q()
    assert q.last_regularizer is not None
    torch.testing.assert_close(q.regularizer(7.0), fresh)
    assert q.last_regularizer is None  # used once
    assert torch.equal(q.regularizer(7.0), fresh)  # without a forward since: computed anew
    q()
    assert torch.equal(q.regularizer(3.0), rounding_regularizer(q.v, 3.0))  # another beta: computed anew
    q.beta = None
    q()
    assert q.last_regularizer is None
