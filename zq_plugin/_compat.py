"""The only module that imports ``torch.ao.quantization`` (and, later, torchao) internals.

torch.ao.quantization is deprecated in favour of torchao's PT2E (integration-notes §1.5):
keeping every import here leaves one place to change when it moves or disappears. The FX
entry points are wrapped so that the deprecation warnings, which concern the user's choice of
flow and not our internal calls, do not flood the output of our helpers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    MinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torch.ao.quantization import quantize_fx as _quantize_fx

__all__ = [
    "FakeQuantize",
    "FakeQuantizeBase",
    "MinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "QConfig",
    "QConfigMapping",
    "convert_fx",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
    "prepare_fx",
    "prepare_qat_fx",
]

_QUIET = (
    (DeprecationWarning, r".*torch\.ao\.quantization.*"),
    (UserWarning, r".*quantized tensor creation functions.*"),
    (UserWarning, r".*_check_is_valid_config_dict.*"),
)


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        for category, pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        return fn(*args, **kwargs)


def prepare_fx(
    model: torch.nn.Module, mapping: QConfigMapping, example_inputs: tuple[Any, ...]
) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.prepare_fx`` without its deprecation warning."""
    return _quiet(_quantize_fx.prepare_fx, model, mapping, example_inputs)


def prepare_qat_fx(
    model: torch.nn.Module, mapping: QConfigMapping, example_inputs: tuple[Any, ...]
) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.prepare_qat_fx`` without its deprecation warning."""
    return _quiet(_quantize_fx.prepare_qat_fx, model, mapping, example_inputs)


def convert_fx(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``torch.ao.quantization.quantize_fx.convert_fx`` (real int8 kernels) without its warnings."""
    return _quiet(_quantize_fx.convert_fx, model)
