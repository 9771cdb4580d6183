"""Builds one observer family (torch.ao or torchao) from the shared core; used by ``ao.py`` and ``pt2e.py``."""

from __future__ import annotations

from typing import Any

import torch

from zq_plugin.observers._core import RangeObserverMixin
from zq_plugin.qparams import EPS


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
