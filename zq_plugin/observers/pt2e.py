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

from typing import Any

from zq_plugin import _compat
from zq_plugin.observers._family import build_family, pick

__all__ = [
    "ACIQObserver",
    "EntropyObserver",
    "MSEObserver",
    "PerChannelACIQObserver",
    "PerChannelEntropyObserver",
    "PerChannelMSEObserver",
    "PerChannelPercentileObserver",
    "PercentileObserver",
    "observer_class",
]

_CLASSES = build_family(_compat.torchao_pt2e().UniformQuantizationObserverBase, __name__, "torchao's observer base")
MSEObserver: Any = _CLASSES["MSEObserver"]
PerChannelMSEObserver: Any = _CLASSES["PerChannelMSEObserver"]
PercentileObserver: Any = _CLASSES["PercentileObserver"]
PerChannelPercentileObserver: Any = _CLASSES["PerChannelPercentileObserver"]
ACIQObserver: Any = _CLASSES["ACIQObserver"]
PerChannelACIQObserver: Any = _CLASSES["PerChannelACIQObserver"]
EntropyObserver: Any = _CLASSES["EntropyObserver"]
PerChannelEntropyObserver: Any = _CLASSES["PerChannelEntropyObserver"]


def observer_class(name: str, per_channel: bool = False) -> Any:
    """The torchao observer class called ``name`` (one of :data:`zq_plugin.observers.ao.NAMES`).

    The PT2E twin of :func:`zq_plugin.observers.ao.observer_class`: ``"minmax"`` and
    ``"histogram"`` are torchao's own, the others this module's.

    Raises:
        ConfigError: an unknown name, or ``"histogram"`` per channel.

    Example:
        >>> observer_class("mse", per_channel=True).__name__
        'PerChannelMSEObserver'
    """
    ao = _compat.torchao_pt2e()
    pairs = (ao.MinMaxObserver, ao.PerChannelMinMaxObserver)
    return pick(name, per_channel, _CLASSES, pairs, ao.HistogramObserver)
