"""Retro-Synthesis's non-uniform weights: a clustered, piecewise-uniform grid (methods.md §4.2).

Each output channel's weights are split at a threshold ``t > 0`` into three clusters,
``[min, -t)``, ``[-t, t]`` and ``(t, max]``. The ``2^b`` levels of a ``b``-bit code are shared in
proportion to ``count_j * range_j`` (each non-empty tail gets at least one level, the centre
gets the rest), and each cluster is quantized uniformly between its own extremes::

    levels_j = lo_j + step_j * {0, ..., n_j - 1},    step_j = (hi_j - lo_j) / (n_j - 1)

so the dense centre gets fine steps and the sparse tails coarse ones. The threshold is taken
from the weight distribution: among quantiles of ``|w|`` (50 % to 99 %) the one with the least
squared error, per channel. Deployment needs a lookup table (the codes index a per-channel
codebook); torch.ao and Brevitas can only emulate it, which :class:`NonUniformFakeQuantize` does.

Example:
    >>> import torch
    >>> w = torch.randn(4, 256)
    >>> q = clustered_quantize(w, 4)  # 16 levels per row
    >>> [len(row.unique()) <= 16 for row in q]
    [True, True, True, True]
    >>> scale = w.abs().amax(1, keepdim=True) / 7  # uniform symmetric 4-bit, 15 levels
    >>> bool((q - w).square().mean() < (torch.round(w / scale) * scale - w).square().mean())
    True
"""

from __future__ import annotations

from typing import Any

import torch

from zq_plugin._compat import FakeQuantizeBase
from zq_plugin.qparams import check_bits

_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)


def _cluster(w: torch.Tensor, inside: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Uniform quantization of the values of ``w`` ``[C, n]`` selected by ``inside``, ``levels[c]`` levels per row.

    The levels span the cluster's own extremes (one level: its middle); values outside
    ``inside`` come out meaningless and are masked by the caller.
    """
    big = torch.finfo(w.dtype).max
    lo = torch.where(inside, w, big).amin(1, keepdim=True)  # [C, 1]
    hi = torch.where(inside, w, -big).amax(1, keepdim=True)  # [C, 1]
    empty = ~inside.any(1, keepdim=True)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    n = levels.unsqueeze(1).to(w.dtype)  # [C, 1]
    step = torch.where(n > 1, (hi - lo) / (n - 1).clamp_min(1), torch.zeros_like(hi))
    single = (lo + hi) / 2  # one level: the middle of the cluster
    index = torch.round((w - lo) / step.clamp_min(torch.finfo(w.dtype).tiny)).clamp(min=torch.zeros_like(n), max=n - 1)
    return torch.where(n > 1, lo + index * step, single)


def _allocate(counts: torch.Tensor, ranges: torch.Tensor, total: int) -> torch.Tensor:
    """Levels per cluster ``[C, 3]`` (tail, centre, tail) summing to ``total``.

    Each non-empty tail gets ``max(1, floor(total * share))`` with ``share`` its ``count * range``
    over the sum of the three; the centre gets the rest, at least one level (tails give way,
    the larger first, down to one level each).
    """
    share = counts * ranges  # [C, 3]
    frac = share / share.sum(1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
    left = torch.where(counts[:, 0] > 0, torch.floor(frac[:, 0] * total).clamp(min=1), 0.0)  # [C]
    right = torch.where(counts[:, 2] > 0, torch.floor(frac[:, 2] * total).clamp(min=1), 0.0)  # [C]
    for _ in range(total):  # at most a few rounds: the tails exceed total - 1 by a few levels at most
        over = left + right > total - 1
        if not bool(over.any()):
            break
        trim_left = over & (left >= right) & (left > 1)
        trim_right = over & ~trim_left & (right > 1)
        left, right = left - trim_left.to(left.dtype), right - trim_right.to(right.dtype)
    return torch.stack([left, total - left - right, right], 1)


def _quantize_at(w: torch.Tensor, t: torch.Tensor, bits: int) -> torch.Tensor:
    """Clustered quantization of ``w`` ``[C, n]`` at per-row threshold ``t`` ``[C, 1]``."""
    masks = (w < -t, w.abs() <= t, w > t)
    counts, ranges = [], []
    for m in masks:
        big = torch.finfo(w.dtype).max
        lo = torch.where(m, w, big).amin(1)
        hi = torch.where(m, w, -big).amax(1)
        any_ = m.any(1)
        counts.append(m.sum(1).to(w.dtype))
        ranges.append(torch.where(any_, hi - lo, torch.zeros_like(lo)))
    levels = _allocate(torch.stack(counts, 1), torch.stack(ranges, 1), 2**bits)  # [C, 3]
    out = torch.zeros_like(w)
    for j, m in enumerate(masks):
        out = torch.where(m, _cluster(w, m, levels[:, j]), out)
    return out


def clustered_quantize(w: torch.Tensor, bits: int, *, per_channel: bool = True, ch_axis: int = 0) -> torch.Tensor:
    """Quantize-dequantize ``w`` on a clustered ``bits``-bit grid (per channel along ``ch_axis``, or per tensor).

    Args:
        w: a weight tensor, e.g. ``[C_out, C_in, kH, kW]``.
        bits: 2 to 8; each channel (or the tensor) gets at most ``2^bits`` distinct values.
        per_channel: one grid per slice along ``ch_axis`` (else one for the whole tensor).
        ch_axis: the channel axis.

    Returns:
        A tensor of ``w``'s shape and dtype.
    """
    check_bits(bits)
    rows = w.detach().movedim(ch_axis, 0).reshape(w.shape[ch_axis], -1) if per_channel else w.detach().reshape(1, -1)
    rows = rows.float()  # [C, n]
    best = rows.clone()
    best_err = torch.full((rows.shape[0], 1), float("inf"))
    absq = torch.quantile(rows.abs(), torch.tensor(_QUANTILES), dim=1).T  # [C, Q]
    for qi in range(absq.shape[1]):
        t = absq[:, qi : qi + 1].clamp_min(torch.finfo(rows.dtype).tiny)  # [C, 1]
        q = _quantize_at(rows, t, bits)
        err = (q - rows).square().sum(1, keepdim=True)  # [C, 1]
        better = err < best_err
        best = torch.where(better, q, best)
        best_err = torch.where(better, err, best_err)
    if per_channel:
        moved = w.movedim(ch_axis, 0).shape
        return best.reshape(moved).movedim(0, ch_axis).to(w.dtype)
    return best.reshape(w.shape).to(w.dtype)


class NonUniformFakeQuantize(FakeQuantizeBase):
    """A weight fake-quantizer on the clustered grid, for a torch.ao ``QConfig`` (simulation only).

    Forward: ``w + (clustered_quantize(w) - w).detach()`` when fake quantization is on (straight-
    through gradient), the identity otherwise. It has no affine ``(scale, zero_point)``:
    ``calculate_qparams`` returns the per-channel max-abs scale of a uniform grid with the same
    number of levels, so that tools which read qparams keep working, but ``convert_fx`` cannot
    lower this grid (use the fake-quantized model, or a lookup-table kernel).

    Example:
        >>> import torch
        >>> from torch.ao.quantization import QConfig, MinMaxObserver
        >>> qc = QConfig(activation=MinMaxObserver, weight=NonUniformFakeQuantize.with_args(bits=4))
        >>> fq = qc.weight()
        >>> len(fq(torch.randn(1, 100)).unique()) <= 16
        True
    """

    def __init__(self, bits: int = 4, ch_axis: int = 0, per_channel: bool = True, **_: Any) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.ch_axis = ch_axis
        self.per_channel = per_channel
        self.dtype = torch.qint8
        self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        self.quant_min, self.quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        self.absmax: torch.Tensor
        self.register_buffer("absmax", torch.ones(1))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``X`` on its clustered grid (straight-through gradient)."""
        if bool(self.observer_enabled[0] == 1):
            dims = [d for d in range(X.dim()) if d != self.ch_axis] if self.per_channel else list(range(X.dim()))
            absmax = X.detach().abs().amax(dim=dims) if dims else X.detach().abs()
            self.absmax.resize_(absmax.shape).copy_(absmax)
        if bool(self.fake_quant_enabled[0] != 1):
            return X
        q = clustered_quantize(X, self.bits, per_channel=self.per_channel, ch_axis=self.ch_axis)
        return q + (X - X.detach())  # the values of q exactly, the gradient of X

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """A uniform stand-in: ``scale = absmax / (2^(b-1) - 1)``, zero point 0."""
        scale = (self.absmax / (2 ** (self.bits - 1) - 1)).clamp_min(torch.finfo(torch.float32).eps)
        return scale, torch.zeros_like(scale, dtype=torch.int64)

    def extra_repr(self) -> str:
        """Bits and granularity."""
        return f"bits={self.bits}, per_channel={self.per_channel}, ch_axis={self.ch_axis}"
