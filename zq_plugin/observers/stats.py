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
from dataclasses import dataclass
from functools import lru_cache

import torch

from zq_plugin.errors import ConfigError
from zq_plugin.observers.histogram import Bins, Histogram, nonempty_bins
from zq_plugin.qparams import EPS, _check_range, compute_qparams

Range = tuple[torch.Tensor, torch.Tensor]
DISTRIBUTIONS = ("laplace", "gaussian")
_CHUNK = 1 << 16  # elements of a [G, C, M] float64 temporary: small enough to stay in cache
_MOMENT_CHUNK = 1 << 19  # elements of a [G, C, S] temporary of the prefix-sum Lp error (few ops per element)


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


Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ChunkObjective = Callable[[slice, torch.Tensor, torch.Tensor], torch.Tensor]


def _pick(alpha: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """The largest ``alpha`` (``[G, C]``) whose loss is within a relative ``1e-9`` of the column minimum.

    The tolerance absorbs float summation-order differences (a per-channel histogram is padded
    to a common length; the Lp error has an exact and a prefix-sum evaluation), so that
    per-channel and per-tensor searches agree exactly.
    """
    best = loss.min(0, keepdim=True).values
    near = loss <= best + 1e-9 * best.abs() + 1e-300
    return torch.where(near, alpha, torch.zeros_like(alpha)).max(0).values


def _chunked(
    fn: ChunkObjective, per_channel: int, scale: torch.Tensor, zero_point: torch.Tensor, chunk: int = _CHUNK
) -> torch.Tensor:
    """``fn(channel_slice, scale[:, slice], zero_point[:, slice])`` over chunks of channels, concatenated.

    ``per_channel`` is the size of one channel's temporaries per candidate; a chunk keeps
    ``G x channels x per_channel`` near ``chunk`` elements.
    """
    channels = scale.shape[1]
    step = max(1, chunk // max(1, scale.shape[0] * per_channel))
    if step >= channels:
        return fn(slice(0, channels), scale, zero_point)
    parts = [
        fn(slice(c0, c0 + step), scale[:, c0 : c0 + step], zero_point[:, c0 : c0 + step])
        for c0 in range(0, channels, step)
    ]
    return torch.cat(parts, dim=1)


def _bins_objective(bins: Bins, loss: Callable[[Bins, torch.Tensor, torch.Tensor], torch.Tensor]) -> Objective:
    """An :data:`Objective` over all channels from a per-bin ``loss(bins, scale, zp)``, chunked over channels."""

    def objective(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        def part(sl: slice, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            sub = Bins(left=bins.left[sl], right=bins.right[sl], count=bins.count[sl], width=bins.width[sl])
            return loss(sub, s, z)

        return _chunked(part, bins.count.shape[1], scale, zp)

    return objective


def _subset(hist: Histogram, idx: torch.Tensor) -> Histogram:
    """The channels ``idx`` of ``hist``."""
    return Histogram(
        counts=hist.counts[idx], exponent=hist.exponent[idx], min_val=hist.min_val[idx], max_val=hist.max_val[idx]
    )


def _combine(parts: list[tuple[torch.Tensor, Objective]], channels: int) -> Objective:
    """One :data:`Objective` over ``channels`` from objectives over disjoint channel subsets ``(idx, fn)``."""

    def objective(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        if len(parts) == 1 and parts[0][0].numel() == channels:
            return parts[0][1](scale, zp)
        out = torch.empty_like(scale)
        for idx, fn in parts:
            out[:, idx] = fn(scale[:, idx], zp[:, idx])
        return out

    return objective


def _candidate_qparams(
    lo: torch.Tensor, hi: torch.Tensor, quant_min: int, quant_max: int, symmetric: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`compute_qparams` of float32 ``(lo, hi)`` with a float64 scale that stays finite for every float32 range.

    A range wider than float32's largest number (``hi - lo`` overflows, e.g. ``[finfo.min, finfo.max]``)
    is computed on ``(lo / 2, hi / 2)`` with ``eps / 2`` and its scale doubled in float64: halving
    and doubling are exact, so this is the same arithmetic, without the overflow.

    Example:
        >>> import torch
        >>> big = torch.finfo(torch.float32).max
        >>> scale, zp = _candidate_qparams(torch.tensor([-big]), torch.tensor([big]), 0, 255, False, 1e-7)
        >>> bool(torch.isfinite(scale).all()), int(zp)
        (True, 128)
    """
    scale, zp = compute_qparams(lo, hi, quant_min, quant_max, symmetric, eps)
    scale = scale.to(torch.float64)
    wide = ~torch.isfinite(scale)
    if bool(wide.any()):
        half_scale, half_zp = compute_qparams(lo * 0.5, hi * 0.5, quant_min, quant_max, symmetric, eps * 0.5)
        scale = torch.where(wide, 2.0 * half_scale.to(torch.float64), scale)
        zp = torch.where(wide, half_zp, zp)
    return scale, zp


def _search(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    objective: Objective,
    coarse: int,
    fine: int,
    eps: float,
    keep_min: bool = False,
) -> Range:
    """Minimise ``objective`` over ratios ``alpha``; see the module docstring.

    ``keep_min``: the low end stays at the observed minimum and only ``alpha max`` is searched
    (for the negative lobe of Hardswish, SiLU or GELU, see :attr:`RangeObserverMixin.keep_min`).

    ``objective(scale, zero_point)`` gets ``[G, C]`` float64 candidate qparams for all ``C``
    channels and returns a ``[G, C]`` loss. The caller has checked that some channel is non-empty.
    """
    mn = hist.min_val.to(torch.float64).nan_to_num(0.0, 0.0, 0.0)  # [C]; empty channels -> 0
    mx = hist.max_val.to(torch.float64).nan_to_num(0.0, 0.0, 0.0)
    mn, mx = torch.where(hist.empty, 0.0, mn), torch.where(hist.empty, 0.0, mx)

    def evaluate(alpha: torch.Tensor) -> torch.Tensor:  # alpha [G, C] -> loss [G, C]
        lo, hi = (mn.expand_as(alpha) if keep_min else alpha * mn), alpha * mx
        scale, zp = _candidate_qparams(lo.to(torch.float32), hi.to(torch.float32), quant_min, quant_max, symmetric, eps)
        return objective(scale, zp.to(torch.float64))

    channels = mn.shape[0]
    alpha1 = torch.arange(coarse, 0, -1, dtype=torch.float64).div(coarse).unsqueeze(1).expand(coarse, channels)
    loss1 = evaluate(alpha1)  # [G, C]
    best1 = _pick(alpha1, loss1).unsqueeze(0)  # [1, C]
    best1_loss = loss1.gather(0, (alpha1 == best1).to(torch.int64).argmax(0, keepdim=True))  # [1, C]
    offsets = torch.linspace(1.0, -1.0, fine + 2, dtype=torch.float64)[1:-1].unsqueeze(1) / coarse  # [F, 1]
    alpha2 = (best1 + offsets).clamp(1.0 / (coarse * fine + 1), 1.0)  # [F, C]
    chosen = _pick(torch.cat([best1, alpha2]), torch.cat([best1_loss, evaluate(alpha2)]))  # [C]
    return _finish(hist, mn if keep_min else chosen * mn, chosen * mx)


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


FAST_P_MAX = 4  # integer exponents up to this use the prefix-sum evaluation
_EXACT = 1 << 53  # float64 holds every integer below this exactly
_FAST_RATIO = 6  # prefix sums when a channel has this many non-empty bins per grid piece (cost ratio)


@dataclass(frozen=True, kw_only=True)
class BinMoments:
    """Prefix sums of integer bin moments: what :func:`lp_error_moments` needs of ``C`` histograms.

    In bin units ``u = v / w`` the interior bins (all but each channel's first and last non-empty
    bin, which :func:`nonempty_bins` clips to the exact min/max) are the unit intervals
    ``[k, k + 1)``, ``k = -B .. B - 1``, holding ``n_k`` values each. ``prefix[l, c, j]`` is
    ``sum_{k < j - B} n_k k^l`` over those bins: an integer, held exactly in float64 (see
    :func:`moment_fits`). The two edge bins keep their clipped edges and go through :func:`lp_error`.

    Attributes:
        prefix: ``[p + 1, C, 2B + 1]`` float64 prefix sums of ``n_k k^l``, ``l = 0..p``.
        counts: ``[C, 2B]`` float64 interior counts (edge bins zeroed).
        edges: ``[C, 2]`` the first and last non-empty bin (the second has count 0 when they coincide).
        width: ``[C]`` float64 bin width ``w``.
    """

    prefix: torch.Tensor
    counts: torch.Tensor
    edges: Bins
    width: torch.Tensor

    @property
    def half(self) -> int:
        """``B``: bins ``k`` run from ``-B`` to ``B - 1``."""
        return int(self.counts.shape[1]) // 2

    def select(self, sl: slice) -> BinMoments:
        """The moments of channels ``sl``."""
        e = self.edges
        return BinMoments(
            prefix=self.prefix[:, sl],
            counts=self.counts[sl],
            edges=Bins(left=e.left[sl], right=e.right[sl], count=e.count[sl], width=e.width[sl]),
            width=self.width[sl],
        )


def _integer_p(p: float) -> int | None:
    """``p`` as an int when the prefix-sum evaluation applies (a whole number from 1 to ``FAST_P_MAX``)."""
    return int(p) if float(p).is_integer() and 1 <= p <= FAST_P_MAX else None


def moment_fits(count: torch.Tensor, half: int, p: int) -> torch.Tensor:
    """``[C]`` bool: a channel of ``count`` values keeps every integer of :func:`lp_error_moments` exact.

    Every integer intermediate (prefix sums, their shifts to ``r``) is bounded by
    ``count (4B)^p 2^(p+2)``, which must stay below ``2^53`` (exact in float64).
    """
    limit = _EXACT // ((4 * half) ** p * 2 ** (p + 2))
    return count <= limit


def bin_moments(hist: Histogram, p: int) -> BinMoments:
    """The :class:`BinMoments` of ``hist`` up to order ``p`` (check :func:`moment_fits` first)."""
    counts = hist.counts
    size = counts.shape[1]
    half = size // 2
    pos = torch.arange(size, device=counts.device)
    nonzero = counts > 0
    first = torch.where(nonzero, pos, size).min(1).values.clamp(max=size - 1)  # [C]
    last = torch.where(nonzero, pos, -1).max(1).values.clamp(min=0)
    idx = torch.stack([first, last], 1)  # [C, 2]
    edge_count = counts.gather(1, idx).to(torch.float64)
    edge_count[:, 1] = torch.where(first == last, 0.0, edge_count[:, 1])
    interior = counts.scatter(1, idx, 0)
    k = pos - half
    powers = torch.stack([k.to(torch.float64) ** order for order in range(p + 1)]).unsqueeze(1)  # [p + 1, 1, 2B]
    moments = interior.to(torch.float64).unsqueeze(0) * powers  # integers, summed exactly (see moment_fits)
    prefix = torch.nn.functional.pad(moments.cumsum(2), (1, 0))  # [p + 1, C, 2B + 1]
    width = hist.bin_width
    raw = (idx - half).to(torch.float64) * width.unsqueeze(1)
    lo = hist.min_val.to(torch.float64).unsqueeze(1)
    hi = hist.max_val.to(torch.float64).unsqueeze(1)
    left = torch.minimum(torch.maximum(raw, lo), hi)
    right = torch.minimum(torch.maximum(raw + width.unsqueeze(1), lo), hi)
    used = edge_count > 0  # empty channels: finite edges, no mass
    edges = Bins(left=torch.where(used, left, 0.0), right=torch.where(used, right, 0.0), count=edge_count, width=width)
    return BinMoments(prefix=prefix, counts=interior.to(torch.float64), edges=edges, width=width)


def _segments(
    su: torch.Tensor, z: torch.Tensor, quant_min: int, quant_max: int, half: int, split: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pieces of the bin axis on which ``Q`` is constant: ``(t0, t1, q)``, each ``[G, C, S]``, in bin units.

    Level ``i`` takes ``[q_i - s/2, q_i + s/2]`` (the first and last level also the clipped
    tails), clipped to the histogram's span ``[-B, B]``; ``split`` cuts each piece at ``q_i`` so
    that ``u - q`` keeps one sign on it (needed for odd ``p``).
    """
    levels = quant_max - quant_min + 1
    i = torch.arange(levels, dtype=torch.float64, device=su.device)
    q = (quant_min - z).unsqueeze(-1).add(i).mul(su.unsqueeze(-1))  # [G, C, L]
    mid = (q[..., 1:] - 0.5 * su.unsqueeze(-1)).clamp(-half, half)
    lo_end = torch.full_like(q[..., :1], -float(half))
    t0 = torch.cat([lo_end, mid], -1)
    t1 = torch.cat([mid, -lo_end], -1)
    if split:
        qc = torch.minimum(torch.maximum(q.clamp(-half, half), t0), t1)
        t0, t1 = torch.stack([t0, qc], -1).flatten(-2), torch.stack([qc, t1], -1).flatten(-2)
        q = q.repeat_interleave(2, -1)
    return t0, t1, q


def lp_error_moments(
    moments: BinMoments,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    p: int,
) -> torch.Tensor:
    """:func:`lp_error` for a whole-number ``p`` from prefix sums: ``O(levels)`` per candidate, not ``O(bins)``.

    The same quantity as :func:`lp_error` (values spread uniformly in each bin), up to float
    rounding. On each piece ``[t0, t1]`` of the bin axis where ``Q = q`` (see :func:`_segments`),

        int_{t0}^{t1} rho(u) |u - q|^p du = the partial first and last bins (closed form)
                                             + sum_{whole bins k} n_k int_k^{k+1} |u - q|^p du,

    and the whole-bin sum expands around the integer ``r = round(q)``, ``delta = r - q``:
    ``sum_i D_i g_i(delta)`` with the central sums ``D_i = sum_k n_k (k - r)^i`` and ``g_i`` the
    coefficients of ``int_0^1 (x + t + delta)^p dt`` in ``x = k - r``. The ``D_i`` are integer
    combinations of the prefix sums, computed exactly (no cancellation against the large raw
    moments); only the final sum, whose terms are of the size of the result, rounds.
    Multiplied by ``w^p`` for the value scale, plus the two edge bins by :func:`lp_error`.

    Args:
        moments: from :func:`bin_moments` with order ``>= p``.
        scale: ``[G, C]`` candidate scales.
        zero_point: ``[G, C]`` candidate zero points.
        quant_min: lowest code.
        quant_max: highest code.
        p: whole-number exponent, 1 to ``FAST_P_MAX``.

    Returns:
        ``[G, C]`` float64 errors.

    Example:
        >>> import torch
        >>> from zq_plugin.observers.histogram import nonempty_bins, observe
        >>> h = observe(None, torch.randn(3, 500), ch_axis=0)
        >>> s, z = torch.full((1, 3), 0.4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
        >>> fast = lp_error_moments(bin_moments(h, 2), s, z, -7, 7, 2)
        >>> bool(torch.allclose(fast, lp_error(nonempty_bins(h), s, z, -7, 7, 2.0), rtol=1e-12))
        True
    """
    half = moments.half
    s = scale.to(torch.float64).T  # [C, G]: channel-major, so that gathers run along rows
    z = zero_point.to(torch.float64).T
    su = s / moments.width.unsqueeze(1)  # exact: the width is a power of two
    t0, t1, q = _segments(su, z, quant_min, quant_max, half, split=p % 2 == 1)  # [C, G, S]
    shape = t0.shape
    k_lo = t0.floor().clamp(-half, half - 1)
    k_hi = t1.floor().clamp(-half, half - 1)
    i_lo = (k_lo.to(torch.int64) + half).view(shape[0], -1)
    i_hi = (k_hi.to(torch.int64) + half).view(shape[0], -1)

    def at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return table.gather(1, index).view(shape)

    def antider(x: torch.Tensor) -> torch.Tensor:  # d/dx = |x|^p
        return torch.sign(x) * x.abs().pow(p + 1) * (1.0 / (p + 1))

    two = k_hi > k_lo
    partial = at(moments.counts, i_lo) * (antider(torch.minimum(k_lo + 1, t1) - q) - antider(t0 - q))
    partial = partial + torch.where(two, at(moments.counts, i_hi) * (antider(t1 - q) - antider(k_hi - q)), 0.0)
    # whole bins k_lo + 1 .. k_hi - 1: prefix at k_hi minus prefix at k_lo + 1 (exact integers)
    sums = [at(moments.prefix[j], i_hi) - at(moments.prefix[j], i_lo + 1) for j in range(p + 1)]
    r = torch.round(q).clamp(-half, half)
    delta = r - q
    neg_r = [torch.ones_like(r), -r]  # (-r)^i
    for _ in range(p - 1):
        neg_r.append(neg_r[-1] * -r)

    def term(coef: int, power: int, j: int) -> torch.Tensor:
        value = sums[j] if power == 0 else neg_r[power] * sums[j]
        return value if coef == 1 else coef * value

    # D_i = sum_k n_k (k - r)^i (exact); int_k^{k+1} (u - q)^p du = sum_i (k - r)^i g_i(delta)
    whole = torch.zeros_like(delta)
    for i in range(p + 1):
        central = sum(term(math.comb(i, j), i - j, j) for j in range(i + 1))
        g = torch.full_like(delta, 1.0 / (p + 1) * math.comb(p + 1, i))  # C(p+1, i) / (p+1) sum_b C(p+1-i, b) delta^b
        power = None
        for b in range(1, p + 1 - i):
            power = delta if power is None else power * delta
            g = g + (math.comb(p + 1, i) * math.comb(p + 1 - i, b) / (p + 1)) * power
        whole = whole + g * central
    whole = torch.where(two, whole, 0.0)
    if p % 2 == 1:  # on a piece left of q, |u - q|^p = -(u - q)^p
        whole = torch.where(t1 <= q, -whole, whole)
    inner = (partial + whole).sum(-1) * moments.width.pow(p).unsqueeze(1)  # [C, G]
    return inner.T + lp_error(moments.edges, s.T, z.T, quant_min, quant_max, float(p))


def _unit_scaled(hist: Histogram) -> tuple[Histogram, torch.Tensor]:
    """``hist`` with every value divided by ``2^e_c``, so that ``|v| < 1``, and those units ``2^e_c`` (``[C]`` float64).

    Dividing by a power of two is exact, and the Lp error of data and grid scaled together by
    ``c`` is ``c^p`` times the original, so every candidate keeps its rank; the powers ``|v - Q(v)|^p``
    then stay finite for any ``p`` and any float32 magnitude (``finfo.max^3`` is finite in float64,
    ``finfo.max^9`` is not).
    """
    exponent = torch.where(hist.empty, 0, hist.exponent)
    unit = torch.pow(2.0, exponent.to(torch.float64))
    scaled = Histogram(
        counts=hist.counts,
        exponent=torch.zeros_like(exponent),
        min_val=hist.min_val.to(torch.float64) / unit,
        max_val=hist.max_val.to(torch.float64) / unit,
    )
    return scaled, unit


def _lp_objective(hist: Histogram, quant_min: int, quant_max: int, p: float, fast: bool) -> Objective:
    """The Lp error of every channel of ``hist``: by prefix sums where :func:`lp_error_moments` applies.

    A channel takes the prefix-sum route when ``p`` is a whole number up to ``FAST_P_MAX``, its
    int64 sums cannot overflow, and it has at least as many non-empty bins as the grid has
    pieces (otherwise the direct sum over its bins is cheaper); the choice depends on the
    channel's own data only, so a per-channel search and a per-tensor search of the slice agree.
    The error is computed in units of ``2^e_c`` (:func:`_unit_scaled`), which ranks the candidates
    as the error in the data's units does.
    """
    hist, unit = _unit_scaled(hist)
    whole_p = _integer_p(p) if fast else None
    channels, size = hist.counts.shape
    use = torch.zeros(channels, dtype=torch.bool)
    pieces = 0
    if whole_p is not None:
        pieces = (quant_max - quant_min + 1) * (2 if whole_p % 2 else 1)
        occupied = (hist.counts > 0).sum(1)
        use = moment_fits(hist.counts.sum(1), size // 2, whole_p) & (occupied >= _FAST_RATIO * pieces) & ~hist.empty
    fast_idx, slow_idx = use.nonzero().squeeze(1), (~use).nonzero().squeeze(1)
    parts: list[tuple[torch.Tensor, Objective]] = []
    if fast_idx.numel():
        moments = bin_moments(_subset(hist, fast_idx), whole_p or 0)

        def by_moments(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
            def part(sl: slice, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                return lp_error_moments(moments.select(sl), s, z, quant_min, quant_max, whole_p or 0)

            return _chunked(part, pieces, scale, zp, chunk=_MOMENT_CHUNK)

        parts.append((fast_idx, by_moments))
    if slow_idx.numel():
        bins = nonempty_bins(_subset(hist, slow_idx))
        parts.append((slow_idx, _bins_objective(bins, lambda b, s, z: lp_error(b, s, z, quant_min, quant_max, p))))
    combined = _combine(parts, channels)

    def objective(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return combined(scale / unit, zp)

    return objective


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
    keep_min: bool = False,
) -> Range:
    """Clipping range minimising the Lp quantization error ``E |x - Q(x)|^p`` (MSE for ``p = 2``).

    ``alpha* = argmin_alpha sum_bins lp_error(Q_alpha)`` with ``Q_alpha`` the quantizer of
    ``(alpha min, alpha max)``; see :func:`lp_error`. ``p = 2.4`` is the choice of BRECQ and Genie.
    For a whole-number ``p`` (MSE) the error is evaluated from prefix sums of bin moments
    (:func:`lp_error_moments`, the same value up to float rounding), which costs ``O(levels)``
    instead of ``O(bins)`` per candidate. ``keep_min=True`` fixes the low end at the observed
    minimum and searches ``alpha max`` alone.

    Example:
        >>> import torch
        >>> from zq_plugin.observers.histogram import observe
        >>> lo, hi = lp_range(observe(None, torch.randn(4, 1000), ch_axis=0), -7, 7, symmetric=True)
        >>> hi.shape, bool((hi < 4).all())
        (torch.Size([4]), True)
    """
    return _lp_search(
        hist, quant_min, quant_max, symmetric, p=p, coarse=coarse, fine=fine, eps=eps, fast=True, keep_min=keep_min
    )


def _lp_search(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    *,
    p: float,
    coarse: int,
    fine: int,
    eps: float,
    fast: bool,
    keep_min: bool = False,
) -> Range:
    """:func:`lp_range`; ``fast=False`` evaluates every candidate with the direct :func:`lp_error` (the reference)."""
    p = check_p(p)
    coarse, fine = _check_grid(coarse, fine)
    _check_range(quant_min, quant_max)
    if bool(hist.empty.all()):
        return _empty_range(hist)
    objective = _lp_objective(hist, quant_min, quant_max, p, fast)
    return _search(hist, quant_min, quant_max, symmetric, objective, coarse, fine, eps, keep_min)


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

    The optimum lies below ``2 ln(levels) + 3`` (Laplace; the Gaussian's is smaller), so the
    candidates run up to 60, or to ``2 ln(levels) + 10`` for grids of more than about 2^36
    levels: the search costs the same at every bit width.

    Example:
        >>> round(aciq_alpha("laplace", 16, True), 2), round(aciq_alpha("gaussian", 16, True), 2)
        (4.92, 2.52)
    """
    top = max(60.0, 2.0 * math.log(levels) + 10.0)
    c = torch.linspace(1e-3, top, 60_000, dtype=torch.float64)
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
    if levels > cell.shape[-1]:
        # more levels than bins (16- and 32-bit grids): number the occupied cells in order instead. The
        # non-empty bins come first, in position order, so their cells never decrease and consecutive
        # equal cells are one cell; the padding after them holds nothing. Same sums, O(bins) memory.
        step = torch.ones_like(cell, dtype=torch.bool)
        step[..., 1:] = cell[..., 1:] != cell[..., :-1]
        cell = step.cumsum(-1) - 1
    shape = (*inside.shape[:-1], min(levels, cell.shape[-1]))
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


_KL_FAST_RATIO = 4  # KL by prefix sums when a channel has this many non-empty bins per level (cost ratio)


@dataclass(frozen=True, kw_only=True)
class KLSums:
    """Prefix sums over ``C`` channels' non-empty bins: what :func:`kl_loss_sums` needs.

    The bins are those :func:`kl_loss` takes (:func:`nonempty_bins` with ``drop_zero_bins=True``),
    in position order, so their centres increase; ``j = 0 .. M - 1`` indexes them. Every prefix
    table has ``M + 1`` columns, column ``j`` summing the bins before ``j``.

    Attributes:
        center: ``[C, M + 2]`` float64 ``Bins.center`` of bin ``j`` in column ``j + 1``; ``-inf``
            in column 0, ``+inf`` in padding and the last column (sentinels of the threshold search).
        count: ``[C, M + 1]`` float64 counts ``n_j`` (0 in padding and the last column).
        prefix: ``[C, M + 1]`` float64 ``sum n_j`` (integers, exact).
        prefix_sq: ``[C, M + 1]`` float64 ``sum n_j^2`` (integers below ``2^52``, exact: see :func:`kl_fits`).
        prefix_nlogn: ``[C, M + 1]`` float64 ``sum n_j log n_j``, rounded ...
        prefix_nlogn_err: ``[C, M + 1]`` ... and its rounding error (a compensated sum), so that a
            difference of two columns is accurate to its own size, not to the channel total's.
        width: ``[C]`` float64 bin width.
    """

    center: torch.Tensor
    count: torch.Tensor
    prefix: torch.Tensor
    prefix_sq: torch.Tensor
    prefix_nlogn: torch.Tensor
    prefix_nlogn_err: torch.Tensor
    width: torch.Tensor

    def select(self, sl: slice) -> KLSums:
        """The sums of channels ``sl``."""
        return KLSums(
            center=self.center[sl],
            count=self.count[sl],
            prefix=self.prefix[sl],
            prefix_sq=self.prefix_sq[sl],
            prefix_nlogn=self.prefix_nlogn[sl],
            prefix_nlogn_err=self.prefix_nlogn_err[sl],
            width=self.width[sl],
        )


def kl_fits(counts: torch.Tensor) -> torch.Tensor:
    """``[C]`` bool: the integer sums of :class:`KLSums` stay below ``2^52`` (exact in float64).

    ``sum n^2`` is the largest (at least ``sum n``; the products of :func:`kl_loss_sums`'s
    equal-counts test are at most it).

    Args:
        counts: ``[C, 2B]`` int64 counts of the bins :func:`kl_loss` scores (the two bins at 0 zeroed).
    """
    return (counts.to(torch.float64) ** 2).sum(1) < 2.0**52


def kl_sums(bins: Bins) -> KLSums:
    """The :class:`KLSums` of ``bins`` (from ``nonempty_bins(hist, drop_zero_bins=True)``; see :func:`kl_fits`)."""
    n = bins.count
    channels = n.shape[0]
    inf = torch.full((channels, 1), float("inf"), dtype=torch.float64, device=n.device)
    zero = torch.zeros((channels, 1), dtype=torch.float64, device=n.device)
    center = torch.cat([-inf, torch.where(n > 0, bins.center, float("inf")), inf], 1)
    x = torch.xlogy(n, n)
    hi = x.cumsum(1)
    prev = torch.cat([zero, hi[:, :-1]], 1)
    t = prev + x  # two-sum: prev + x = t + err exactly
    bv = t - prev
    err = (prev - (t - bv)) + (x - bv)
    err = err + (t - hi)  # exact (Sterbenz): the cumulative sum hi is within a few ulps of t
    return KLSums(
        center=center,
        count=torch.cat([n, zero], 1),
        prefix=torch.nn.functional.pad(n.cumsum(1), (1, 0)),
        prefix_sq=torch.nn.functional.pad((n * n).cumsum(1), (1, 0)),
        prefix_nlogn=torch.cat([zero, hi], 1),
        prefix_nlogn_err=torch.cat([zero, err.cumsum(1)], 1),
        width=bins.width,
    )


def kl_loss_sums(
    sums: KLSums,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    min_bins_per_level: float,
) -> torch.Tensor:
    """:func:`kl_loss` from prefix sums: ``O(levels log bins)`` per candidate instead of ``O(bins)``.

    The same quantity as :func:`kl_loss`, up to float rounding. Each bin lies wholly in one cell
    (the cell of its centre), and the centres increase with the bin index, so the in-range bins
    are an index interval ``[j_L, j_U)`` and each cell ``c`` an interval ``[b_c, b_(c+1))`` of it.
    The thresholds come from a binary search on the centres, then a check of the exact rounding
    rule of :func:`kl_loss` (``round(centre / s) + z``, ties to even) on the two bins around each,
    so that every bin lands in the cell :func:`kl_loss` gives it. With the cell's mass ``M_c`` and
    number of non-empty bins ``k_c`` (differences of prefix sums), ``q_b = M_c / k_c`` and

        sum_b p_b log(p_b / q_b) = sum_c D_c + sum_(e = first, last bin) (p_e log p_e - n_e log n_e - a_e log q_e),
        D_c = sum_(b in c) n_b log n_b - M_c log(M_c / k_c)   (>= 0; exactly 0 when the counts are equal),

    where only the first and last in-range bins take the clipped masses ``a_e`` (when they sit at
    the range's edge) into ``P``. Normalising ``P`` by the total count ``N`` and ``Q`` by the
    in-range count ``N_in`` adds ``(|P| / N) log(N_in / N)``; the stray mass term and the validity
    rule are those of :func:`kl_loss`. A cell of equal counts (``k_c sum n^2 = M_c^2``, exact
    integers) gets ``D_c = 0`` exactly, so a candidate that :func:`kl_loss` scores exactly 0 (no
    clipping, every cell uniform) scores 0 here too and ties resolve alike.

    Args:
        sums: from :func:`kl_sums`.
        scale: ``[G, C]`` candidate scales.
        zero_point: ``[G, C]`` candidate zero points.
        quant_min: lowest code.
        quant_max: highest code.
        min_bins_per_level: as in :func:`kl_loss`.

    Returns:
        ``[G, C]`` float64 losses (``+inf`` exactly where :func:`kl_loss` gives ``+inf``).

    Example:
        >>> import torch
        >>> from zq_plugin.observers.histogram import nonempty_bins, observe
        >>> bins = nonempty_bins(observe(None, torch.randn(3, 5000), ch_axis=0), drop_zero_bins=True)
        >>> s, z = torch.full((1, 3), 0.4, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
        >>> fast = kl_loss_sums(kl_sums(bins), s, z, -7, 7, 1.0)
        >>> bool(torch.allclose(fast, kl_loss(bins, s, z, -7, 7, 1.0), rtol=1e-10))
        True
    """
    levels = quant_max - quant_min + 1
    s = scale.to(torch.float64).T.unsqueeze(-1)  # [C, G, 1]: channel-major, so that searches run along rows
    z = zero_point.to(torch.float64).T.unsqueeze(-1)
    channels = s.shape[0]
    lower, upper = (quant_min - z) * s, (quant_max - z) * s  # [C, G, 1], as in kl_loss
    centers = sums.center[:, 1:].contiguous()  # [C, M + 1], increasing, then +inf

    def search(values: torch.Tensor, right: bool = False) -> torch.Tensor:  # [C, G, K] -> [C, G, K] int64
        return torch.searchsorted(centers, values.reshape(channels, -1).contiguous(), right=right).view(values.shape)

    def at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return table.gather(1, index.reshape(channels, -1)).view(index.shape)

    j_lo = search(lower)  # the first bin with centre >= lower
    j_hi = search(upper, right=True)  # the first bin with centre > upper
    # cell boundaries: t_i = the first bin with round(centre / s) + z >= quant_min + i, i = 1 .. levels - 1
    code = quant_min + torch.arange(1, levels, dtype=torch.float64, device=s.device)  # [L - 1]
    guess = search((code - z - 0.5) * s)  # [C, G, L - 1]

    def lower_cell(column: torch.Tensor) -> torch.Tensor:  # 1 where the bin in centre column `column` is below
        return (torch.round(at(sums.center, column) / s) + z < code).to(torch.int64)

    # the rounding rule and the estimate differ only within a few ulps, where at most one bin lies:
    # t_i is guess - 1, guess or guess + 1 (bins guess - 1 and guess are in centre columns guess, guess + 1)
    bounds = guess - 1 + lower_cell(guess) + lower_cell(guess + 1)
    b = torch.cat([j_lo, torch.minimum(torch.maximum(bounds, j_lo), j_hi), j_hi], -1)  # [C, G, L + 1]

    def diff(table: torch.Tensor) -> torch.Tensor:  # per-cell sums [C, G, L]
        v = at(table, b)
        return v[..., 1:] - v[..., :-1]

    mass, square = diff(sums.prefix), diff(sums.prefix_sq)  # integers below 2^52: exact
    occupied = (b[..., 1:] - b[..., :-1]).to(torch.float64)
    mean = mass / occupied.clamp(min=1.0)  # the cell's q; an integer exactly when k divides M (n < 2^26)
    # equal counts in a cell: M = k n and sum n^2 = M n (by Cauchy-Schwarz M^2 <= k sum n^2, so M n <= 2^52)
    uniform = (mean == mean.floor()) & (mass * mean == square)  # empty cells too
    n_log_n = diff(sums.prefix_nlogn) + diff(sums.prefix_nlogn_err)
    log_q = torch.where(occupied > 0, torch.log(mean.clamp(min=1e-300)), 0.0)
    divergence = torch.where(uniform, 0.0, n_log_n - mass * log_q).sum(-1)  # sum_c D_c, [C, G]

    j_lo, j_hi = j_lo.squeeze(-1), j_hi.squeeze(-1)  # [C, G]
    lower, upper = lower.squeeze(-1), upper.squeeze(-1)
    first, last = j_lo, (j_hi - 1).clamp(min=0)
    single = first == last
    total = sums.prefix[:, -1:]  # [C, 1]
    below = at(sums.prefix, j_lo)
    inside = at(sums.prefix, j_hi) - below
    above = total - below - inside
    width = sums.width.unsqueeze(1)
    add_lo = torch.where((at(sums.center, first + 1) - lower) < width, below, 0.0)  # the edge rule of kl_loss
    add_hi = torch.where((upper - at(sums.center, last + 1)) < width, above, 0.0)
    inner = b[..., 1:-1]

    def cell_of(j: torch.Tensor) -> torch.Tensor:  # [C, G, 1]: the cell of in-range bin j
        return (inner <= j.unsqueeze(-1)).sum(-1, keepdim=True)

    cell_first, cell_last = cell_of(first), cell_of(last)
    n_first, n_last = at(sums.count, first), at(sums.count, last)
    n_last = torch.where(single, 0.0, n_last)  # the last bin counts once, as the first, when they coincide

    def own(n: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:  # n log(n / q) of an edge bin
        return n * (torch.log(n.clamp(min=1e-300)) - log_q.gather(-1, cell).squeeze(-1))

    # the bins between the first and the last: sum_c D_c less the edge bins' own terms
    interior = divergence - own(n_first, cell_first) - own(n_last, cell_last)
    n_interior = inside - n_first - n_last
    p_sum = total.clamp(min=1e-300)
    q_sum = inside.clamp(min=1e-300)
    kl = torch.where(n_interior > 0, interior / p_sum + n_interior / p_sum * torch.log(q_sum / p_sum), 0.0)

    def edge(n: torch.Tensor, added: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        # pn log(pn / qn) of an edge bin, with the operations of kl_loss (ties to kl_loss's zeros)
        pn, qn = (n + added) / p_sum, mean.gather(-1, cell).squeeze(-1) / q_sum  # the cell's q: as kl_loss's
        ratio = torch.where(pn > 0, pn / qn.clamp(min=1e-300), 1.0)
        return pn * torch.log(ratio)

    kl = kl + edge(n_first, add_lo + torch.where(single, add_hi, 0.0), cell_first)
    kl = kl + torch.where(single, 0.0, edge(n_last, add_hi, cell_last))
    stray_n = (total - inside - add_lo - add_hi) / p_sum
    kl = kl + torch.where(stray_n > 0, stray_n * torch.log(stray_n.clamp(min=1e-300) * levels / 1e-4), 0.0)
    valid = ((upper - lower) / width >= min_bins_per_level * levels) & (j_hi > j_lo)
    return torch.where(valid, kl, torch.full_like(kl, float("inf"))).T


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
    candidate qualifies the full range is kept. A channel with enough non-empty bins per level is
    scored from prefix sums (:func:`kl_loss_sums`, the same value up to float rounding, ``O(levels
    log bins)`` instead of ``O(bins)`` per candidate); the picked ranges are those of :func:`kl_loss`.
    """
    return _entropy_search(
        hist,
        quant_min,
        quant_max,
        symmetric,
        min_bins_per_level=min_bins_per_level,
        coarse=coarse,
        fine=fine,
        eps=eps,
        fast=True,
    )


def _entropy_search(
    hist: Histogram,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    *,
    min_bins_per_level: float,
    coarse: int,
    fine: int,
    eps: float,
    fast: bool,
) -> Range:
    """:func:`entropy_range`; ``fast=False`` scores every candidate with the direct :func:`kl_loss` (the reference)."""
    _check_range(quant_min, quant_max)
    coarse, fine = _check_grid(coarse, fine)
    if bool(hist.empty.all()):
        return _empty_range(hist)
    objective = _kl_objective(hist, quant_min, quant_max, min_bins_per_level, fast)
    # an all-inf column keeps alpha = 1: _search resolves ties to the largest ratio
    return _search(hist, quant_min, quant_max, symmetric, objective, coarse, fine, eps)


def _kl_objective(hist: Histogram, quant_min: int, quant_max: int, min_bins_per_level: float, fast: bool) -> Objective:
    """The KL loss of every channel of ``hist``: by prefix sums (:func:`kl_loss_sums`) where that is cheaper.

    A channel takes the prefix-sum route when it has at least ``_KL_FAST_RATIO`` non-empty bins
    (outside the two bins at 0) per level and its integer sums are exact (:func:`kl_fits`);
    otherwise the direct sum over its bins is as cheap. The choice depends on the channel's own
    data only, so a per-channel search and a per-tensor search of the slice agree.
    """
    channels, size = hist.counts.shape
    levels = quant_max - quant_min + 1
    use = torch.zeros(channels, dtype=torch.bool, device=hist.counts.device)
    if fast:
        kept = hist.counts.clone()  # the bins kl_loss scores: all but the two at 0
        kept[:, size // 2 - 1 : size // 2 + 1] = 0
        use = ((kept > 0).sum(1) >= _KL_FAST_RATIO * levels) & kl_fits(kept) & ~hist.empty
    fast_idx, slow_idx = use.nonzero().squeeze(1), (~use).nonzero().squeeze(1)
    parts: list[tuple[torch.Tensor, Objective]] = []
    if fast_idx.numel():
        sums = kl_sums(nonempty_bins(_subset(hist, fast_idx), drop_zero_bins=True))

        def by_sums(scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
            def part(sl: slice, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                return kl_loss_sums(sums.select(sl), s, z, quant_min, quant_max, min_bins_per_level)

            return _chunked(part, levels + 1, scale, zp, chunk=_MOMENT_CHUNK)

        parts.append((fast_idx, by_sums))
    if slow_idx.numel():
        bins = nonempty_bins(_subset(hist, slow_idx), drop_zero_bins=True)
        parts.append(
            (
                slow_idx,
                _bins_objective(bins, lambda b, s, z: kl_loss(b, s, z, quant_min, quant_max, min_bins_per_level)),
            )
        )
    return _combine(parts, channels)
