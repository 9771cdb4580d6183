"""Observers that know the bit width: range statistics as pure functions, plus drop-in observer classes.

* :mod:`zq_plugin.observers.histogram`: the accumulated statistics, an exactly mergeable histogram.
* :mod:`zq_plugin.observers.stats`: ``lp_range`` (MSE / Lp search), ``percentile_range``,
  ``aciq_range``, ``entropy_range`` (KL with the real number of levels), each
  ``(histogram, quant_min, quant_max, symmetric) -> (lo, hi)``.
* :mod:`zq_plugin.observers.ao`: torch.ao observer classes (FX ``QConfig``, eager), re-exported here.
* :mod:`zq_plugin.observers.pt2e`: the same classes on torchao's base, for ``prepare_pt2e``
  (import it explicitly; needs torchao).

Example:
    >>> import torch
    >>> from zq_plugin.observers import MSEObserver
    >>> obs = MSEObserver(quant_min=0, quant_max=15)
    >>> _ = obs(torch.rand(1000))
    >>> obs.calculate_qparams()[0].shape
    torch.Size([1])
"""

from zq_plugin.observers.ao import (
    ACIQObserver,
    EntropyObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelACIQObserver,
    PerChannelEntropyObserver,
    PerChannelMSEObserver,
    PerChannelPercentileObserver,
)
from zq_plugin.observers.histogram import Histogram, merge, observe
from zq_plugin.observers.stats import aciq_range, entropy_range, lp_range, minmax_range, percentile_range

__all__ = [
    "ACIQObserver",
    "EntropyObserver",
    "Histogram",
    "MSEObserver",
    "PerChannelACIQObserver",
    "PerChannelEntropyObserver",
    "PerChannelMSEObserver",
    "PerChannelPercentileObserver",
    "PercentileObserver",
    "aciq_range",
    "entropy_range",
    "lp_range",
    "merge",
    "minmax_range",
    "observe",
    "percentile_range",
]
