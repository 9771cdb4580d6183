"""Moved to :mod:`zq_plugin.plan` (a plan is a plain value below every backend); this name re-exports it."""

from zq_plugin.plan import FORMAT, FORMAT_VERSION, BitPlan, Granularity, Grid, LayerBits

__all__ = ["FORMAT", "FORMAT_VERSION", "BitPlan", "Granularity", "Grid", "LayerBits"]
