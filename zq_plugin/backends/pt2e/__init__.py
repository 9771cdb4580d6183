"""torchao PT2E backend: a bit plan through ``torch.export`` → ``prepare_pt2e`` → calibrate → ``convert_pt2e``.

PT2E annotates the **inputs** of an operator (integration-notes §2), which is what a
:class:`~zq_plugin.mixed_precision.BitPlan` means by a layer's activation bits
(``LayerBits.a_bits``: the bits of the layer's input). :class:`PlanQuantizer` gives every aten
``conv1d``/``conv2d``/``conv3d``/``linear`` node the input and weight specs of its layer, found
by the node's module path (``nn_module_stack``):

* input: per-tensor affine, ``uint8`` container, ``[0, 2^a - 1]`` (the zero point holds a
  signed input such as a normalized image), the activation observer class;
* weight: per-output-channel symmetric, narrow signed range ``[-(2^(w-1) - 1), 2^(w-1) - 1]``,
  axis 0, the weight observer class.

Layers the plan does not name keep 8 bits, as in the FX emitter. The observers must be
torchao's (``zq_plugin.observers.pt2e``, or torchao's own MinMax): torch.ao observers are
silently left unconverted by ``convert_pt2e``. The converted model's quantize ops clamp to
``quant_min``/``quant_max``, so its accuracy is the real low-bit accuracy. Needs torchao
(``pip install 'zq-plugin[pt2e]'``).

The package, one job a module: :mod:`~zq_plugin.backends.pt2e.quantizer` (the plan's quantizer,
its specs and observer checks), :mod:`~zq_plugin.backends.pt2e.quantize` (export, prepare,
calibrate, convert: :func:`quantize_pt2e`, :func:`prepare_qat`), :mod:`~zq_plugin.backends.pt2e.carry`
(an FX simulation carried in: :func:`from_sim`; :func:`describe_converted`) and
:mod:`~zq_plugin.backends.pt2e.export` (``.pt2`` and QCDQ ONNX).

Example:
    >>> import torch, zq_plugin
    >>> from zq_plugin.backends.pt2e import quantize_pt2e
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(144, 3)).eval()
    >>> q = quantize_pt2e(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4, first_last_bits=None)
    >>> q(torch.randn(5, 1, 8, 8)).shape  # any batch size
    torch.Size([5, 3])
"""

from __future__ import annotations

from zq_plugin.backends import moved_names
from zq_plugin.backends.pt2e.carry import carry_steps, describe_converted, from_sim
from zq_plugin.backends.pt2e.export import clip_sub_8_bit, export_onnx, export_program, load_program
from zq_plugin.backends.pt2e.quantize import (
    convert,
    export_for_pt2e,
    move_to_eval,
    move_to_train,
    prepare_qat,
    quantize_pt2e,
    restore_batchnorm_eps,
)
from zq_plugin.backends.pt2e.quantizer import DEFAULT_BITS, TARGETS, keep_negative_lobes, layer_name, plan_quantizer
from zq_plugin.backends.pt2e.quantizer import _weight_owner as _weight_owner

__all__ = [
    "DEFAULT_BITS",
    "TARGETS",
    "carry_steps",
    "clip_sub_8_bit",
    "convert",
    "describe_converted",
    "export_for_pt2e",
    "export_onnx",
    "export_program",
    "from_sim",
    "keep_negative_lobes",
    "layer_name",
    "load_program",
    "move_to_eval",
    "move_to_train",
    "plan_quantizer",
    "prepare_qat",
    "quantize_pt2e",
    "restore_batchnorm_eps",
]

#: A stage x backend composition that lives above the backends now (one release with a warning).
__getattr__ = moved_names(__name__, {"reconstruct_pt2e": "zq_plugin.recipe"}, backend="pt2e")
