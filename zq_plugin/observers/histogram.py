"""A mergeable, exactly streamable histogram: the accumulated statistics every observer shares.

The histogram of channel ``c`` has ``2B`` bins of width ``w_c = 2^(e_c) / B`` covering
``[-2^(e_c), 2^(e_c)]``; bin ``j`` holds the values ``v`` with ``floor(v / w_c) = j - B``.
The exponent is a function of the data alone,

    e_c = clamp(floor(log2(max |v|)) + 1, E_MIN, E_MAX)      (so max |v| < 2^e_c),

so the grid never depends on the order in which batches arrive. When a new batch raises
``e_c`` by ``k``, every old bin lies inside exactly one new bin (the new width is ``2^k`` old
widths and both grids have an edge at 0): bin ``j`` moves to ``floor((j - B) / 2^k) + B``.
Hence **observing x then y gives the same counts as observing cat(x, y)**: merging is exact,
with tolerance 0, and so is every statistic computed from the histogram. The exact running
minimum and maximum are kept beside the counts.

Resolution: ``max |v| >= 2^(e-1)``, so a bin is at most ``4 max|v| / (2B)`` wide, ``max|v| / 512`` for
the default ``2B = 2048`` bins (the count torch's HistogramObserver uses). Statistics that
integrate over a bin treat its values as uniformly spread inside it.

Per-tensor statistics are the per-channel ones with a single channel: the same code computes
both, so a per-channel histogram's row ``c`` equals the per-tensor histogram of slice ``c``.

Example:
    >>> import torch
    >>> h = observe(None, torch.tensor([0.5, -1.0, 3.0]))
    >>> h.counts.shape, int(h.exponent[0]), float(h.bin_width[0])
    (torch.Size([1, 2048]), 2, 0.00390625)
    >>> both = observe(observe(None, torch.tensor([0.5, -1.0])), torch.tensor([3.0]))
    >>> torch.equal(both.counts, h.counts)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from zq_plugin.errors import ConfigError

DEFAULT_BINS = 2048
E_MIN = -100  # values below 2^-100 land in the bins next to 0; keeps 1/w finite in float32
E_MAX = 128  # float32 values are below 2^128: every finite float32 is accepted
_HISTC_LIMIT = 120  # histc computes v * B in float32: it counts when e + log2(B) stays below this (2^128 overflows)
_HISTC_CHUNK = 1 << 24


MAX_BINS = 1 << 20  # finest grid: max|v| / 2^19, far below any 8-bit step


def check_bins(bins: object) -> int:
    """The number of histogram bins ``2B`` used for a requested ``bins`` (what torch's HistogramObserver takes).

    Any positive integer is accepted, as by ``torch.ao.quantization.HistogramObserver``; the grid
    uses the next power of two at or above it, at least 16 and at most ``2^20`` (so at least as
    fine as asked, up to that cap), because the exact re-binning needs a power-of-two grid.

    Raises:
        ConfigError: ``bins`` is not a positive integer.

    Example:
        >>> check_bins(2048), check_bins(1000), check_bins(3)
        (2048, 1024, 16)
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins={bins!r} is not supported: use a positive integer (default 2048, as torch's).")
    return min(max(16, 1 << (bins - 1).bit_length()), MAX_BINS)


@dataclass(frozen=True, kw_only=True)
class Histogram:
    """Accumulated statistics of ``C`` channels (``C = 1`` per-tensor).

    Attributes:
        counts: ``[C, 2B]`` int64 bin counts.
        exponent: ``[C]`` int64, the grid exponent ``e_c`` (meaningless where the channel is empty).
        min_val: ``[C]`` float32 exact minimum (``+inf`` where empty).
        max_val: ``[C]`` float32 exact maximum (``-inf`` where empty).
    """

    counts: torch.Tensor
    exponent: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    @property
    def bins(self) -> int:
        """Total number of bins ``2B`` per channel."""
        return int(self.counts.shape[1])

    @property
    def bin_width(self) -> torch.Tensor:
        """``[C]`` float64 bin widths ``2^e / B``."""
        half = self.bins // 2
        return torch.pow(2.0, self.exponent.to(torch.float64)) / half

    @property
    def empty(self) -> torch.Tensor:
        """``[C]`` bool, True where the channel has seen no value."""
        return self.min_val > self.max_val


def empty_histogram(channels: int = 1, bins: int = DEFAULT_BINS, device: torch.device | None = None) -> Histogram:
    """A histogram of ``channels`` channels that has seen nothing."""
    check_bins(bins)
    return Histogram(
        counts=torch.zeros(channels, bins, dtype=torch.int64, device=device),
        exponent=torch.full((channels,), E_MIN, dtype=torch.int64, device=device),
        min_val=torch.full((channels,), float("inf"), device=device),
        max_val=torch.full((channels,), float("-inf"), device=device),
    )


def grid_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """``clamp(floor(log2(absmax)) + 1, E_MIN, E_MAX)``, exactly, with ``frexp`` (``E_MIN`` for 0).

    ``absmax < 2^e`` strictly, so every value falls in the bin ``floor(v / w)`` without clamping,
    which is what makes re-binning exact.
    """
    _, exp = torch.frexp(absmax.to(torch.float32))  # absmax = mantissa * 2^exp, mantissa in [0.5, 1)
    exp = exp.to(torch.int64)
    exp = torch.where(absmax > 0, exp, torch.full_like(exp, E_MIN))
    return exp.clamp(E_MIN, E_MAX)


def _rebin(counts: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Move ``[C, 2B]`` counts from exponents ``old`` to ``new >= old`` (exact; see module docstring)."""
    channels, bins = counts.shape
    half = bins // 2
    shift = (new - old).clamp(min=0, max=62)  # [C]; a shift of 62+ sends every bin next to 0 anyway
    if not bool((shift > 0).any()):
        return counts
    dev = counts.device
    j = torch.arange(bins, dtype=torch.int64, device=dev) - half  # [2B]
    factor = torch.pow(2, shift).unsqueeze(1)  # [C, 1] int64
    target = torch.div(j.unsqueeze(0), factor, rounding_mode="floor") + half  # [C, 2B]
    target = target + torch.arange(channels, dtype=torch.int64, device=dev).unsqueeze(1) * bins
    out = torch.zeros(channels * bins, dtype=torch.int64, device=dev)
    out.index_add_(0, target.reshape(-1), counts.reshape(-1))
    return out.reshape(channels, bins)


def channel_axis(x: torch.Tensor, ch_axis: int | None) -> int | None:
    """``ch_axis`` normalised to ``[0, x.dim())`` (``None`` stays None: per-tensor)."""
    if ch_axis is None:
        return None
    if x.dim() == 0:
        raise ConfigError("a per-channel observer got a 0-d tensor; use the per-tensor observer for scalars.")
    if not -x.dim() <= ch_axis < x.dim():
        raise ConfigError(f"ch_axis={ch_axis} is out of range for a tensor of shape {tuple(x.shape)}.")
    return ch_axis % x.dim()


def _extremes(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)``, ``[C]`` each, without copying ``x``."""
    if axis is None:  # a whole-tensor reduction is parallel; a one-row reduction along a dim is not
        lo, hi = torch.aminmax(x)
        return lo.reshape(1), hi.reshape(1)
    if x.dim() == 1:
        return x.clone(), x.clone()
    dims = [d for d in range(x.dim()) if d != axis]
    return x.amin(dim=dims), x.amax(dim=dims)


def _count(x: torch.Tensor, axis: int | None, lo: torch.Tensor, exponent: torch.Tensor, half: int) -> torch.Tensor:
    """``[C, 2B]`` counts of ``x``: value ``v`` of channel ``c`` goes to bin ``B + floor(v B / 2^e_c)``.

    ``v * (B / 2^e)`` is exact (a power-of-two scaling), so is its floor. A non-negative tensor
    (per-tensor) uses ``torch.histc(v, B, 0, 2^e)``, which computes the same floor; otherwise the
    floors, offset by ``2B c`` for channel ``c``, go through one ``bincount`` in ``x``'s own layout.
    A tiny negative value whose scaled copy underflows to -0.0 is sent to bin ``B - 1``, where it
    belongs. Magnitudes near float32's largest (``finfo.min`` in an attention mask) take the
    ``bincount`` route too: ``histc`` would overflow computing ``v B``.
    """
    channels = exponent.shape[0]
    shift = half.bit_length() - 1  # log2(B)
    if axis is None and float(lo[0]) >= 0 and int(exponent[0]) + shift <= _HISTC_LIMIT:
        top = float(2.0 ** int(exponent[0]))
        out = torch.zeros(1, 2 * half, dtype=torch.int64, device=x.device)
        for chunk in x.reshape(-1).split(_HISTC_CHUNK):  # float32 counts are exact below 2^24
            out[0, half:] += torch.histc(chunk, half, 0.0, top).to(torch.int64)
        return out
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = channels
    inv = torch.pow(2.0, shift - exponent).to(torch.float32).reshape(shape)  # exact powers of two
    scaled = x * inv
    if bool((exponent > shift).any()):  # a scale below 1 can underflow tiny negatives to -0.0
        scaled = torch.where((scaled == 0) & (x < 0), -0.5, scaled)
    scaled.floor_()
    offsets = torch.arange(channels, dtype=torch.int64, device=x.device) * (2 * half) + half  # [C]
    if channels * 2 * half < 2**24:  # integers stay exact in float32
        index = scaled.add_(offsets.to(torch.float32).reshape(shape)).to(torch.int64)
    else:
        index = scaled.to(torch.int64).add_(offsets.reshape(shape))
    return torch.bincount(index.reshape(-1), minlength=channels * 2 * half).reshape(channels, 2 * half)


def observe(hist: Histogram | None, x: torch.Tensor, ch_axis: int | None = None, bins: int = DEFAULT_BINS) -> Histogram:
    """Add the values of ``x`` to ``hist`` (``None``: start empty) and return the new histogram.

    Args:
        hist: the statistics so far, or None.
        x: float tensor; per-channel along ``ch_axis`` (``None``: per-tensor).
        ch_axis: channel axis of ``x``, or None for one channel.
        bins: number of bins when ``hist`` is None.

    Every finite float32 is counted, up to ``torch.finfo(torch.float32).max`` (Hugging Face
    attention masks add ``finfo.min``; torch's MinMaxObserver and HistogramObserver take it).
    ``+inf`` and ``-inf`` values are left out with a warning (torch's HistogramObserver ignores
    them too: a quantizer clamps them anyway, and attention masks may hold ``-inf``), so a channel
    that holds only infinities stays empty.

    Raises:
        ConfigError: NaN in ``x``, or a channel count different from ``hist``'s.
    """
    axis = channel_axis(x, ch_axis)
    x = x.detach().to(torch.float32)
    channels = 1 if axis is None else x.shape[axis]
    if hist is None:
        hist = empty_histogram(channels, bins, x.device)
    if hist.counts.shape[0] != channels:
        raise ConfigError(
            f"the observed tensor has {channels} channels along ch_axis={ch_axis}, but the observer has seen "
            f"{hist.counts.shape[0]}; use one observer per tensor (reset it with a fresh instance)."
        )
    if x.numel() == 0:
        return hist
    lo, hi = _extremes(x, axis)  # [C] each; NaN propagates
    infinite = None  # [C] number of +-inf values left out per channel
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        if bool(torch.isnan(lo).any()) or bool(torch.isnan(hi).any()):
            raise ConfigError(
                "the observed tensor contains NaN; an observer needs numbers (check the model and the "
                "calibration data, e.g. with torch.isnan). Infinite values are skipped, NaN is not."
            )
        warnings.warn(
            "the observed tensor holds +-inf; those values are left out of the statistics (as torch's "
            "HistogramObserver does): the quantizer clamps them to the range found for the finite values.",
            stacklevel=5,  # observe <- forward <- Module._call_impl <- _wrapped_call_impl <- the caller
        )
        finite = torch.isfinite(x)
        if axis is None:
            x = x[finite]
            if x.numel() == 0:
                return hist
            lo, hi = _extremes(x, None)
        else:
            dims = [d for d in range(x.dim()) if d != axis]
            infinite = (~finite).sum(dim=dims) if dims else (~finite).to(torch.int64)
            lo = torch.where(finite, x, float("inf")).amin(dim=dims) if dims else torch.where(finite, x, float("inf"))
            hi = torch.where(finite, x, float("-inf")).amax(dim=dims) if dims else torch.where(finite, x, float("-inf"))
            x = torch.where(finite, x, 0.0)  # counted in the bin at 0, then taken out again below
    min_val = torch.minimum(hist.min_val, lo)
    max_val = torch.maximum(hist.max_val, hi)
    exponent = torch.where(hist.empty, E_MIN, hist.exponent)
    new_exp = torch.maximum(exponent, grid_exponent(torch.maximum(-min_val, max_val)))
    counts = _rebin(hist.counts, exponent, new_exp)
    added = _count(x, axis, lo, new_exp, hist.bins // 2)
    if infinite is not None:  # the stand-in zeros of the infinite values went to bin B (floor(0) = 0)
        added[:, hist.bins // 2] -= infinite.to(torch.int64)
    counts = counts + added
    return Histogram(counts=counts, exponent=new_exp, min_val=min_val, max_val=max_val)


def merge(a: Histogram, b: Histogram) -> Histogram:
    """The histogram of the union of the data of ``a`` and ``b`` (exact).

    Example:
        >>> import torch
        >>> x, y = torch.randn(100), 10 * torch.randn(100)
        >>> torch.equal(merge(observe(None, x), observe(None, y)).counts, observe(None, torch.cat([x, y])).counts)
        True
    """
    if a.counts.shape != b.counts.shape:
        raise ConfigError(f"cannot merge histograms of shapes {tuple(a.counts.shape)} and {tuple(b.counts.shape)}.")
    ea = torch.where(a.empty, E_MIN, a.exponent)
    eb = torch.where(b.empty, E_MIN, b.exponent)
    exp = torch.maximum(ea, eb)
    counts = _rebin(a.counts, ea, exp) + _rebin(b.counts, eb, exp)
    return Histogram(
        counts=counts,
        exponent=exp,
        min_val=torch.minimum(a.min_val, b.min_val),
        max_val=torch.maximum(a.max_val, b.max_val),
    )


@dataclass(frozen=True, kw_only=True)
class Bins:
    """The non-empty bins of each channel, padded to a common length ``M`` (float64).

    Attributes:
        left: ``[C, M]`` left bin edges, clipped to the exact ``[min, max]``.
        right: ``[C, M]`` right bin edges, clipped likewise (``right >= left``).
        count: ``[C, M]`` counts (0 in padding).
        width: ``[C]`` nominal bin width ``2^e / B``.
    """

    left: torch.Tensor
    right: torch.Tensor
    count: torch.Tensor
    width: torch.Tensor

    @property
    def center(self) -> torch.Tensor:
        """``[C, M]`` bin centres."""
        return 0.5 * (self.left + self.right)


def nonempty_bins(hist: Histogram, drop_zero_bins: bool = False) -> Bins:
    """Compact ``hist`` to its non-empty bins (sorted by position), edges clipped to the exact min/max.

    Clipping the outermost edges to the observed extremes makes the statistics respect the
    exact range: a bin never claims values beyond ``min_val``/``max_val``. ``drop_zero_bins``
    leaves out the two bins next to 0, ``(-w, w)``: ReLU's zeros and values that round to 0 on
    any grid coarser than ``2w``.
    """
    channels, bins = hist.counts.shape
    counts = hist.counts
    if drop_zero_bins:
        counts = counts.clone()
        counts[:, bins // 2 - 1 : bins // 2 + 1] = 0
    nonzero = counts > 0  # [C, 2B]
    width = max(int(nonzero.sum(1).max()), 1) if channels else 1
    # stable sort puts non-empty bins first, in position order
    order = torch.sort((~nonzero).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [C, M]
    count = torch.gather(counts, 1, order).to(torch.float64)
    bw = hist.bin_width.unsqueeze(1)  # [C, 1]
    raw_left = (order - bins // 2).to(torch.float64) * bw
    lo = hist.min_val.to(torch.float64).unsqueeze(1)
    hi = hist.max_val.to(torch.float64).unsqueeze(1)
    left = torch.minimum(torch.maximum(raw_left, lo), hi)
    right = torch.minimum(torch.maximum(raw_left + bw, lo), hi)
    return Bins(left=left, right=right, count=count, width=hist.bin_width)
