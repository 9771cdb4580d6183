"""Loss functions of BN-statistics synthesis (pure functions on tensors).

Notation (methods.md §1.1): a feature tensor ``F`` of shape ``[N, C, *S]`` (``S`` spatial dims,
possibly none) entering a BatchNorm layer with running mean ``mu`` and std ``sigma`` (``[C]``).

* **per-sample** statistics (ZeroQ's code): ``m[n, c] = mean_S F[n, c]``,
  ``s[n, c] = sqrt(var_S F[n, c] + 1e-6)`` (unbiased), and the loss
  ``(1/N) * sum_{n,c} (m - mu)^2 + (s - sigma)^2``. Each image is pushed to the population
  statistics on its own. Features without spatial dims (``[N, C]``) fall back to batch statistics.
* **batch** statistics (Genie, GDFQ, DeepInversion): ``m[c] = mean_{N,S} F[:, c]``,
  ``s[c] = sqrt(var_{N,S} F[:, c] + 1e-6)``, loss ``sum_c (m - mu)^2 + (s - sigma)^2``. Only the
  batch as a whole must match, which leaves the images free to differ.

ZeroQ's total objective (paper Eq. 3) sums these over all BN layers plus the same term on
the input image with target mean 0 and std 1 per channel (layer 0).
"""

from __future__ import annotations

from typing import Literal

import torch

Statistics = Literal["per_sample", "batch"]
_VAR_EPS = 1e-6


def feature_stats(feat: torch.Tensor, statistics: Statistics) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``feat`` ``[N, C, *S]``: ``[N, C]`` each (per-sample) or ``[C]`` each (batch)."""
    spatial = tuple(range(2, feat.dim()))
    if statistics == "per_sample" and spatial:
        var, mean = torch.var_mean(feat, dim=spatial)  # [N, C] each
    else:
        # reduce over (N, *S) directly: no transposed copy of the feature map
        var, mean = torch.var_mean(feat, dim=(0, *spatial))  # [C] each
    return mean, torch.sqrt(var + _VAR_EPS)


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
    m, s = feature_stats(feat, statistics)
    sq = (m - mean).pow(2) + (s - std).pow(2)  # [N, C] or [C]
    return sq.sum() / feat.shape[0] if sq.dim() == 2 else sq.sum()


def bn_statistics_loss(
    feats: dict[str, torch.Tensor],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    statistics: Statistics,
) -> torch.Tensor:
    """Sum of :func:`stats_loss` over every BN layer named in ``targets``."""
    return torch.stack([stats_loss(feats[name], mu, sigma, statistics) for name, (mu, sigma) in targets.items()]).sum()


def zeroq_objective(
    feats: dict[str, torch.Tensor],
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    statistics: Statistics,
    input_weight: float = 1.0,
) -> torch.Tensor:
    """ZeroQ's Eq. 3: :func:`bn_statistics_loss` plus ``input_weight`` times the input term (mean 0, std 1)."""
    channels = x.shape[1]
    input_term = stats_loss(x, torch.zeros(channels), torch.ones(channels), statistics)
    return bn_statistics_loss(feats, targets, statistics) + input_weight * input_term
