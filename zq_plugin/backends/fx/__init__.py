"""torch.ao.quantization FX backend: QConfigs for W/A bits, a calibrator, and a faithful low-bit simulation.

The package, one job a module: :mod:`~zq_plugin.backends.fx.qconfig` (QConfigs and the uniform
mapping), :mod:`~zq_plugin.backends.fx.passes` (graph passes before and after ``prepare``),
:mod:`~zq_plugin.backends.fx.quantize` (:func:`quantize_fx`, folding, freezing),
:mod:`~zq_plugin.backends.fx.sim` (the simulation in the plan's meaning and the one seam
``read_sim``), :mod:`~zq_plugin.backends.fx.plan` (a plan as a torch.ao ``QConfigMapping``) and
:mod:`~zq_plugin.backends.fx.export` (``.pt2``, ONNX, torch's int8 model). The calibration loop
is :mod:`zq_plugin.calibration` (not FX-specific), re-exported here.

Two ways in:

1. **Your own flow, our data.** Prepare the model yourself (``prepare_fx`` or
   ``prepare_qat_fx``) and call :func:`calibrate` with any loader; it runs the model in
   eval/no-grad mode and restores its mode.
2. **One call.** :func:`quantize_fx` builds the mapping for uniform W/A bits, prepares with
   ``prepare_qat_fx`` (eval mode: BN folded with running statistics, weights fake-quantized),
   calibrates and returns a model whose fake quantization **clamps to quant_min/quant_max**.
   ``convert_fx`` does not clamp (integration-notes §1.2) and must not be used to measure
   accuracy below 8 bits; :func:`convert_int8_fx` gives the real int8 model at 8 bits.

Conventions: weights per-channel symmetric on a *narrow* range (``[-(2^(b-1)-1), 2^(b-1)-1]``,
a grid symmetric around 0); activations per-tensor affine ``[0, 2^b - 1]``, which represents the
signed image input exactly (the zero point shifts the grid). Uniform bits are
``BitPlan.uniform``: each weight layer's weight and its **input** at the layer's bits, the first
and last Conv/Linear (in execution order, functional calls included) at ``first_last_bits``, so
the image is read at ``first_last_bits`` and the last layer's input at ``a_bits`` -- the meaning
of the bits on every backend (docs/api.md). torch.ao's own activation placement (a layer's
*output*, integration-notes §1.3) applies only to a ``mapping=`` you pass.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> sim = quantize_fx(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
    >>> sim(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from zq_plugin._utils import WEIGHT_LAYERS, weight_layer_names
from zq_plugin.backends.fx.export import _FrozenFakeQuant as _FrozenFakeQuant
from zq_plugin.backends.fx.export import convert_int8_fx, export_onnx, export_sim
from zq_plugin.backends.fx.passes import (
    NEGATIVE_LOBE_MODULES,
    ReLUThenClamp,
    clip_before_shared_observer,
    keep_negative_lobes,
    relu6_as_relu_then_clamp,
)
from zq_plugin.backends.fx.passes import _is_negative_lobe as _is_negative_lobe
from zq_plugin.backends.fx.qconfig import qconfig, uniform_qconfig_mapping
from zq_plugin.backends.fx.quantize import FakeQuantConvTranspose, fold_weights, freeze, quantize_fx
from zq_plugin.backends.fx.quantize import _swap_conv_transpose as _swap_conv_transpose
from zq_plugin.backends.fx.sim import describe_sim, read_sim, simulate
from zq_plugin.calibration import InputFn, batch_inputs, calibrate, check_traceable
from zq_plugin.calibration import _example_inputs as _example_inputs
from zq_plugin.calibration import _raw_batches as _raw_batches
from zq_plugin.calibration import _to_model as _to_model
from zq_plugin.calibration import _user_line as _user_line

__all__ = [
    "NEGATIVE_LOBE_MODULES",
    "WEIGHT_LAYERS",
    "FakeQuantConvTranspose",
    "InputFn",
    "ReLUThenClamp",
    "batch_inputs",
    "calibrate",
    "check_traceable",
    "clip_before_shared_observer",
    "convert_int8_fx",
    "describe_sim",
    "export_onnx",
    "export_sim",
    "fold_weights",
    "freeze",
    "keep_negative_lobes",
    "qconfig",
    "quantize_fx",
    "read_sim",
    "relu6_as_relu_then_clamp",
    "simulate",
    "uniform_qconfig_mapping",
    "weight_layer_names",
]
