"""Loss functions of BN-statistics synthesis (pure functions on tensors).

Notation (methods.md §1.1): a feature tensor ``F`` of shape ``[N, C, *S]`` (``S`` spatial dims,
possibly none) entering a BatchNorm layer with running mean ``mu`` and std ``sigma`` (``[C]``).

* **per-sample** statistics (ZeroQ's code): ``m[n, c] = mean_S F[n, c]``,
  ``s[n, c] = sqrt(var_S F[n, c] + 1e-6)`` (unbiased), and the loss
  ``(1/N) * sum_{n,c} (m - mu)^2 + (s - sigma)^2``. Each image is pushed to the population
  statistics on its own. Features with fewer than two spatial positions (``[N, C]``,
  ``[N, C, 1, 1]``) fall back to batch statistics, repeated for every sample.
* **batch** statistics (Genie, GDFQ, DeepInversion): ``m[c] = mean_{N,S} F[:, c]``,
  ``s[c] = sqrt(var_{N,S} F[:, c] + 1e-6)``, loss ``sum_c (m - mu)^2 + (s - sigma)^2``. Only the
  batch as a whole must match, which leaves the images free to differ.

ZeroQ's total objective (paper Eq. 3) sums these over all BN layers plus the same term on
the input image with target mean 0 and std 1 per channel (layer 0).

**Speed.** A synthesis step should cost one forward+backward of the frozen model. Two things
stand in the way on CPU: ``torch.var_mean`` over ``(N, H, W)`` runs a Welford reduction that
costs as much as the convolution before it, and autograd differentiates the mean and the
variance separately (several passes over each feature map), then a dozen small ops per layer
on ``[C]`` vectors. Here each feature map is reduced once to per-sample sums ``sum_S F`` and
``sum_S F^2`` (``[N, C]``: ``sum`` and the squared 2-norm, :func:`sums`), recorded by the hooks
of :func:`zq_plugin.synth.hooks.bn_sums`. Their gradient is

    d (sum F) / dF = 1,      d (sum F^2) / dF = 2 F,

so ``dL/dF = g1 + 2 g2 F`` per sample and channel, written in one pass of a per-channel
affine map; for a frozen BatchNorm in eval mode :func:`sums_through_bn` also adds the layer's
own ``k dy``, so its backward never runs. Means and variances of *all* layers are formed from
the concatenated sums (``[N, K]``, ``K`` the total channel count, :meth:`MomentTargets.collect`),
so each method's loss is a handful of ops on vectors whatever the depth. The variance is
``(sum F^2 - n mean^2) / (n - 1)`` in the feature's dtype: in float32 it loses about
``eps (mean^2 + var)`` to cancellation, a relative error of about ``3e-7 (mean / std)^2``
(below 1e-4 up to ``|mean| = 15 std``; tested against ``torch.var_mean``), small next to the
distances the losses penalise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Statistics = Literal["per_sample", "batch"]
INPUT = "<input>"  # the name of layer 0, the input image, in :class:`MomentTargets`
_VAR_EPS = 1e-6


Sums = tuple[torch.Tensor, torch.Tensor, int]  # per sample: (sum f [N, C], sum f^2 [N, C], positions)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are taken in: float32 for float16/bfloat16 features, else the feature's own.

    ``sum f^2 - n mean^2`` in bfloat16 (8 significant bits) cancels to noise, and Adam steps on
    bfloat16 pixels vanish below their resolution, so low-precision models are distilled with
    float32 sums, targets and pixels (the model itself runs in its own dtype).

    Example:
        >>> stat_dtype(torch.bfloat16), stat_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _partial_sums(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(sum f, sum f^2)`` over the spatial dims of ``f`` ``[N, C, *S]``: ``[N, C]`` each."""
    f = f.to(stat_dtype(f.dtype))
    if f.dim() == 2:
        return f.clone(), f.square()
    spatial = (2, 3) if f.dim() == 4 else tuple(range(2, f.dim()))
    return f.sum(spatial), torch.linalg.vector_norm(f, dim=spatial).square()


@functools.lru_cache(maxsize=64)
def _zeros_ones(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(size, dtype=dtype, device=device), torch.ones(size, dtype=dtype, device=device)


def _sums_grad(f: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """``dL/df = g1 + 2 g2 f`` per sample and channel (``g1, g2`` ``[N, C]``), in one pass.

    Runs as an eval-mode ``batch_norm`` (mean 0, variance 1), whose vectorised CPU kernel is 2-3x
    faster than a broadcasting ``addcmul``: per channel when the gradients are the same for
    every sample (batch statistics: they arrive expanded, with stride 0), else on ``f`` viewed
    as ``[1, N C, *S]``. A low-precision ``f`` is computed on in float32 and the result cast back.
    """
    if f.dtype != g1.dtype:
        return _sums_grad(f.to(g1.dtype), g1, g2).to(f.dtype)
    if f.dim() == 2:
        return torch.addcmul(g1, g2, f, value=2.0)
    if g1.stride(0) == 0 and g2.stride(0) == 0:  # one coefficient per channel
        zeros, ones = _zeros_ones(f.shape[1], f.dtype, f.device)
        return torch.batch_norm(f, 2.0 * g2[0], g1[0], zeros, ones, False, 0.0, 0.0, False)
    zeros, ones = _zeros_ones(g1.numel(), f.dtype, f.device)
    flat = f.reshape(1, -1, *f.shape[2:])  # [1, N C, *S], a view for contiguous f
    return torch.batch_norm(flat, 2.0 * g2.reshape(-1), g1.reshape(-1), zeros, ones, False, 0.0, 0.0, False).view_as(f)


class _Sums(torch.autograd.Function):
    """Per-sample ``(sum f, sum f^2)`` of one feature map, with a one-pass backward."""

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(f)
        return _partial_sums(f)

    @staticmethod
    def backward(ctx: Any, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        (f,) = ctx.saved_tensors
        return _sums_grad(f, g1, g2)


class _SumsThroughBN(torch.autograd.Function):
    """The output ``y = k f + c`` of an eval-mode BatchNorm passed through, plus ``f``'s sums.

    The backward returns ``k dy + g1 + 2 g2 f`` itself (two passes), so the BatchNorm's own
    backward, a second pass over ``f`` and the sum of two gradients for ``f`` never run.
    """

    @staticmethod
    def forward(
        ctx: Any, f: torch.Tensor, y: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(f, k)
        # y is handed back as the same tensor with this node as its history (as an in-place op
        # does): returned plainly it would be a view of an input, which every in-place op after
        # the BatchNorm (ReLU(inplace=True), out += identity) refuses to modify.
        ctx.mark_dirty(y)
        return (y, *_partial_sums(f))

    @staticmethod
    def backward(ctx: Any, g_y: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        f, k = ctx.saved_tensors
        return _sums_grad(f, g1, g2).addcmul_(g_y, k), None, None


def _positions(f: torch.Tensor) -> int:
    return f.numel() // max(f.shape[0] * f.shape[1], 1)


def sums(f: torch.Tensor) -> Sums:
    """Differentiable per-sample sums of ``f`` ``[N, C, *S]``: ``(sum f, sum f^2)`` ``[N, C]`` each, and ``|S|``.

    The gradient w.r.t. ``f`` is one pass (see the module docstring); :meth:`MomentTargets.collect`
    turns the sums of many layers into batch or per-sample means and stds.
    """
    s1, s2 = _Sums.apply(f)
    return s1, s2, _positions(f)


def sums_through_bn(f: torch.Tensor, y: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, Sums]:
    """``(y, sums of f)``: an eval-mode BatchNorm's output, re-attached, and its input's sums.

    Args:
        f: the BatchNorm's input ``[N, C, *S]``.
        y: its output ``slope * f + c``; its own graph is not used (the BatchNorm backward does
            not run).
        slope: ``weight / sqrt(running_var + eps)``, the layer's derivative, shaped
            ``[1, C, 1, ...]`` to broadcast against ``f``.

    Returns:
        ``y``, whose gradient to ``f`` is ``slope * dy`` plus the sums' gradient, and the sums
        as :func:`sums` gives them.
    """
    y_out, s1, s2 = _SumsThroughBN.apply(f, y, slope)
    return y_out, (s1, s2, _positions(f))


class _Layout:
    """Per-channel counts of a list of layers' sums (cached per batch shape by :class:`MomentTargets`)."""

    def __init__(self, parts: Sequence[Sums], dtype: torch.dtype) -> None:
        n, device = parts[0][0].shape[0], parts[0][0].device
        positions = torch.cat([torch.full((p[0].shape[1],), float(p[2]), dtype=dtype, device=device) for p in parts])
        self.batch_count = n * positions  # [K]
        # per sample: layers with one position per sample fall back to batch statistics
        self.own = positions > 1  # [K]
        self.all_own = bool(self.own.all())
        self.sample_count = torch.where(self.own, positions, self.batch_count)  # [K]


def _moments_from_sums(s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean = s1 / n``, unbiased ``var = (s2 - s1 mean) / max(n - 1, 1)`` clamped at 0."""
    mean = s1 / count
    return mean, ((s2 - s1 * mean) / (count - 1).clamp_min(1)).clamp_min(0.0)


def _concat(parts: Sequence[Sums], statistics: Statistics, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ``(mean, std)`` of several layers' sums: ``[K]`` (batch) or ``[N, K]`` (per sample)."""
    s1 = torch.cat([p[0] for p in parts], 1)  # [N, K]
    s2 = torch.cat([p[1] for p in parts], 1)  # [N, K]
    if statistics == "batch":
        mean, var = _moments_from_sums(s1.sum(0), s2.sum(0), layout.batch_count)  # [K] each
    else:
        if not layout.all_own:  # the batch sums, repeated per sample, where a layer has one position
            s1 = torch.where(layout.own, s1, s1.sum(0, keepdim=True))
            s2 = torch.where(layout.own, s2, s2.sum(0, keepdim=True))
        mean, var = _moments_from_sums(s1, s2, layout.sample_count)  # [N, K] each
    return mean, torch.sqrt(var + _VAR_EPS)


def channel_moments(feats: Sequence[torch.Tensor], statistics: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means and stds of every feature map, concatenated: ``[K]`` or ``[N, K]`` each.

    ``K`` is the total channel count of ``feats`` (each ``[N, C_l, *S_l]``, same ``N``); the std
    is ``sqrt(var + 1e-6)`` with the unbiased variance.

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 8, 8)
        >>> m, s = channel_moments([f, f[:, :2]], "batch")
        >>> m.shape, torch.allclose(m[:3], f.mean((0, 2, 3)), atol=1e-6)
        (torch.Size([5]), True)
    """
    parts = [sums(f) for f in feats]
    return _concat(parts, statistics, _Layout(parts, parts[0][0].dtype))


def feature_stats(feat: torch.Tensor, statistics: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one feature ``[N, C, *S]``: ``[N, C]`` each (per-sample) or ``[C]`` each (batch)."""
    return channel_moments([feat], statistics)


@dataclass(frozen=True)
class MomentTargets:
    """The target statistics of several layers, concatenated channel-wise (built once per batch).

    Attributes:
        names: layer names in order; :data:`INPUT` stands for the input image.
        channels: channel count of each layer.
        mean: ``[K]`` target means.
        std: ``[K]`` target stds.

    Example:
        >>> import torch
        >>> t = MomentTargets.build({"bn": (torch.zeros(2), torch.ones(2))}, input_channels=1)
        >>> t.names, t.expand([0.5, 1.0]).tolist()
        (('<input>', 'bn'), [0.5, 1.0, 1.0])
    """

    names: tuple[str, ...]
    channels: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    _layouts: dict[tuple[object, ...], _Layout] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        input_channels: int | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> MomentTargets:
        """From ``name -> (mu, sigma)``; with ``input_channels``, the input (mean 0, std 1) comes first.

        The targets lie on ``device`` (default: the given tensors', CPU when there are none) in
        ``dtype`` (default: :func:`stat_dtype` of theirs, float32 for bfloat16 BN buffers).
        """
        items = list(targets.items())
        first = items[0][1][0] if items else torch.zeros(0)
        device, dtype = device or first.device, dtype or stat_dtype(first.dtype)
        if input_channels is not None:
            ones = torch.ones(input_channels, device=device, dtype=dtype)
            items.insert(0, (INPUT, (torch.zeros_like(ones), ones)))
        return cls(
            names=tuple(name for name, _ in items),
            channels=tuple(int(mu.shape[0]) for _, (mu, _) in items),
            mean=torch.cat([mu.detach().to(device, dtype) for _, (mu, _) in items]),
            std=torch.cat([sigma.detach().to(device, dtype) for _, (_, sigma) in items]),
        )

    def expand(self, per_layer: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Per-layer values ``[L]`` (or ``[N, L]``) repeated for each layer's channels: ``[K]`` (or ``[N, K]``)."""
        values = torch.as_tensor(per_layer, dtype=self.mean.dtype, device=self.mean.device)
        return values.repeat_interleave(torch.tensor(self.channels, device=self.mean.device), dim=-1)

    def gather(self, feats: Mapping[str, torch.Tensor], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The feature maps in layer order (``x`` for :data:`INPUT`)."""
        return [x if name == INPUT and x is not None else feats[name] for name in self.names]

    def collect(
        self, layer_sums: Mapping[str, Sums], x: torch.Tensor | None, statistics: Statistics
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``(mean, std)`` (``[K]`` or ``[N, K]``) from hooked sums, ``x``'s for :data:`INPUT`.

        ``layer_sums`` is what :func:`zq_plugin.synth.hooks.bn_sums` records on a forward.
        """
        parts = [sums(x) if name == INPUT and x is not None else layer_sums[name] for name in self.names]
        key = (parts[0][0].shape[0], str(parts[0][0].device), *(p[2] for p in parts))
        if key not in self._layouts:  # changes only with the batch shape
            self._layouts[key] = _Layout(parts, self.mean.dtype)
        return _concat(parts, statistics, self._layouts[key])


def moment_distance(
    mean: torch.Tensor, std: torch.Tensor, targets: MomentTargets, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_k w_k ((m_k - mu_k)^2 + (s_k - sigma_k)^2)``, divided by ``N`` for per-sample statistics.

    Args:
        mean: ``[K]`` (batch) or ``[N, K]`` (per-sample) means in ``targets.names`` order.
        std: the stds, same shape.
        targets: the concatenated targets.
        weights: ``[K]`` per-channel weights (:meth:`MomentTargets.expand`).
    """
    sq = ((mean - targets.mean).square() + (std - targets.std).square()) * weights  # [K] or [N, K]
    return sq.sum() / mean.shape[0] if sq.dim() == 2 else sq.sum()


def stats_loss(feat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, statistics: Statistics) -> torch.Tensor:
    """Squared distance of ``feat``'s statistics to the target ``(mean, std)`` (``[C]`` each); a scalar.

    Per-sample distances are summed over samples and channels and divided by ``N``; batch
    distances are summed over channels.

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 8, 8)
        >>> float(stats_loss(f, torch.zeros(3), torch.ones(3), "batch")) < 1.0
        True
    """
    targets = MomentTargets(names=("f",), channels=(mean.shape[0],), mean=mean, std=std)
    return moment_distance(*channel_moments([feat], statistics), targets, torch.ones(()))


def bn_statistics_loss(
    feats: Mapping[str, torch.Tensor],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    statistics: Statistics,
) -> torch.Tensor:
    """Sum of :func:`stats_loss` over every BN layer named in ``targets``."""
    t = MomentTargets.build(targets)
    return moment_distance(*channel_moments(t.gather(feats), statistics), t, torch.ones(()))
