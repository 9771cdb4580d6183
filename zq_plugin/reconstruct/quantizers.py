"""The quantizers that reconstruction learns: AdaRound/Genie-M weight rounding and LSQ/QDrop activations.

Weights (AdaRound, Nagel et al., ICML 2020; Genie-M, Jeon et al., CVPR 2023). For a weight
``W`` with a per-channel initial step
``s0`` and the signed narrow integer range ``[qmin, qmax]`` of the FX backend:

    B    = floor(W / s0)                             frozen at construction (Genie-M)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1
    W_q  = s * clamp(B + h(V), qmin, qmax)

``V`` starts where ``h(V) = W / s0 - B`` (the fractional part), so the soft weight equals ``W``
(inside the range) before any step. AdaRound keeps ``s = s0``; Genie-M learns ``s`` with ``V``,
which is sound only because ``B`` stays the one of ``s0`` (with ``B = floor(W / s)`` a new ``s``
would move the base and make the learned ``V`` stale). After optimization, rounding is made
hard: ``h = 1[V >= 0]``, so every weight lands on ``floor`` or ``floor + 1`` of ``W / s0``: one
grid step at most from round-to-nearest.

The rounding regularizer ``sum(1 - |2 h(V) - 1| ** beta)`` pushes ``h`` to 0 or 1; ``beta``
anneals from 20 to 2 after a warm-up (:func:`beta_at`).

Activations (LSQ, Esser et al., ICLR 2020; QDrop, Wei et al., ICLR 2022): a learned per-tensor
step ``s`` with ``x_q = s * clamp(round(x / s) + z, qmin, qmax) - s * z`` and the
straight-through estimator; LSQ scales the step's gradient by ``1 / sqrt(numel * qmax)``. In
training mode QDrop keeps each element's float value with probability ``drop_prob``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from zq_plugin.errors import ConfigError

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, elementwise.

    Example:
        >>> rectified_sigmoid(torch.tensor([-100.0, 0.0, 100.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``rectified_sigmoid(V) == h`` for ``h`` in ``[0, 1)`` (the logit of ``(h - gamma) / (zeta - gamma)``).

    Example:
        >>> torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(torch.tensor([0.0, 0.3, 0.9]))),
        ...                torch.tensor([0.0, 0.3, 0.9]), atol=1e-6)
        True
    """
    p = (h - GAMMA) / (ZETA - GAMMA)
    return torch.log(p) - torch.log1p(-p)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1, ``numel`` when all are 1/2.

    Example:
        >>> float(rounding_regularizer(torch.tensor([-100.0, 100.0]), 20.0))
        0.0
    """
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, total: int, *, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regularizer's ``beta`` at ``step`` of ``total``: ``None`` during the warm-up, then linear ``start -> end``.

    AdaRound's and BRECQ's schedule (warm-up 20 % of the iterations, beta 20 -> 2).

    Example:
        >>> beta_at(0, 100), beta_at(20, 100), beta_at(100, 100)
        (None, 20.0, 2.0)
    """
    if total <= 0 or not 0.0 <= warmup < 1.0:
        raise ConfigError(f"beta_at needs total > 0 and 0 <= warmup < 1, got total={total}, warmup={warmup}.")
    first = warmup * total
    if step < first:
        return None
    frac = min(1.0, (step - first) / max(total - first, 1.0))
    return start + (end - start) * frac


def _channel_shape(weight: torch.Tensor, ch_axis: int) -> list[int]:
    shape = [1] * weight.dim()
    shape[ch_axis] = -1
    return shape


class LearnedRoundingWeight(nn.Module):
    """The fake-quantized weight of one layer, with learned rounding (and, for Genie-M, learned steps).

    Args:
        weight: the float weight ``[C_out, ...]`` (``[C_in, C_out, ...]`` for ConvTranspose with
            ``ch_axis=1``); copied, never changed.
        scale: the initial step ``s0`` per channel, ``[C]`` (> 0), e.g. from a calibrated observer.
        quant_min, quant_max: the integer range, e.g. ``(-7, 7)`` for 4-bit narrow signed weights.
        ch_axis: the channel axis of ``scale``.
        learn_scale: learn ``s`` jointly with ``V`` (Genie-M) or keep ``s = s0`` (AdaRound); the
            parameter is the factor :attr:`scale_factor` of ``s = s0 * scale_factor``.

    ``forward()`` returns the fake-quantized weight, soft while :attr:`hard` is False.

    Raises:
        ConfigError: a non-positive or non-finite scale, a scale of the wrong length, or an empty range.

    Example:
        >>> w = torch.tensor([[0.26, -0.74]])
        >>> q = LearnedRoundingWeight(w, torch.tensor([0.5]), -7, 7)
        >>> torch.allclose(q(), w)            # soft rounding starts at the float weight
        True
        >>> q.hard = True
        >>> q().tolist()                      # hard: floor or floor + 1 of w / s0 (here round-to-nearest)
        [[0.5, -0.5]]
    """

    base: torch.Tensor
    scale0: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        quant_min: int,
        quant_max: int,
        *,
        ch_axis: int = 0,
        learn_scale: bool = True,
    ) -> None:
        super().__init__()
        if quant_min >= quant_max:
            raise ConfigError(f"quant_min {quant_min} must be below quant_max {quant_max}.")
        w = weight.detach()
        s0 = scale.detach().to(w.dtype).flatten()
        if s0.numel() != w.shape[ch_axis]:
            raise ConfigError(f"scale has {s0.numel()} steps but the weight has {w.shape[ch_axis]} channels.")
        if not bool(torch.isfinite(s0).all()) or bool((s0 <= 0).any()):
            raise ConfigError("every weight step (scale) must be finite and > 0; calibrate the weight observer first.")
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), int(ch_axis)
        shape = _channel_shape(w, ch_axis)
        ratio = w / s0.reshape(shape)
        base = torch.floor(ratio)
        self.register_buffer("base", base)
        self.register_buffer("scale0", s0.clone())
        self.v = nn.Parameter(inverse_rectified_sigmoid((ratio - base).clamp(0.0, 1.0 - 1e-6)))
        self.scale_factor = nn.Parameter(torch.ones_like(s0), requires_grad=learn_scale)
        self.hard = False
        #: the regularizer's beta for the next soft forward (set by the optimization loop; None: none)
        self.beta: float | None = None
        self.last_regularizer: tuple[float, torch.Tensor] | None = None

    @property
    def scale(self) -> torch.Tensor:
        """The step per channel, ``s = s0 * m`` (``[C]``), differentiable in the learned factor ``m``.

        The step is learned as a factor of ``s0`` (:attr:`scale_factor`, 1 at the start), so an
        optimizer's step is relative: per-channel steps span orders of magnitude (depthwise
        layers), and one absolute learning rate moved the smallest by more than themselves.
        """
        return self.scale0 * self.scale_factor

    def rounding(self) -> torch.Tensor:
        """``h(V)``, or its hard 0/1 value once :attr:`hard` is set."""
        if self.hard:
            return (self.v >= 0).to(self.v.dtype)
        return rectified_sigmoid(self.v)

    def integer(self) -> torch.Tensor:
        """``clamp(B + h(V), qmin, qmax)``: integers once hard."""
        return torch.clamp(self.base + self.rounding(), self.quant_min, self.quant_max)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight ``s * clamp(B + h(V), qmin, qmax)``, the float weight's shape.

        While soft and recording gradients, the weight and, when :attr:`beta` is set, the
        regularizer at that ``beta`` come from one autograd node (:class:`_SoftRounding`); the
        regularizer is kept for the next :meth:`regularizer` call of the same ``beta``.
        """
        shape = _channel_shape(self.base, self.ch_axis)
        if self.hard or not torch.is_grad_enabled():
            self.last_regularizer = None
            return self.scale.reshape(shape) * self.integer()
        weight, reg = _SoftRounding.apply(
            self.v, self.scale_factor, self.base, self.scale0.reshape(shape), self.quant_min, self.quant_max,
            self.beta,
        )  # fmt: skip
        self.last_regularizer = None if self.beta is None else (self.beta, reg)
        return cast(torch.Tensor, weight)

    def regularizer(self, beta: float) -> torch.Tensor:
        """:func:`rounding_regularizer` of this layer's ``V``.

        After a soft forward with :attr:`beta` equal to ``beta``, the value that forward made (one
        node computes the weight and the regularizer and both gradients); it is used once.
        Otherwise computed anew.
        """
        kept, self.last_regularizer = self.last_regularizer, None
        if kept is not None and kept[0] == beta:
            return kept[1]
        return rounding_regularizer(self.v, beta)


class _SoftRounding(torch.autograd.Function):
    """The soft weight ``s * clamp(B + h(V), qmin, qmax)`` and the regularizer ``sum(1 - |2h - 1|^beta)`` in one node.

    The same values and gradients as autograd gives the composed ops (clamps pass gradients at
    their bounds inclusive, ``sign(0) = 0``), with ``h(V)`` and ``|2h - 1|^(beta - 1)`` computed
    once per step: the regularizer's power, a transcendental per weight, was computed twice
    (forward and its backward), and the composed ops built ~30 autograd nodes per layer.

        dh/dV   = (zeta - gamma) * sigmoid(V) * (1 - sigmoid(V)) * 1[0 <= raw h <= 1]
        dW/dV   = s * 1[qmin <= B + h <= qmax] * dh/dV
        dR/dV   = -2 * beta * |2h - 1|^(beta - 1) * sign(2h - 1) * dh/dV
        dW/dm   = s0 * sum over the channel's elements of (grad * integer)
    """

    @staticmethod
    def forward(
        ctx: Any,
        v: torch.Tensor,
        scale_factor: torch.Tensor,
        base: torch.Tensor,
        scale0: torch.Tensor,
        quant_min: int,
        quant_max: int,
        beta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sig = torch.sigmoid(v)
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = raw.clamp(0.0, 1.0)
        dh = (sig - sig * sig).mul_(ZETA - GAMMA).mul_(h == raw)
        pre = base + h
        integer = pre.clamp(quant_min, quant_max)
        shape = scale0.shape
        s = scale0 * scale_factor.reshape(shape)
        weight = s * integer
        coef_w = dh * (integer == pre) * s
        coef_r = None
        reg = torch.zeros((), dtype=v.dtype, device=v.device)
        if beta is not None:
            d = 2.0 * h - 1.0
            a = d.abs()
            power = a.pow(beta - 1.0)
            reg = a.numel() - torch.dot(a.reshape(-1), power.reshape(-1))
            coef_r = power.mul_(d.sign_()).mul_(-2.0 * beta).mul_(dh)
        ctx.save_for_backward(coef_w, coef_r, integer if ctx.needs_input_grad[1] else None, scale0)
        return weight, reg

    @staticmethod
    def backward(ctx: Any, grad_w: torch.Tensor, grad_r: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        coef_w, coef_r, integer, scale0 = ctx.saved_tensors
        grad_v = grad_w * coef_w
        if coef_r is not None and grad_r is not None:
            grad_v = grad_v.add_(coef_r * grad_r)
        grad_m = None
        if integer is not None:
            dims = [i for i, n in enumerate(scale0.shape) if n == 1]
            grad_m = ((grad_w * integer).sum(dims, keepdim=True) * scale0).reshape(-1)
        return grad_v, grad_m, None, None, None, None, None


class _LSQFunction(torch.autograd.Function):
    """LSQ's fake-quantizer with QDrop's float elements in one autograd node (forward and gradients in few passes).

    Forward, as torch's ``fake_quantize_per_tensor_affine`` computes it (the same elements round
    the same way): ``t = x * (1 / s)``, ``c = clamp(round(t) + z, qmin, qmax)``,
    ``q = (c - z) * s``, then ``lerp(q, x, m)`` where a QDrop mask ``m`` is given. Gradients (LSQ,
    straight-through inside the range): ``dq/dx = 1[qmin <= round(t) + z <= qmax]``,
    ``dq/ds = (c - z) - 1[inside] * t``, times ``grad_factor``; an element that keeps its float
    value passes ``x``'s gradient and none to ``s``. The products the backward needs are made in
    the forward, so the backward is one multiply and one dot product; ``x``'s gradient is skipped
    where ``x`` needs none (a unit's input).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        keep_float: torch.Tensor | None,
        zero_point: int,
        quant_min: int,
        quant_max: int,
        grad_factor: float,
    ) -> torch.Tensor:
        t = x * (1.0 / scale)
        rounded = torch.round(t)
        if zero_point:
            rounded = rounded + zero_point
        c = torch.clamp(rounded, quant_min, quant_max)
        inside = c == rounded
        if zero_point:
            c = c - zero_point
        out = c * scale
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        pass_x: torch.Tensor | None = None
        ds: torch.Tensor | None = None
        if need_s:
            ds = torch.addcmul(c, t, inside.to(t.dtype), value=-1.0)  # (c - z) - 1[inside] * t
            if keep_float is not None:
                ds = torch.addcmul(ds, ds, keep_float, value=-1.0)  # float elements: no gradient to s
        if keep_float is not None:
            out = torch.lerp(out, x, keep_float)
            if need_x:
                pass_x = torch.maximum(inside.to(x.dtype), keep_float)
        elif need_x:
            pass_x = inside.to(x.dtype)
        ctx.save_for_backward(pass_x, ds)
        ctx.grad_factor, ctx.scale_shape = grad_factor, scale.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        pass_x, ds = ctx.saved_tensors
        grad_x = grad * pass_x if pass_x is not None else None
        grad_s = None
        if ds is not None:
            grad_s = (torch.dot(grad.reshape(-1), ds.reshape(-1)) * ctx.grad_factor).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def qdrop_mask(
    shape: torch.Size | tuple[int, ...],
    prob: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """QDrop's element mask: 1 with probability ``prob`` (the element keeps its float value), else 0.

    Returns a ``dtype`` tensor of ``shape`` holding 0 and 1, for ``torch.lerp(quantized, x, mask)``.
    At ``prob == 0.5`` (QDrop's and Genie-M's value) each element is one random bit, unpacked
    from 64-bit draws; otherwise a 16-bit uniform integer cut from 64-bit draws is compared with
    ``prob`` (``prob`` counts in steps of ``2**-16``). The random draws are the cost on a CPU:
    one 64-bit draw per 64 elements is 2x faster than one per 4 (0.37 against 0.76 ms for a
    32x48x14x14 map on 2 cores), which was 4x faster than ``torch.rand(shape) < prob``; mixing
    with ``lerp`` on a float mask is 10x faster than ``torch.where`` on a boolean one.

    Example:
        >>> m = qdrop_mask((4, 1000), 0.5, generator=torch.Generator().manual_seed(0))
        >>> sorted(m.unique().tolist()), abs(float(m.mean()) - 0.5) < 0.05
        ([0.0, 1.0], True)
    """
    if prob <= 0.0:
        return torch.zeros(shape, device=device, dtype=dtype)
    if prob >= 1.0:
        return torch.ones(shape, device=device, dtype=dtype)
    n = math.prod(shape)
    if prob == 0.5:
        words = torch.randint(
            -(2**63), 2**63 - 1, ((n + 63) // 64,), generator=generator, device=device, dtype=torch.int64
        )
        where = words.device
        shifts = _BIT_SHIFTS.get(where)
        if shifts is None:
            shifts = _BIT_SHIFTS[where] = torch.arange(8, dtype=torch.uint8, device=where)
        bits = (words.view(torch.uint8).unsqueeze(-1) >> shifts) & 1  # [n/8, 8]: every bit of every byte
        return bits.reshape(-1)[:n].view(shape).to(dtype)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), generator=generator, device=device, dtype=torch.int64)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return (draws < round(prob * 65536) - 32768).to(dtype)


class LSQActivation(nn.Module):
    """A per-tensor activation fake-quantizer with a learned step (LSQ) and QDrop's random float elements.

    Args:
        scale: the initial step (> 0), e.g. a calibrated observer's.
        zero_point: the integer zero point (fixed).
        quant_min, quant_max: the integer range, e.g. ``(0, 15)`` for 4-bit unsigned activations.
        drop_prob: QDrop's probability that an element keeps its float value, in training mode
            (0 disables it; Genie-M and QDrop use 0.5). Eval mode always quantizes every element.

    Raises:
        ConfigError: a non-positive scale, an empty range, or ``drop_prob`` outside ``[0, 1]``.

    Example:
        >>> q = LSQActivation(torch.tensor(0.5), 0, 0, 15).eval()
        >>> q(torch.tensor([0.2, 0.9, 100.0])).tolist()
        [0.0, 1.0, 7.5]
    """

    def __init__(
        self, scale: torch.Tensor | float, zero_point: int, quant_min: int, quant_max: int, *, drop_prob: float = 0.0
    ) -> None:
        super().__init__()
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(())
        if not bool(torch.isfinite(s)) or float(s) <= 0:
            raise ConfigError(f"the activation step must be finite and > 0, got {float(s)}; calibrate first.")
        if quant_min >= quant_max:
            raise ConfigError(f"quant_min {quant_min} must be below quant_max {quant_max}.")
        if not 0.0 <= drop_prob <= 1.0:
            raise ConfigError(f"drop_prob must lie in [0, 1], got {drop_prob}.")
        self.scale = nn.Parameter(s.clone())
        self.zero_point, self.quant_min, self.quant_max = int(zero_point), int(quant_min), int(quant_max)
        self.drop_prob = float(drop_prob)
        self.generator: torch.Generator | None = None  # QDrop's random stream (set it for determinism)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Every element fake-quantized, with LSQ's gradients for ``x`` (STE inside the range) and the step."""
        return self._fake_quantize(x, None)

    def _fake_quantize(self, x: torch.Tensor, keep_float: torch.Tensor | None) -> torch.Tensor:
        factor = 1.0 / math.sqrt(max(x.numel(), 1) * max(abs(self.quant_max), 1))
        s = self.scale.to(x.dtype)
        out = _LSQFunction.apply(x, s, keep_float, self.zero_point, self.quant_min, self.quant_max, factor)
        return cast(torch.Tensor, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized; in training mode with ``drop_prob > 0``, QDrop's mix of quantized and float."""
        if not self.training or self.drop_prob == 0.0:
            return self._fake_quantize(x, None)
        keep_float = qdrop_mask(x.shape, self.drop_prob, generator=self.generator, device=x.device, dtype=x.dtype)
        return self._fake_quantize(x, keep_float)
