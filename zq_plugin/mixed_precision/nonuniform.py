"""Moved to :mod:`zq_plugin.nonuniform` (a weight quantizer below every backend); this name re-exports it."""

from zq_plugin.nonuniform import NonUniformFakeQuantize, clustered_quantize

__all__ = ["NonUniformFakeQuantize", "clustered_quantize"]
