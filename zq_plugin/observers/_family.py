"""Builds one observer family (torch.ao or torchao) from the shared core; used by ``ao.py`` and ``pt2e.py``.

Each family has the classes ``<Stat>Observer`` and ``PerChannel<Stat>Observer`` for every
statistic of :data:`STATISTICS`: ``class X(<statistic>, <family root>)``, with the per-channel
defaults of the statistic and a docstring listing its options.
"""

from __future__ import annotations

from typing import Any

import torch

from zq_plugin.observers._core import (
    ACIQStatistic,
    EntropyStatistic,
    MSEStatistic,
    PercentileStatistic,
    RangeObserverMixin,
    Statistic,
)
from zq_plugin.qparams import EPS

STATISTICS: dict[str, type[Statistic]] = {
    "MSE": MSEStatistic,
    "Percentile": PercentileStatistic,
    "ACIQ": ACIQStatistic,
    "Entropy": EntropyStatistic,
}


def family_base(base: Any, name: str) -> Any:
    """``class <name>(RangeObserverMixin, base)`` with torch's observer signature.

    The keywords are those of torch's observers (``dtype``, ``qscheme``, ``reduce_range``,
    ``quant_min``, ``quant_max``, ``factory_kwargs``, ``eps``, ``is_dynamic``, ``ch_axis``); every other
    keyword must be an option of the statistic (``p``, ``percentile``, ``bins``, ...).
    """

    def __init__(
        self: Any,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme | None = None,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict[str, Any] | None = None,
        eps: float = EPS,
        is_dynamic: bool = False,
        **options: Any,
    ) -> None:
        kwargs = dict(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **options,
        )
        self._zq_init(base.__init__, kwargs)

    return type(name, (RangeObserverMixin, base), {"__init__": __init__, "__module__": __name__})


def build_family(base: Any, module: str, flavour: str) -> dict[str, Any]:
    """``{class name: class}`` of every statistic, per tensor and per channel, on ``base``.

    ``module`` becomes the classes' ``__module__`` (they must be bound there under their names,
    so that they pickle); ``flavour`` names the base in the docstrings.
    """
    root = family_base(base, "RangeObserver")
    classes: dict[str, Any] = {}
    for stat_name, stat in STATISTICS.items():
        summary = (stat.__doc__ or "").splitlines()[0].rstrip(".")
        for per_channel in (False, True):
            name = ("PerChannel" if per_channel else "") + stat_name + "Observer"
            options = {**stat.options, **(stat.per_channel_options if per_channel else {})}
            scope = "one range per channel of ``ch_axis`` (default 0)" if per_channel else "per tensor"
            listed = ", ".join(f"``{k}={v!r}``" for k, v in options.items())
            attrs = {
                "per_channel": per_channel,
                "options": options,
                "__module__": module,
                "__qualname__": name,
                "__doc__": f"{summary}; {scope}; on {flavour}. Options (defaults): {listed}.",
            }
            classes[name] = type(name, (stat, root), attrs)
    return classes
