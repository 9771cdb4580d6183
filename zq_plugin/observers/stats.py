"""Clipping-range statistics: pure functions from a :class:`Histogram` to a range ``(lo, hi)``.

Every function takes the accumulated statistics and the integer grid ``(quant_min, quant_max,
symmetric)`` and returns ``lo, hi`` of shape ``[C]`` (float32), always inside the observed
``[min, max]``; an empty channel gets ``(+inf, -inf)``, which observers treat as "not
calibrated" exactly as torch's MinMaxObserver does. ``(lo, hi)`` then goes through
:func:`zq_plugin.qparams.compute_qparams` (or torch's identical ``_calculate_qparams``).

The search-based statistics (:func:`lp_range`, :func:`entropy_range`) shrink the observed range by
a ratio ``alpha`` in ``(0, 1]``, ``(alpha * min, alpha * max)``, and pick the ratio with the smallest
loss: first on a grid of ``coarse`` ratios ``k / coarse``, then on ``fine`` ratios within one coarse
step of the best. Ties go to the larger ratio (less clipping). ``n = quant_max - quant_min + 1`` is
the real number of levels throughout: nothing assumes 256.

Example:
    >>> import torch
    >>> from zq_plugin.observers.histogram import observe
    >>> x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([20.0])])  # one outlier
    >>> lo, hi = lp_range(observe(None, x), 0, 15, symmetric=False)
    >>> 1.0 < float(hi) < 20.0  # MSE clips most of the outlier's range away
    True
    >>> percentile_range(observe(None, x), 0, 15, False, percentile=100.0)[1]
    tensor([20.])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch

from zq_plugin.errors import ConfigError
from zq_plugin.observers.histogram import Bins, Histogram, nonempty_bins
from zq_plugin.qparams import EPS, _check_range, compute_qparams

Range = tuple[torch.Tensor, torch.Tensor]
DISTRIBUTIONS = ("laplace", "gaussian")
_CHUNK = 1 << 16  # elements of a [G, C, M] float64 temporary: small enough to stay in cache


def check_percentile(percentile: object) -> float:
    """Return ``percentile`` as a float if it lies in (0, 100], else raise :class:`ConfigError`."""
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 < percentile <= 100:
        raise ConfigError(
            f"percentile={percentile!r} is outside (0, 100]: pass e.g. 99.99 (clip the top 0.01%), or 100 for MinMax."
        )
    return float(percentile)


def check_p(p: object) -> float:
    """Return the Lp exponent ``p`` if it is a finite number >= 1, else raise :class:`ConfigError`."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p < 1:
        raise ConfigError(f"p={p!r} is not a valid Lp exponent: use a number >= 1 (2.0 is MSE, 2.4 the BRECQ choice).")
    return float(p)


def _check_grid(coarse: object, fine: object) -> tuple[int, int]:
    for name, value in (("coarse", coarse), ("fine", fine)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise ConfigError(f"{name}={value!r} must be an integer from 1 to 4096 (number of candidate ratios).")
    return int(coarse), int(fine)  # type: ignore[call-overload]


def _empty_range(hist: Histogram) -> Range:
    return hist.min_val.clone(), hist.max_val.clone()


def _finish(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor) -> Range:
    """Clamp to the observed range, keep empty channels empty, return float32."""
    lo = torch.minimum(torch.maximum(lo.to(torch.float32), hist.min_val), hist.max_val)
    hi = torch.minimum(torch.maximum(hi.to(torch.float32), hist.min_val), hist.max_val)
    empty = hist.empty
    return torch.where(empty, hist.min_val, lo), torch.where(empty, hist.max_val, hi)


def minmax_range(hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> Range:
    """The observed ``(min, max)``: the MinMax baseline (arguments kept for a uniform signature)."""
    _check_range(quant_min, quant_max)
    return _empty_range(hist)


# ----------------------------------------------------------------------------------------------
# ratio search shared by the Lp and entropy statistics


Objective = Callable[[Bins, torch.Tensor, torch.Tensor], torch.Tensor]


def _pick(alpha: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The largest ``alpha`` (``[G, C]``) whose loss is within a relative ``1e-9`` of the column minimum.

    The tolerance absorbs float summation-order differences (a per-channel histogram is padded
    to a common length), so that per-channel and per-tensor searches agree exactly.
    """
    best = loss.min(0, keepdim=True).values
    near = loss <= best + 1e-9 * best.abs() + 1e-300
    return torch.where(near, alpha, torch.zeros_like(alpha)).max(0).values


def _search(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    objective: Objective,
    coarse: int,
    fine: int,
    eps: float,
    drop_zero_bins: bool = False,
) -> Range:
    """Minimise ``objective`` over ratios ``alpha``; see the module docstring.

    ``objective(bins, scale, zero_point)`` gets ``[G, C]`` candidate qparams for the bins of ``C``
    channels and returns a ``[G, C]`` loss.
    """
    _check_range(quant_min, quant_max)
    if bool(hist.empty.all()):
        return _empty_range(hist)
    bins = nonempty_bins(hist, drop_zero_bins=drop_zero_bins)
    mn = hist.min_val.to(torch.float64).nan_to_num(0.0, 0.0, 0.0)  # [C]; empty channels -> 0
    mx = hist.max_val.to(torch.float64).nan_to_num(0.0, 0.0, 0.0)
    mn, mx = torch.where(hist.empty, 0.0, mn), torch.where(hist.empty, 0.0, mx)

    def evaluate(alpha: torch.Tensor) -> torch.Tensor:  # alpha [G, C] -> loss [G, C]
        lo, hi = alpha * mn, alpha * mx
        losses = []
        channels = bins.count.shape[0]
        step = max(1, _CHUNK // max(1, alpha.shape[0] * bins.count.shape[1]))
        for c0 in range(0, channels, step):
            sl = slice(c0, c0 + step)
            sub = Bins(left=bins.left[sl], right=bins.right[sl], count=bins.count[sl], width=bins.width[sl])
            scale, zp = compute_qparams(
                lo[:, sl].to(torch.float32), hi[:, sl].to(torch.float32), quant_min, quant_max, symmetric, eps
            )
            losses.append(objective(sub, scale.to(torch.float64), zp.to(torch.float64)))
        return torch.cat(losses, dim=1)

    channels = mn.shape[0]
    alpha1 = torch.arange(coarse, 0, -1, dtype=torch.float64).div(coarse).unsqueeze(1).expand(coarse, channels)
    loss1 = evaluate(alpha1)  # [G, C]
    best1 = _pick(alpha1, loss1).unsqueeze(0)  # [1, C]
    best1_loss = loss1.gather(0, (alpha1 == best1).to(torch.int64).argmax(0, keepdim=True))  # [1, C]
    offsets = torch.linspace(1.0, -1.0, fine + 2, dtype=torch.float64)[1:-1].unsqueeze(1) / coarse  # [F, 1]
    alpha2 = (best1 + offsets).clamp(1.0 / (coarse * fine + 1), 1.0)  # [F, C]
    chosen = _pick(torch.cat([best1, alpha2]), torch.cat([best1_loss, evaluate(alpha2)]))  # [C]
    return _finish(hist, chosen * mn, chosen * mx)


# ----------------------------------------------------------------------------------------------
# Lp


def _sawtooth_integral(u: torch.Tensor, q: float) -> torch.Tensor:
    """Antiderivative of ``|u - round(u)|^(q-1)``: ``floor(u + 1/2) I + (h^q + sign(t)|t|^q) / q``, ``h = 1/2``."""
    k = torch.floor(u + 0.5)
    t = u - k
    half_q = 0.5**q
    return k * (2.0 * half_q / q) + (half_q + torch.sign(t) * t.abs().pow(q)) / q


def lp_error(
    bins: Bins, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, p: float = 2.0
) -> torch.Tensor:
    """Total ``sum |v - Q(v)|^p`` over the histogram, each bin's values spread uniformly in it.

    For a quantizer with grid step ``s`` and representable interval ``[L, U] = [(qmin - z) s, (qmax - z) s]``
    the error of a bin ``[a, b]`` holding ``n`` values is ``n / (b - a)`` times

        int_a^b |v - Q(v)|^p dv = int_{v<L} (L - v)^p + int_{v>U} (v - U)^p + s^(p+1) int |u - round(u)|^p du,

    each piece in closed form (the last with the periodic antiderivative of the rounding
    sawtooth, ``u = v / s``; the grid sits on integers of ``u`` because ``z`` is an integer).
    A zero-width bin (a single repeated value) uses ``n |v - Q(v)|^p``.

    Args:
        bins: ``[C, M]`` bins.
        scale: ``[G, C]`` candidate scales.
        zero_point: ``[G, C]`` candidate zero points.
        quant_min: lowest code.
        quant_max: highest code.
        p: exponent.

    Returns:
        ``[G, C]`` float64 errors.
    """
    s = scale.to(torch.float64).unsqueeze(-1)  # [G, C, 1]
    z = zero_point.to(torch.float64).unsqueeze(-1)
    lower, upper = (quant_min - z) * s, (quant_max - z) * s
    a, b, n = bins.left.unsqueeze(0), bins.right.unsqueeze(0), bins.count.unsqueeze(0)  # [1, C, M]
    q = p + 1.0
    zero = torch.zeros((), dtype=torch.float64)
    b1 = torch.minimum(b, lower)
    below = torch.where(b1 > a, ((lower - a).pow(q) - (lower - b1).clamp(min=0).pow(q)) / q, zero)
    a3 = torch.maximum(a, upper)
    above = torch.where(b > a3, ((b - upper).pow(q) - (a3 - upper).clamp(min=0).pow(q)) / q, zero)
    a2, b2 = torch.maximum(a, lower), torch.minimum(b, upper)
    inside = torch.where(b2 > a2, s.pow(q) * (_sawtooth_integral(b2 / s, q) - _sawtooth_integral(a2 / s, q)), zero)
    width = b - a
    point = (a - (torch.round(a / s).clamp(quant_min - z, quant_max - z) * s)).abs().pow(p)
    per_value = torch.where(width > 0, (below + above + inside) / width.clamp(min=1e-300), point)
    return (per_value * n).sum(-1)


def lp_range(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    *,
    p: float = 2.0,
    coarse: int = 64,
    fine: int = 32,
    eps: float = EPS,
) -> Range:
    """Clipping range minimising the Lp quantization error ``E |x - Q(x)|^p`` (MSE for ``p = 2``).

    ``alpha* = argmin_alpha sum_bins lp_error(Q_alpha)`` with ``Q_alpha`` the quantizer of
    ``(alpha min, alpha max)``; see :func:`lp_error`. ``p = 2.4`` is the choice of BRECQ and Genie.

    Example:
        >>> import torch
        >>> from zq_plugin.observers.histogram import observe
        >>> lo, hi = lp_range(observe(None, torch.randn(4, 1000), ch_axis=0), -7, 7, symmetric=True)
        >>> hi.shape, bool((hi < 4).all())
        (torch.Size([4]), True)
    """
    p = check_p(p)
    coarse, fine = _check_grid(coarse, fine)

    def objective(bins: Bins, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return lp_error(bins, scale, zp, quant_min, quant_max, p)

    return _search(hist, quant_min, quant_max, symmetric, objective, coarse, fine, eps)


# ----------------------------------------------------------------------------------------------
# percentile


def _quantile(bins: Bins, rank: torch.Tensor) -> torch.Tensor:
    """Value at ``rank`` (``[C]``, in [0, total]) of the binned data, linear inside a bin."""
    cum = bins.count.cumsum(1)  # [C, M]
    idx = torch.searchsorted(cum, rank.unsqueeze(1), side="left").clamp(max=cum.shape[1] - 1)  # [C, 1]
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(rank).unsqueeze(1))
    count = bins.count.gather(1, idx).clamp(min=1e-300)
    left, right = bins.left.gather(1, idx), bins.right.gather(1, idx)
    frac = ((rank.unsqueeze(1) - before) / count).clamp(0.0, 1.0)
    return (left + frac * (right - left)).squeeze(1)


def _abs_bins(hist: Histogram) -> Bins:
    """Bins of ``|x|``: the negative half mirrored onto the positive one, edges clipped to ``max |x|``."""
    half = hist.bins // 2
    counts = hist.counts[:, half:] + hist.counts[:, :half].flip(1)  # [C, B]
    absmax = torch.maximum(-hist.min_val, hist.max_val)
    mirrored = Histogram(
        counts=torch.cat([torch.zeros_like(counts), counts], 1),
        exponent=hist.exponent,
        min_val=torch.zeros_like(absmax),
        max_val=absmax,
    )
    return nonempty_bins(mirrored)


def percentile_range(
    hist: Histogram, quant_min: int, quant_max: int, symmetric: bool, *, percentile: float = 99.99
) -> Range:
    """The ``percentile``-th percentile of the pooled data (not a mean of per-batch percentiles).

    Affine: ``(P_(100-q), P_q)``. Symmetric: ``(-P_q(|x|), P_q(|x|))``. Ranks are taken on the
    merged histogram with linear interpolation inside a bin, so a percentile is exact up to one
    bin width; ``percentile=100`` returns the exact ``(min, max)``, i.e. MinMax.
    """
    _check_range(quant_min, quant_max)
    q = check_percentile(percentile) / 100.0
    if bool(hist.empty.all()):
        return _empty_range(hist)
    if symmetric:
        bins = _abs_bins(hist)
        total = bins.count.sum(1)
        m = _quantile(bins, q * total)
        if q == 1.0:
            m = torch.maximum(-hist.min_val, hist.max_val).to(torch.float64)
        return _finish(hist, -m, m)
    bins = nonempty_bins(hist)
    total = bins.count.sum(1)
    if q == 1.0:
        return _empty_range(hist)
    return _finish(hist, _quantile(bins, (1.0 - q) * total), _quantile(bins, q * total))


# ----------------------------------------------------------------------------------------------
# ACIQ


def _tail(c: torch.Tensor, distribution: str) -> torch.Tensor:
    """``E[(X - c)^2 ; X > c]`` for a unit exponential (Laplace tail) or a unit half-normal."""
    if distribution == "laplace":
        return 2.0 * torch.exp(-c)
    sf = 0.5 * torch.erfc(c / math.sqrt(2.0))
    pdf = torch.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    return 2.0 * ((c * c + 1.0) * sf - c * pdf)


@lru_cache(maxsize=256)
def aciq_alpha(distribution: str, levels: int, two_sided: bool) -> float:
    """Optimal clipping value in units of the fitted scale (Banner et al., ACIQ), for ``levels`` levels.

    Minimises ``tail(c) + (k c / (levels - 1))^2 / 12`` over ``c``: the clipping noise of a unit
    Laplace (``b = 1``) or Gaussian (``sigma = 1``) plus the uniform rounding noise of a grid of
    ``levels`` points over a range of width ``k c`` (``k = 2`` two-sided, ``1`` one-sided). For a
    two-sided distribution the tail counts twice, ``tail = 2 E[(X - c)^2; X > c]`` with ``X`` the
    one-sided version, which is what :func:`_tail` computes.

    Example:
        >>> round(aciq_alpha("laplace", 16, True), 2), round(aciq_alpha("gaussian", 16, True), 2)
        (4.92, 2.52)
    """
    c = torch.linspace(1e-3, 60.0, 60_000, dtype=torch.float64)
    k = 2.0 if two_sided else 1.0
    loss = _tail(c, distribution) + (k * c / (levels - 1)) ** 2 / 12.0
    return float(c[int(loss.argmin())])


def aciq_range(
    hist: Histogram, quant_min: int, quant_max: int, symmetric: bool, *, distribution: str = "laplace"
) -> Range:
    """Analytical clipping (ACIQ) for a Laplace or Gaussian fit, for the real number of levels.

    * symmetric: fit around 0, ``b = E|x|`` or ``sigma = sqrt(E x^2)``; range ``(-alpha, alpha)``.
    * affine, ``min >= 0`` (one-sided, e.g. after ReLU): fit an exponential (``b = E[x | x > 0]``) or a
      half-normal (``sigma = sqrt(E[x^2 | x > 0])``) to the values outside the histogram bin at 0
      (ReLU's zeros, which every grid represents exactly); range ``(0, alpha)``.
    * affine, two-sided: fit around the mean ``mu``; range ``(mu - alpha, mu + alpha)``.

    ``alpha = aciq_alpha(distribution, quant_max - quant_min + 1, two_sided) * scale``; moments come from
    the histogram's bin centres; the range is clamped to the observed ``[min, max]``.
    """
    _check_range(quant_min, quant_max)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"distribution={distribution!r} is not supported: use one of {DISTRIBUTIONS}.")
    if bool(hist.empty.all()):
        return _empty_range(hist)
    levels = quant_max - quant_min + 1
    bins = nonempty_bins(hist)
    x, n = bins.center, bins.count  # [C, M]
    total = n.sum(1).clamp(min=1e-300)
    one_sided = (hist.min_val >= 0) & (not symmetric)
    if symmetric:
        center = torch.zeros_like(total)
    else:
        center = (x * n).sum(1) / total
    dev = x - center.unsqueeze(1)
    # one-sided channels: fit the values beyond the bin at 0 (ReLU's zeros), measured from 0; that
    # bin, when present, is the first non-empty one and starts at 0
    n_nz = n.clone()
    n_nz[:, 0] = torch.where(bins.left[:, 0] <= 0, 0.0, n[:, 0])
    use_nz = one_sided & (n_nz.sum(1) > 0)
    weight = torch.where(use_nz.unsqueeze(1), n_nz, n)
    wsum = weight.sum(1).clamp(min=1e-300)
    dev = torch.where(one_sided.unsqueeze(1), x, dev)
    if distribution == "laplace":
        scale = (dev.abs() * weight).sum(1) / wsum
    else:
        scale = ((dev * dev * weight).sum(1) / wsum).sqrt()
    a_two = aciq_alpha(distribution, levels, True)
    a_one = aciq_alpha(distribution, levels, False)
    alpha = torch.where(one_sided, a_one * scale, a_two * scale)
    lo = torch.where(one_sided, torch.zeros_like(alpha), center - alpha)
    hi = torch.where(one_sided, alpha, center + alpha)
    return _finish(hist, lo, hi)


# ----------------------------------------------------------------------------------------------
# entropy


def kl_loss(
    bins: Bins, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, min_bins_per_level: float
) -> torch.Tensor:
    """TensorRT's KL criterion with ``n = quant_max - quant_min + 1`` target levels.

    ``P``: the in-range bins, the mass below ``L`` (above ``U``) added to the histogram bin at
    ``L`` (``U``). ``Q``: each quantization cell's in-range mass, without the clipped mass, spread
    evenly over its non-empty bins. Loss ``KL(P / |P| || Q / |Q|)``. As in TensorRT, clipped mass
    that lands on an empty edge bin meets ``Q = 0``; it is charged against a smoothed
    ``Q = 1e-4 / n`` instead of infinity. A candidate whose range spans fewer than
    ``min_bins_per_level * n`` histogram bins, or holds no bin, gets ``+inf``.

    Returns:
        ``[G, C]`` float64 losses.
    """
    s = scale.to(torch.float64).unsqueeze(-1)  # [G, C, 1]
    z = zero_point.to(torch.float64).unsqueeze(-1)
    lower, upper = (quant_min - z) * s, (quant_max - z) * s
    center = bins.center.unsqueeze(0)  # [1, C, M]
    n = bins.count.unsqueeze(0)
    width = bins.width.view(1, -1, 1)  # [1, C, 1]
    inside = (center >= lower) & (center <= upper) & (n > 0)  # [G, C, M]
    n_in = n * inside
    below = (n * (center < lower)).sum(-1, keepdim=True)  # [G, C, 1]
    above = (n * (center > upper)).sum(-1, keepdim=True)
    positions = torch.arange(n.shape[-1]).expand_as(inside)
    big = n.shape[-1]
    first = torch.where(inside, positions, big).min(-1, keepdim=True).values.clamp(max=big - 1)
    last = torch.where(inside, positions, -1).max(-1, keepdim=True).values.clamp(min=0)
    # is the first (last) non-empty in-range bin the histogram bin at the edge of the range?
    low_edge = (center.expand_as(inside).gather(-1, first) - lower) < width
    high_edge = (upper - center.expand_as(inside).gather(-1, last)) < width
    p = n_in.clone()
    p.scatter_add_(-1, first, torch.where(low_edge, below, 0.0))
    p.scatter_add_(-1, last, torch.where(high_edge, above, 0.0))
    stray = torch.where(low_edge, 0.0, below) + torch.where(high_edge, 0.0, above)  # [G, C, 1]
    levels = quant_max - quant_min + 1
    cell = (torch.round(center / s) + z).clamp(quant_min, quant_max).sub(quant_min).to(torch.int64)  # [G, C, M]
    cell = cell.expand_as(inside)
    shape = (*inside.shape[:-1], levels)
    mass = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, cell, n_in)
    occupied = torch.zeros(shape, dtype=torch.float64).scatter_add_(-1, cell, inside.to(torch.float64))
    q = torch.where(inside, mass.gather(-1, cell) / occupied.gather(-1, cell).clamp(min=1.0), 0.0)
    p_sum = (p.sum(-1, keepdim=True) + stray).clamp(min=1e-300)
    q_sum = q.sum(-1, keepdim=True).clamp(min=1e-300)
    pn, qn = p / p_sum, q / q_sum
    ratio = torch.where(pn > 0, pn / qn.clamp(min=1e-300), torch.ones_like(pn))
    stray_n = stray / p_sum
    stray_term = torch.where(stray_n > 0, stray_n * torch.log(stray_n.clamp(min=1e-300) * levels / 1e-4), 0.0)
    kl = (pn * torch.log(ratio)).sum(-1) + stray_term.squeeze(-1)
    spans = ((upper - lower) / width).squeeze(-1) >= min_bins_per_level * levels
    valid = spans & inside.any(-1)
    return torch.where(valid, kl, torch.full_like(kl, float("inf")))


def entropy_range(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    *,
    min_bins_per_level: float = 1.0,
    coarse: int = 64,
    fine: int = 32,
    eps: float = EPS,
) -> Range:
    """Clipping range minimising ``KL(P || Q)`` (TensorRT entropy calibration), with the real level count.

    TensorRT fixes 128 target bins (8-bit symmetric); here the quantized distribution ``Q`` has
    ``quant_max - quant_min + 1`` cells, so a 4-bit range is searched for 16 levels. See
    :func:`kl_loss`. The histogram bins next to 0 are left out of ``P`` and ``Q``: they hold ReLU's
    zeros, which every grid represents exactly, and their spike otherwise rewards ranges whose
    zero cell is a single bin (ncnn's calibrator skips zeros for the same reason).
    Ranges narrower than ``min_bins_per_level`` histogram bins per level are not
    considered (the KL of a range that resolves each level by a single bin is meaningless); if no
    candidate qualifies the full range is kept.
    """
    _check_range(quant_min, quant_max)
    coarse, fine = _check_grid(coarse, fine)

    def objective(bins: Bins, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        # an all-inf column keeps alpha = 1: _search resolves ties to the largest ratio
        return kl_loss(bins, scale, zp, quant_min, quant_max, min_bins_per_level)

    return _search(hist, quant_min, quant_max, symmetric, objective, coarse, fine, eps, drop_zero_bins=True)
