"""Range-search observers for torch.ao.quantization (FX ``QConfig`` / eager), one class per statistic.

Each is a ``UniformQuantizationObserverBase`` with torch's keywords (``dtype``, ``qscheme``,
``quant_min``, ``quant_max``, ``ch_axis``, ``eps``, ``factory_kwargs``, ``reduce_range``,
``is_dynamic``), an identity ``forward`` that merges the tensor into an exact streaming histogram
(:mod:`zq_plugin.observers.histogram`), and a ``calculate_qparams`` that runs the statistic once per
new data (cached until the next forward). Per-tensor classes accept ``per_tensor_affine`` /
``per_tensor_symmetric``; the ``PerChannel`` ones ``per_channel_affine`` / ``per_channel_symmetric``
(default ``ch_axis=0``, the output channel of Conv/Linear weights).

For torchao's PT2E flow use the same names from :mod:`zq_plugin.observers.pt2e`: torch.ao
observers are silently ignored by ``prepare_pt2e``.

Example:
    >>> import torch
    >>> from zq_plugin._compat import QConfig
    >>> act = MSEObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=15)
    >>> wt = PerChannelMSEObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
    ...                                      quant_min=-7, quant_max=7)
    >>> qconfig = QConfig(activation=act, weight=wt)
    >>> obs = act()
    >>> _ = obs(torch.cat([torch.rand(10000), torch.tensor([20.0])]))
    >>> scale, zero_point = obs.calculate_qparams()
    >>> float(scale) < 20 / 15, int(zero_point)
    (True, 0)
"""

from __future__ import annotations

from typing import Any

from zq_plugin import _compat
from zq_plugin.observers._family import NAMES, build_family, pick

__all__ = [
    "NAMES",
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

_CLASSES = build_family(_compat.UniformQuantizationObserverBase, __name__, "torch.ao's observer base")
MSEObserver: Any = _CLASSES["MSEObserver"]
PerChannelMSEObserver: Any = _CLASSES["PerChannelMSEObserver"]
PercentileObserver: Any = _CLASSES["PercentileObserver"]
PerChannelPercentileObserver: Any = _CLASSES["PerChannelPercentileObserver"]
ACIQObserver: Any = _CLASSES["ACIQObserver"]
PerChannelACIQObserver: Any = _CLASSES["PerChannelACIQObserver"]
EntropyObserver: Any = _CLASSES["EntropyObserver"]
PerChannelEntropyObserver: Any = _CLASSES["PerChannelEntropyObserver"]


def observer_class(name: str, per_channel: bool = False) -> Any:
    """The torch.ao observer class called ``name`` (one of :data:`NAMES`), per-tensor or per-channel.

    ``"minmax"`` and ``"histogram"`` are torch's own (``histogram`` exists only per tensor).

    Example:
        >>> observer_class("mse", per_channel=True).__name__
        'PerChannelMSEObserver'
    """
    pairs = (_compat.MinMaxObserver, _compat.PerChannelMinMaxObserver)
    return pick(name, per_channel, _CLASSES, pairs, _compat.HistogramObserver)
