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
on ``[C]`` vectors. :func:`channel_moments` therefore takes *all* layers at once: the forward
pass reads each feature map twice with vectorised reductions (``sum`` and the squared 2-norm
over the spatial dims), and the backward pass writes each feature's gradient in one pass of a
per-channel affine map, from

    d mean / dF = 1 / n,      d var / dF = 2 (F - mean) / (n - 1),

so ``dL/dF = a F + b`` per channel with ``a = 2 g_var / (n - 1)`` and
``b = g_mean / n - a mean``. The statistics of every layer come out concatenated (``[K]`` or
``[N, K]`` with ``K`` the total channel count), and each method's loss is a handful of ops on
those vectors whatever the depth. The variance is ``(sum F^2 - n mean^2) / (n - 1)`` in the
feature's dtype: in float32 its relative error grows like ``3e-7 (mean / std)^2`` (3e-4 measured
at ``|mean| = 30 std``, below 1e-4 up to ``15 std``; tested against ``torch.var_mean``), small
next to the distances the losses penalise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Statistics = Literal["per_sample", "batch"]
INPUT = "<input>"  # the name of layer 0, the input image, in :class:`MomentTargets`
_VAR_EPS = 1e-6


Moments = tuple[torch.Tensor, torch.Tensor]  # (mean, unbiased variance): [C] or [N, C] each
Sums = tuple[torch.Tensor, torch.Tensor, int]  # (sum f, sum f^2, values per statistic): [C] or [N, C]


def _sums_count(f: torch.Tensor, statistics: Statistics) -> int:
    """Values behind each statistic of ``f``: its positions per sample, or all values of a channel."""
    positions = f.numel() // max(f.shape[0] * f.shape[1], 1)
    return positions if statistics == "per_sample" and positions > 1 else f.shape[0] * positions


def _sums(f: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(sum f, sum f^2, expanded)`` per channel (or per sample and channel): two vectorised reductions.

    Per-sample sums of features with fewer than two positions per sample fall back to batch
    sums, expanded to ``[N, C]`` (``expanded`` is then True).
    """
    if f.dim() > 2:
        spatial = (2, 3) if f.dim() == 4 else tuple(range(2, f.dim()))
        s1 = f.sum(spatial)  # [N, C]
        s2 = torch.linalg.vector_norm(f, dim=spatial).square()  # [N, C]
    else:
        s1, s2 = f, f.square()  # [N, C]
    if per_sample and f.numel() > f.shape[0] * f.shape[1]:  # more than one position per sample
        return s1, s2, False
    s1, s2 = s1.sum(0), s2.sum(0)  # [C]
    if per_sample:
        return s1.expand(f.shape[0], -1), s2.expand(f.shape[0], -1), True  # [N, C]
    return s1, s2, False


def _channel_affine(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * f + b`` per channel (``a, b`` ``[C]``) or per sample and channel (``[N, C]``), in one pass.

    Runs as an eval-mode ``batch_norm`` with mean 0 and variance 1, whose vectorised CPU kernel
    is 2-3x faster than a broadcasting ``addcmul``; per-sample coefficients view ``f`` as
    ``[1, N C, *S]``.
    """
    if a.dim() == 2:
        n, c = a.shape
        flat = f.reshape(1, n * c, *f.shape[2:])  # a view for contiguous f
        return _channel_affine(flat, a.reshape(-1), b.reshape(-1)).view_as(f)
    return torch.batch_norm(f, a, b, torch.zeros_like(a), torch.ones_like(a), False, 0.0, 0.0, False)


def _sums_grad(f: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, expanded: bool) -> torch.Tensor:
    """``dL/df = g1 + 2 g2 f`` from the gradients w.r.t. ``sum f`` and ``sum f^2``."""
    if expanded:
        g1, g2 = g1.sum(0), g2.sum(0)  # [C]: the rows were one batch statistic
    return _channel_affine(f, 2.0 * g2, g1)


class _Sums(torch.autograd.Function):
    """``(sum f, sum f^2)`` of one feature map, with a one-pass backward."""

    @staticmethod
    def forward(ctx: Any, per_sample: bool, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s1, s2, ctx.expanded = _sums(f, per_sample)
        ctx.save_for_backward(f)
        return s1, s2

    @staticmethod
    def backward(ctx: Any, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (f,) = ctx.saved_tensors
        return None, _sums_grad(f, g1, g2, ctx.expanded)


class _SumsThroughBN(torch.autograd.Function):
    """The output ``y = k f + c`` of an eval-mode BatchNorm passed through, plus ``f``'s sums.

    The backward returns ``k dy + g1 + 2 g2 f`` itself (two passes), so the BatchNorm's own
    backward, a second pass over ``f`` and the sum of two gradients for ``f`` never run.
    """

    @staticmethod
    def forward(
        ctx: Any, per_sample: bool, f: torch.Tensor, y: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s1, s2, ctx.expanded = _sums(f, per_sample)
        ctx.save_for_backward(f, k)
        return y.view_as(y), s1, s2

    @staticmethod
    def backward(ctx: Any, g_y: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        f, k = ctx.saved_tensors
        grad = _sums_grad(f, g1, g2, ctx.expanded)
        grad.addcmul_(g_y, k.reshape((1, -1) + (1,) * (f.dim() - 2)))
        return None, grad, None, None


def sums(f: torch.Tensor, statistics: Statistics) -> Sums:
    """Differentiable ``(sum f, sum f^2, n)`` of ``f`` ``[N, C, *S]``: ``[C]`` each, or ``[N, C]`` per sample.

    ``n`` is the number of values behind each sum; see :func:`moments_from_sums`.
    """
    s1, s2 = _Sums.apply(statistics == "per_sample", f)
    return s1, s2, _sums_count(f, statistics)


def sums_through_bn(
    f: torch.Tensor, y: torch.Tensor, slope: torch.Tensor, statistics: Statistics
) -> tuple[torch.Tensor, Sums]:
    """``(y, sums of f)``: an eval-mode BatchNorm's output, re-attached, and its input's sums.

    Args:
        f: the BatchNorm's input ``[N, C, *S]``.
        y: its output ``slope * f + c`` (its own graph is dropped: ``y`` is used detached).
        slope: ``[C]`` ``weight / sqrt(running_var + eps)``, the layer's derivative.
        statistics: ``"batch"`` or ``"per_sample"``.

    Returns:
        ``y``, whose gradient to ``f`` is ``slope * dy`` plus the sums' gradient, and the sums
        as :func:`sums` gives them.
    """
    y_out, s1, s2 = _SumsThroughBN.apply(statistics == "per_sample", f, y.detach(), slope.detach())
    return y_out, (s1, s2, _sums_count(f, statistics))


def moments_from_sums(
    s1: torch.Tensor, s2: torch.Tensor, count: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, unbiased var)`` from sums over ``count`` values (an int or a ``[K]`` tensor).

    ``mean = s1 / n`` and ``var = (s2 - s1 mean) / max(n - 1, 1)``, clamped at 0.
    """
    if isinstance(count, int):
        mean = s1 / count
        return mean, ((s2 - s1 * mean) / max(count - 1, 1)).clamp_min(0.0)
    mean = s1 / count
    return mean, ((s2 - s1 * mean) / (count - 1).clamp_min(1)).clamp_min(0.0)


def moments(f: torch.Tensor, statistics: Statistics) -> Moments:
    """Differentiable ``(mean, var)`` of ``f`` ``[N, C, *S]``: ``[C]`` each, or ``[N, C]`` per sample.

    The variance is unbiased; features with fewer than two positions per sample fall back to
    batch statistics (repeated per sample). See the module docstring for the cost.

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 8, 8)
        >>> mean, var = moments(f, "per_sample")
        >>> mean.shape, torch.allclose(var, f.var((2, 3)), atol=1e-5)
        (torch.Size([4, 3]), True)
    """
    return moments_from_sums(*sums(f, statistics))


def _concat(parts: Sequence[Sums], statistics: Statistics, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ``(mean, std)`` of several layers' sums; ``counts`` ``[K]`` per channel."""
    dim = 1 if statistics == "per_sample" else 0
    s1 = torch.cat([p[0] for p in parts], dim)  # [K] or [N, K]
    s2 = torch.cat([p[1] for p in parts], dim)
    mean, var = moments_from_sums(s1, s2, counts)
    return mean, torch.sqrt(var + _VAR_EPS)


def _counts(parts: Sequence[Sums], dtype: torch.dtype) -> torch.Tensor:
    """``[K]``: each layer's count repeated for its channels."""
    return torch.cat([torch.full((p[0].shape[-1],), float(p[2]), dtype=dtype) for p in parts])


def channel_moments(feats: Sequence[torch.Tensor], statistics: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means and stds of every feature map, concatenated: ``[K]`` or ``[N, K]`` each.

    ``K`` is the total channel count of ``feats`` (each ``[N, C_l, *S_l]``, same ``N``); the std
    is ``sqrt(var + 1e-6)`` with the unbiased variance (:func:`moments`).

    Example:
        >>> import torch
        >>> f = torch.randn(4, 3, 8, 8)
        >>> m, s = channel_moments([f, f[:, :2]], "batch")
        >>> m.shape, torch.allclose(m[:3], f.mean((0, 2, 3)), atol=1e-6)
        (torch.Size([5]), True)
    """
    parts = [sums(f, statistics) for f in feats]
    return _concat(parts, statistics, _counts(parts, feats[0].dtype))


def pool_moments(mean: torch.Tensor, std: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``(mean, std)`` ``[K]`` from per-sample ones ``[N, K]`` (differentiable).

    With ``P`` values per sample and statistic, ``M = mean_n m_n`` and
    ``V = (sum_n [(P - 1) v_n + P m_n^2] - N P M^2) / (N P - 1)``; channels with ``P = 1`` already
    carry batch statistics (the per-sample fallback) and keep row 0.

    Example:
        >>> import torch
        >>> f = torch.randn(4, 2, 3, 3)
        >>> m, s = pool_moments(*channel_moments([f], "per_sample"), torch.tensor([9.0, 9.0]))
        >>> torch.allclose(s, channel_moments([f], "batch")[1], atol=1e-5)
        True
    """
    var = std.square() - _VAR_EPS  # [N, K]
    n = mean.shape[0]
    pooled_mean = mean.mean(0)  # [K]
    total = ((positions - 1) * var + positions * mean.square()).sum(0) - n * positions * pooled_mean.square()
    pooled_var = torch.where(positions > 1, total / (n * positions - 1).clamp_min(1), var[0]).clamp_min(0.0)
    return pooled_mean, torch.sqrt(pooled_var + _VAR_EPS)


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
    _counts: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]], input_channels: int | None = None
    ) -> MomentTargets:
        """From ``name -> (mu, sigma)``; with ``input_channels``, the input (mean 0, std 1) comes first."""
        items = list(targets.items())
        if input_channels is not None:
            items.insert(0, (INPUT, (torch.zeros(input_channels), torch.ones(input_channels))))
        return cls(
            names=tuple(name for name, _ in items),
            channels=tuple(int(mu.shape[0]) for _, (mu, _) in items),
            mean=torch.cat([mu.detach() for _, (mu, _) in items]),
            std=torch.cat([sigma.detach() for _, (_, sigma) in items]),
        )

    def expand(self, per_layer: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Per-layer values ``[L]`` (or ``[N, L]``) repeated for each layer's channels: ``[K]`` (or ``[N, K]``)."""
        values = torch.as_tensor(per_layer, dtype=self.mean.dtype)
        return values.repeat_interleave(torch.tensor(self.channels), dim=-1)

    def gather(self, feats: Mapping[str, torch.Tensor], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The feature maps in layer order (``x`` for :data:`INPUT`)."""
        return [x if name == INPUT and x is not None else feats[name] for name in self.names]

    def collect(
        self, layer_sums: Mapping[str, Sums], x: torch.Tensor | None, statistics: Statistics
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``(mean, std)`` (``[K]`` or ``[N, K]``) from hooked sums, ``x``'s for :data:`INPUT`.

        ``layer_sums`` is what :func:`zq_plugin.synth.hooks.bn_sums` records on a forward.
        """
        parts = [sums(x, statistics) if name == INPUT and x is not None else layer_sums[name] for name in self.names]
        key = tuple(p[2] for p in parts)
        if key not in self._counts:  # counts change only with the batch shape
            self._counts[key] = _counts(parts, self.mean.dtype)
        return _concat(parts, statistics, self._counts[key])


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


def zeroq_objective(
    feats: Mapping[str, torch.Tensor],
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    statistics: Statistics,
    input_weight: float = 1.0,
) -> torch.Tensor:
    """ZeroQ's Eq. 3: :func:`bn_statistics_loss` plus ``input_weight`` times the input term (mean 0, std 1).

    A reference on captured feature maps; the synthesis loops build a :class:`MomentTargets`
    once and hook the moments with :func:`zq_plugin.synth.hooks.bn_sums`.
    """
    t = MomentTargets.build(targets, input_channels=x.shape[1])
    weights = t.expand([input_weight] + [1.0] * len(targets))
    return moment_distance(*channel_moments(t.gather(feats, x), statistics), t, weights)
