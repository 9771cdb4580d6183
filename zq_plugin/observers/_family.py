"""Builds one observer family (torch.ao or torchao) from the shared core; used by ``ao.py`` and ``pt2e.py``.

Each family has the classes ``<Stat>Observer`` and ``PerChannel<Stat>Observer`` for every
statistic of :data:`STATISTICS`: ``class X(<statistic>, <family root>)``, with the per-channel
defaults of the statistic and a docstring listing its options.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from zq_plugin.errors import ConfigError
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


# torch's positional orders: MinMaxObserver, HistogramObserver (bins first), PerChannelMinMaxObserver
TENSOR_ORDER = ("dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "factory_kwargs", "eps", "is_dynamic")
HISTOGRAM_ORDER = ("bins", *TENSOR_ORDER)
CHANNEL_ORDER = ("ch_axis", *TENSOR_ORDER)
_DEFAULTS: dict[str, Any] = {
    "dtype": torch.quint8,
    "qscheme": None,
    "reduce_range": False,
    "quant_min": None,
    "quant_max": None,
    "factory_kwargs": None,
    "eps": EPS,
    "is_dynamic": False,
}


def bind_arguments(cls_name: str, per_channel: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the positional ``args`` as torch's observers do, merge ``kwargs``; return every argument by name.

    Per-channel classes follow ``PerChannelMinMaxObserver(ch_axis, dtype, qscheme, reduce_range, quant_min,
    quant_max, factory_kwargs, eps, is_dynamic)``. Per-tensor classes follow ``MinMaxObserver(dtype, qscheme,
    ...)``, or ``HistogramObserver(bins, dtype, qscheme, ...)`` when the first positional argument is an
    integer (a dtype never is, so the two orders cannot be confused).

    Raises:
        ConfigError: too many positional arguments, or one given both by position and by keyword.
    """
    order: tuple[str, ...]
    if per_channel:
        order = CHANNEL_ORDER
    elif args and isinstance(args[0], int) and not isinstance(args[0], bool):
        order = HISTOGRAM_ORDER
    else:
        order = TENSOR_ORDER
    if len(args) > len(order):
        raise ConfigError(
            f"{cls_name} takes at most {len(order)} positional arguments {list(order)} (torch's order), got "
            f"{len(args)}; pass the statistic's options (p=, percentile=, ...) by keyword."
        )
    twice = [name for name in order[: len(args)] if name in kwargs]
    if twice:
        raise ConfigError(f"{cls_name} got {twice} both by position and by keyword; pass each once.")
    return {**_DEFAULTS, **dict(zip(order, args, strict=False)), **kwargs}


def family_base(base: Any, name: str) -> Any:
    """``class <name>(RangeObserverMixin, base)`` with torch's observer signatures (:func:`bind_arguments`).

    The keywords are those of torch's observers (``dtype``, ``qscheme``, ``reduce_range``,
    ``quant_min``, ``quant_max``, ``factory_kwargs``, ``eps``, ``is_dynamic``, ``ch_axis``); every other
    keyword must be an option of the statistic (``p``, ``percentile``, ``bins``, ...).
    """

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        self._zq_init(base.__init__, bind_arguments(cls.__name__, cls.per_channel, args, kwargs))

    return type(name, (RangeObserverMixin, base), {"__init__": __init__, "__module__": __name__})


def _signature(per_channel: bool, options: dict[str, Any]) -> inspect.Signature:
    """The constructor signature shown by ``help()`` / ``inspect`` (torch's order, then the options)."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kind)]
    if per_channel:
        params.append(inspect.Parameter("ch_axis", kind, default=0))
    params += [inspect.Parameter(n, kind, default=_DEFAULTS[n]) for n in TENSOR_ORDER]
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=v) for n, v in options.items() if n != "ch_axis"
    ]
    return inspect.Signature(params)


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
            cls = type(name, (stat, root), attrs)

            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                root.__init__(self, *args, **kwargs)

            __init__.__signature__ = _signature(per_channel, options)  # type: ignore[attr-defined]
            __init__.__qualname__ = f"{name}.__init__"
            cls.__init__ = __init__  # type: ignore[misc]
            classes[name] = cls
    return classes


#: The observer names the CLI and :func:`pick` take.
NAMES = ("minmax", "histogram", "mse", "percentile", "aciq", "entropy")
_FAMILY_NAMES = {"mse": "MSE", "percentile": "Percentile", "aciq": "ACIQ", "entropy": "Entropy"}


def pick(name: str, per_channel: bool, family: dict[str, Any], minmax: tuple[Any, Any], histogram: Any) -> Any:
    """The class called ``name`` among ``family`` (from :func:`build_family`) and the base library's own.

    ``minmax`` is the library's (per-tensor, per-channel) MinMax pair, ``histogram`` its
    per-tensor histogram observer (there is no per-channel one).

    Raises:
        ConfigError: an unknown name, or ``"histogram"`` per channel.
    """
    if name not in NAMES:
        raise ConfigError(f"unknown observer {name!r}: use one of {list(NAMES)}.")
    if name == "histogram" and per_channel:
        raise ConfigError(
            f"observer 'histogram' has no per-channel version: use one of {[n for n in NAMES if n != name]}."
        )
    if name in ("minmax", "histogram"):
        return minmax[1 if per_channel else 0] if name == "minmax" else histogram
    return family[f"{'PerChannel' if per_channel else ''}{_FAMILY_NAMES[name]}Observer"]
