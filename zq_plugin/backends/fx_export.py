"""Moved to :mod:`zq_plugin.backends.fx.export`; this module keeps the old import path working."""

from zq_plugin.backends.fx.export import export_onnx

__all__ = ["export_onnx"]
