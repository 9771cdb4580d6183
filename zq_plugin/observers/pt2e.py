"""The same range-search observers for torchao's PT2E flow (``prepare_pt2e`` / ``convert_pt2e``).

torchao has its own observer base classes and ``prepare_pt2e`` silently leaves torch.ao
observers unconverted (integration-notes §2), so these classes derive from torchao's
``UniformQuantizationObserverBase``; statistics, options, buffers and answers are those of
:mod:`zq_plugin.observers.ao` (same inputs give identical qparams). Per-channel classes carry
"PerChannel" in their name because ``prepare_pt2e`` passes ``ch_axis`` only to such classes.
Importing this module needs torchao (``pip install 'zq-plugin[pt2e]'``).

Example:
    >>> import torch
    >>> from zq_plugin import _compat
    >>> spec = _compat.torchao_pt2e().QuantizationSpec(
    ...     dtype=torch.uint8, quant_min=0, quant_max=15, qscheme=torch.per_tensor_affine,
    ...     observer_or_fake_quant_ctr=PercentileObserver.with_args(percentile=99.9))
    >>> obs = spec.observer_or_fake_quant_ctr(dtype=torch.uint8, quant_min=0, quant_max=15)
    >>> _ = obs(torch.arange(1000.0))
    >>> round(float(obs.calculate_qparams()[0]), 2)
    66.6
"""

from __future__ import annotations

from typing import Any, ClassVar

from zq_plugin import _compat
from zq_plugin.observers._core import ACIQStatistic, EntropyStatistic, MSEStatistic, PercentileStatistic
from zq_plugin.observers._family import family_base

__all__ = [
    "ACIQObserver",
    "EntropyObserver",
    "MSEObserver",
    "PerChannelACIQObserver",
    "PerChannelEntropyObserver",
    "PerChannelMSEObserver",
    "PerChannelPercentileObserver",
    "PercentileObserver",
]

_Base: Any = family_base(_compat.torchao_pt2e().UniformQuantizationObserverBase, "RangeObserver")


class _PerTensor(_Base):
    per_channel = False


class _PerChannel(_Base):
    per_channel = True


class MSEObserver(MSEStatistic, _PerTensor):
    """Lp-error clipping search, per tensor (torchao base). Options as :class:`zq_plugin.observers.ao.MSEObserver`."""


class PerChannelMSEObserver(MSEStatistic, _PerChannel):
    """Lp-error clipping search, per channel (torchao base)."""


class PercentileObserver(PercentileStatistic, _PerTensor):
    """Percentile of the pooled data, per tensor (torchao base)."""


class PerChannelPercentileObserver(PercentileStatistic, _PerChannel):
    """Percentile of the pooled data, per channel (torchao base)."""


class ACIQObserver(ACIQStatistic, _PerTensor):
    """Analytical (ACIQ) clipping, per tensor (torchao base)."""


class PerChannelACIQObserver(ACIQStatistic, _PerChannel):
    """Analytical (ACIQ) clipping, per channel (torchao base)."""


class EntropyObserver(EntropyStatistic, _PerTensor):
    """KL (entropy) search with the real level count, per tensor (torchao base)."""


class PerChannelEntropyObserver(EntropyStatistic, _PerChannel):
    """KL (entropy) search, per channel (torchao base); ``bins=2048`` by default (one search per channel)."""

    options: ClassVar[dict[str, Any]] = {**EntropyStatistic.options, "bins": 2048}
