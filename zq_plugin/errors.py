"""Exceptions raised by zq_plugin.

Every error derives from :class:`ZQError` and also from the built-in exception it stands for,
so ``except ValueError`` keeps working. Messages name the bad value and say how to fix it.
"""

from __future__ import annotations


class ZQError(Exception):
    """Base class of every error raised by zq_plugin."""


class ConfigError(ZQError, ValueError):
    """An argument or option has a value that cannot work (bits outside 2-8, bad shape, ...)."""


class ModelError(ZQError, ValueError):
    """The model cannot be used as asked (no BatchNorm for a BN-statistics method, NaN outputs, ...)."""


class DatasetNotFoundError(ZQError, FileNotFoundError):
    """A dataset file is missing."""


class DatasetCorruptError(ZQError, ValueError):
    """A dataset file exists but cannot be decoded."""


class DataMismatchError(ZQError, ValueError):
    """A saved synthetic dataset was made for another model (its weight fingerprint differs)."""


class NotCalibratedError(ZQError, RuntimeError):
    """A quantized model is used before it saw calibration data."""


class MissingDependencyError(ZQError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""
