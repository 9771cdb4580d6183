"""Pure quantization math: integer ranges, (min, max) -> (scale, zero_point), fake quantization.

No torch.ao here: these functions are the single definition that observers, backends and
tests share. Conventions follow ``torch.ao.quantization`` where they overlap:

* integer range for ``bits`` b: signed ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``;
  *narrow* drops the lowest code: signed ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric grid,
  the Brevitas default for weights), unsigned ``[0, 2^b - 2]``;
* the range is first widened to contain 0, so that 0.0 is exactly representable:
  ``lo = min(min_val, 0)``, ``hi = max(max_val, 0)``;
* affine: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``,
  clamped to ``[qmin, qmax]``;
* symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zero_point = 0`` for a signed
  range and ``(qmin + qmax) // 2`` for an unsigned one (torch's rule for custom ranges);
* ``scale`` is clamped below by ``eps`` (float32 machine epsilon by default), as in torch.

Fake quantization is ``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` with
round-half-to-even, computed as ``x * (1 / scale)`` exactly like torch's CPU kernel.

Example:
    >>> import torch
    >>> quant_range(4, signed=True, narrow=True)
    (-7, 7)
    >>> scale, zp = compute_qparams(torch.tensor([-1.0]), torch.tensor([2.0]), 0, 15)
    >>> round(float(scale), 4), int(zp)
    (0.2, 5)
"""

from __future__ import annotations

import torch

from zq_plugin.errors import ConfigError

MIN_BITS = 2
MAX_BITS = 8
EPS = float(torch.finfo(torch.float32).eps)


def check_bits(bits: object, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in [2, 8], else raise :class:`ConfigError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(
            f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} "
            f"(the int8 containers of torch.ao and torchao hold at most 8 bits)."
        )
    return bits


def quant_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    Args:
        bits: bit width, 2 to 8.
        signed: two's-complement range if True, else unsigned.
        narrow: drop the most negative (signed) or the top (unsigned) code.

    Example:
        >>> quant_range(8, signed=False), quant_range(8, signed=True), quant_range(2, True, narrow=True)
        ((0, 255), (-128, 127), (-1, 1))
    """
    check_bits(bits)
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (qmin + 1, qmax) if narrow else (qmin, qmax)
    qmax = 2**bits - 1
    return (0, qmax - 1) if narrow else (0, qmax)


def _check_range(qmin: int, qmax: int) -> None:
    if not qmin <= 0 <= qmax or qmin >= qmax:
        raise ConfigError(
            f"quant_min={qmin}, quant_max={qmax} is not a valid integer range: need quant_min <= 0 <= quant_max "
            "and quant_min < quant_max; build one with zq_plugin.qparams.quant_range(bits, signed, narrow)."
        )


def compute_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool = False,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map an observed range to ``(scale, zero_point)``; elementwise, so per-tensor or per-channel.

    Args:
        min_val: observed minimum, shape ``[]``/``[1]`` (per-tensor) or ``[C]`` (per-channel).
        max_val: observed maximum, same shape as ``min_val``.
        qmin: lowest integer code.
        qmax: highest integer code.
        symmetric: symmetric grid around 0 (see module docstring) instead of affine.
        eps: lower bound on the scale.

    Returns:
        ``scale`` float32 and ``zero_point`` int64, both with the shape of ``min_val``.

    Raises:
        ConfigError: an invalid integer range, ``min_val > max_val`` or a non-finite range.
    """
    _check_range(qmin, qmax)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ConfigError("the observed range contains NaN or Inf; check the calibration data for non-finite values.")
    if bool((min_val > max_val).any()):
        raise ConfigError(f"min_val {min_val.tolist()} exceeds max_val {max_val.tolist()}; pass min <= max.")
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=eps)
        zp_value = 0 if qmin < 0 else (qmin + qmax) // 2
        zero_point = torch.full_like(scale, zp_value, dtype=torch.int64)
    else:
        scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x``: ``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``.

    Args:
        x: any float tensor.
        scale: ``[1]`` (per-tensor) or ``[x.shape[axis]]`` (per-channel).
        zero_point: same shape as ``scale``.
        qmin: lowest integer code.
        qmax: highest integer code.
        axis: channel axis for per-channel parameters, ``None`` for per-tensor.

    Returns:
        A new tensor of ``x``'s shape holding at most ``qmax - qmin + 1`` distinct values
        (per channel). Not differentiable in a useful way: use torch's FakeQuantize to train.
    """
    scale = scale.to(x.dtype)
    zp = zero_point.to(x.dtype)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    # clamp(round(v) + zp, qmin, qmax) - zp == clamp(round(v), qmin - zp, qmax - zp) exactly, since zp
    # is an integer: two elementwise passes fewer, and these ops are memory-bound on CPU.
    out = x * (1.0 / scale)
    out.round_()
    if zp.numel() == 1:
        z = float(zp)
        out.clamp_(qmin - z, qmax - z)
    else:
        torch.maximum(out, qmin - zp, out=out)
        torch.minimum(out, qmax - zp, out=out)
    return out.mul_(scale)
