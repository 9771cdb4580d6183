"""Brevitas backend: a float model + a BitPlan -> Brevitas quant layers, calibrated, bias-corrected, exported.

Steps (integration-notes §3; Brevitas is imported lazily and is an optional extra):

1. :func:`to_brevitas`: a **deep copy** of the model goes through Brevitas's
   ``preprocess_for_quantize`` (BatchNorm merged into the convs; it rewrites weights in place,
   so the original is never handed to it; ReLU6 is kept) and ``layerwise_quantize``: each
   Conv/ConvTranspose/Linear becomes ``QuantConv*d``/``QuantConvTranspose*d``/``QuantLinear``
   quantizing its own **input** and its weights at the plan's bits. Weights are symmetric
   narrow, per output channel (depthwise convs need it; axis 1 of a ConvTranspose weight) or per
   tensor as the plan says; the bias is int32 (a zero bias where the layer had none). A layer's
   input is unsigned when it comes from a ReLU/ReLU6 (through pooling or reshapes), signed
   otherwise (the image, a linear bottleneck, a residual sum). Weight layers left in float are
   listed in ``zq_float_layers`` (:func:`~zq_plugin._utils.report_float_layers`).
2. :func:`calibrate`: Brevitas's ``calibration_mode`` over any loader (the backend does not
   know which synthesizer made the data); a second call continues the average. Until then the
   model refuses to run (:class:`~zq_plugin.errors.NotCalibratedError`): an uncalibrated
   Brevitas activation quantizer silently uses threshold 1.0.
3. :func:`bias_correct` (per output channel, any rank) and optionally :func:`gptq` (``gptq_mode``).
4. :func:`export_onnx`: QCDQ ONNX (sub-8-bit ranges kept as ``Clip`` bounds; the logits first,
   every other output after them) and :func:`run_onnx` to check it in onnxruntime.

Every step follows the model's device; a step that fails on a batch raises a
:class:`~zq_plugin.errors.ZQError` and leaves the model as it was.

The package, one job a module: :mod:`~zq_plugin.backends.brevitas.layers` (step 1 and
:func:`describe_layers`), :mod:`~zq_plugin.backends.brevitas.calibrate` (step 2),
:mod:`~zq_plugin.backends.brevitas.correction` (step 3), :mod:`~zq_plugin.backends.brevitas.carry`
(an FX simulation carried in: :func:`from_sim`) and :mod:`~zq_plugin.backends.brevitas.export` (step 4).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> qmodel = to_brevitas(net, w_bits=4, a_bits=4, first_last_bits=None)
    >>> calibrate(qmodel, torch.randn(64, 1, 8, 8))
    CalibrationSummary(batches=1, samples=64)
    >>> qmodel(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from zq_plugin.backends import moved_names
from zq_plugin.backends.brevitas.calibrate import _batches as _batches
from zq_plugin.backends.brevitas.calibrate import calibrate
from zq_plugin.backends.brevitas.carry import from_sim
from zq_plugin.backends.brevitas.correction import bias_correct, gptq
from zq_plugin.backends.brevitas.export import _own_weight_zero_points as _own_weight_zero_points
from zq_plugin.backends.brevitas.export import export_onnx, run_onnx
from zq_plugin.backends.brevitas.layers import (
    PLUGIN_STATS,
    PluginStatistic,
    describe_layers,
    nonnegative_inputs,
    to_brevitas,
    uncalibrated,
)
from zq_plugin.backends.brevitas.layers import _brevitas as _brevitas
from zq_plugin.backends.brevitas.layers import _quant_layers as _quant_layers
from zq_plugin.errors import ModelError as ModelError  # tests name it here

__all__ = [
    "PLUGIN_STATS",
    "PluginStatistic",
    "bias_correct",
    "calibrate",
    "describe_layers",
    "export_onnx",
    "from_sim",
    "gptq",
    "nonnegative_inputs",
    "run_onnx",
    "to_brevitas",
    "uncalibrated",
]

#: A stage x backend composition that lives above the backends now (one release with a warning).
__getattr__ = moved_names(__name__, {"reconstruct_brevitas": "zq_plugin.recipe"}, backend="brevitas")
