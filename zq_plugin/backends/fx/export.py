"""The FX simulation's exports and torch's int8 model.

* ``.pt2``: :func:`export_sim` (``torch.export.load(path).module()``).
* ONNX: :func:`export_onnx`: the same frozen simulation (every FakeQuantize as
  ``clamp(round(x / s), qmin - zp, qmax - zp) * s`` with its calibrated parameters) through
  ``torch.onnx.export``; in onnxruntime (:func:`zq_plugin.backends.brevitas.run_onnx`;
  ``optimize=False`` sets ``graph_optimization_level=ORT_DISABLE_ALL``, computing the ops as
  written) its outputs equal the simulation's to float rounding. It holds float weights and
  ``Round``/``Clip`` ops, the simulation as it computes, not integer kernels: for QDQ integer
  ONNX use the PT2E or Brevitas backend.
* :func:`convert_int8_fx`: a real int8 model (torch's quantized CPU kernels) at 8 bits.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import model_device_dtype, report_float_layers, weight_layers
from zq_plugin.backends.fx.passes import _spatial_means_as_pooling
from zq_plugin.backends.fx.qconfig import qconfig, uniform_qconfig_mapping
from zq_plugin.backends.fx.quantize import _float_weight_layers, _has_module
from zq_plugin.calibration import InputFn, _example_inputs, _to_model, calibrate, check_traceable
from zq_plugin.data import CalibrationData
from zq_plugin.errors import MissingDependencyError, ModelError

logger = logging.getLogger(__name__)


def _is_quantized_module(module: nn.Module | None) -> bool:
    """A converted int8 module, or a reference module (alone or inside a fused module, ``reference=True``)."""
    if module is None:
        return False
    if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
        return True
    return type(module).__module__.startswith("torch.ao.nn.intrinsic") and any(
        type(child).__module__.startswith("torch.ao.nn.quantized.reference") for child in module.children()
    )


class _FrozenFakeQuant(nn.Module):
    """A calibrated FakeQuantize with its ``(scale, zero_point)`` fixed: plain tensor ops, so torch.export takes it.

    Computes :func:`zq_plugin.qparams.fake_quantize`'s formula,
    ``clamp(round(x * (1 / s)), qmin - zp, qmax - zp) * s``, without Python branches on buffers.
    """

    def __init__(self, fq: Any) -> None:
        super().__init__()
        sync = getattr(fq, "sync_qparams", None)
        if sync is not None:
            sync()
        scale = fq.scale.detach().clone()
        zero_point = fq.zero_point.detach().to(scale.dtype)
        self.axis = int(fq.ch_axis) if fq.is_per_channel else None
        self.scale: torch.Tensor
        self.inv_scale: torch.Tensor
        self.lo: torch.Tensor
        self.hi: torch.Tensor
        self.register_buffer("scale", scale)
        self.register_buffer("inv_scale", 1.0 / scale)
        self.register_buffer("lo", fq.quant_min - zero_point)
        self.register_buffer("hi", fq.quant_max - zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the fixed parameters."""
        scale, inv, lo, hi = self.scale, self.inv_scale, self.lo, self.hi
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            scale, inv, lo, hi = scale.reshape(shape), inv.reshape(shape), lo.reshape(shape), hi.reshape(shape)
        return torch.clamp(torch.round(x * inv), lo, hi) * scale


def export_sim(sim: nn.Module, example: torch.Tensor) -> Any:
    """The calibrated clamping simulation as a ``torch.export`` program, for use without zq_plugin.

    Every FakeQuantize of ``sim`` (a :func:`quantize_fx` result or any calibrated
    ``prepare_qat_fx`` model) is replaced, in a copy, by a module of plain tensor ops with its
    calibrated ``(scale, zero_point)`` fixed: ``clamp(round(x / s), qmin - zp, qmax - zp) * s``,
    the formula of :func:`zq_plugin.qparams.fake_quantize`. The batch dimension is dynamic.
    Save it with ``torch.export.save(program, "model.pt2")`` and load it anywhere with
    ``torch.export.load("model.pt2").module()``; ``zq quantize --out model.pt2`` does both.

    Args:
        sim: the calibrated simulation; not changed.
        example: one input batch ``[N, C, H, W]`` on the model's device.

    Returns:
        A ``torch.export.ExportedProgram`` whose ``module()`` gives ``sim``'s outputs.

    Raises:
        ModelError: torch.export does not take a construct of the model (the message names it).

    Example:
        >>> import torch
        >>> from zq_plugin.backends.fx import quantize_fx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
        >>> sim = quantize_fx(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
        >>> program = export_sim(sim, torch.randn(2, 1, 8, 8))
        >>> x = torch.randn(5, 1, 8, 8)
        >>> torch.equal(program.module()(x), sim(x))
        True
    """
    frozen = copy.deepcopy(sim)
    for module in list(frozen.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _compat.FakeQuantize):
                setattr(module, name, _FrozenFakeQuant(child))
    try:
        return torch.export.export(frozen.eval(), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as exc:  # torch.export's own refusal, for a construct it does not take
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"torch.export could not export the simulation ({type(exc).__name__}: {first}); "
            "use the simulation from Python, or make the model torch.export-able (docs/compatibility.md)."
        ) from exc


def convert_int8_fx(
    model: nn.Module,
    data: CalibrationData,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    batch_size: int = 64,
    input_fn: InputFn | None = None,
    reference: bool = False,
) -> torch.fx.GraphModule:
    """A real int8 model (torch's quantized CPU kernels) from ``prepare_fx`` + calibration + ``convert_fx``.

    ``reference=True`` returns torch's reference model of the same steps instead
    (``convert_to_reference_fx``: float ops between quantize/dequantize pairs with the same
    qparams), the exact emulation to check the int8 kernels against.

    Only 8 bits: ``convert_fx`` ignores narrower quant_min/quant_max, so lower bit widths
    would silently run at more levels than asked. Every layer, first and last included, has 8-bit
    weights. ConvTranspose weights are quantized per tensor (torch's quantized ConvTranspose has no
    per-channel weights). Weight layers left in float are listed in ``.zq_float_layers``.

    **Activations use 7 bits (``[0, 127]`` in ``quint8``) on the x86/fbgemm engines**, as torch's
    own x86 qconfig does (``reduce_range=True``): those kernels multiply ``uint8 x int8`` pairs
    into ``int16`` with saturation, and with the full ``[0, 255]`` range the depthwise kernel
    saturates: a 3x3 depthwise conv of 144 channels with weights 1 on an input of ones returned
    5.05 for 9, and torchvision's MobileNetV2 fell to cosine 0.59 against torch's own reference
    model of the same qparams (0.9999 with 7 bits). Other engines (qnnpack) get 8 bits.

    A ``x.mean((2, 3))`` / ``torch.mean(x, [2, 3])`` over a 4-d feature map (torchvision's
    MNASNet, ShuffleNetV2) becomes ``adaptive_avg_pool2d(x, 1)`` (flattened unless ``keepdim``):
    the same numbers, and torch's quantized ``mean`` over those dims fails at run time
    ("required rank 4 tensor to use channels_last format").

    A float64/float16/bfloat16 model is converted to float32 first (torch's int8 kernels quantize
    float32 tensors only); the int8 model takes float32 inputs.

    Raises:
        ConfigError: the model lies on several devices or mixes floating dtypes.
        ModelError: the model does not trace, or torch cannot convert one of its layers (named).
    """
    check_traceable(model, "convert_int8_fx")
    _, dtype = model_device_dtype(model)  # one device and one floating dtype, or a ConfigError naming them
    work = copy.deepcopy(model).eval()
    if dtype != torch.float32:  # torch's int8 kernels quantize float32 tensors only
        logger.info("convert_int8_fx: the %s model is converted to float32 for torch's int8 kernels", dtype)
        work = work.float()
    a_bits = 7 if torch.backends.quantized.engine in ("x86", "fbgemm") else 8
    mapping = uniform_qconfig_mapping(
        model,
        8,
        a_bits,
        first_last_bits=None,
        act_observer=act_observer,
        weight_observer=weight_observer,
        fake_quant=False,
    )
    transposed = [n for n, m in weight_layers(model).items() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    for name in transposed:
        mapping.set_module_name(
            name, qconfig(8, a_bits, act_observer=act_observer, fake_quant=False, granularity="per_tensor")
        )
    example = _to_model(_example_inputs(data, batch_size, input_fn), work)
    try:
        prepared = _compat.prepare_fx(_spatial_means_as_pooling(work, example), mapping, example)
    except AssertionError as err:  # torch validates qconfigs per module type with bare asserts
        raise ModelError(
            f"convert_int8_fx: torch.ao refused a layer of {type(model).__name__} ({err}). Use quantize_fx (the "
            "clamping simulation) for this model, or give that layer a None qconfig in your own prepare_fx flow."
        ) from err
    calibrate(prepared, data, batch_size=batch_size, input_fn=input_fn)
    try:
        converted = _compat.convert_to_reference_fx(prepared) if reference else _compat.convert_fx(prepared)
    except (AssertionError, RuntimeError, NotImplementedError) as err:
        raise ModelError(
            f"convert_int8_fx: torch's convert_fx failed on {type(model).__name__} ({type(err).__name__}: {err}). "
            "Use quantize_fx (the clamping simulation) for this model."
        ) from err
    floats = _float_weight_layers(model, prepared, lambda name: _is_quantized_module(_has_module(converted, name)))
    report_float_layers(converted, floats, "convert_int8_fx")
    return converted


def export_onnx(sim: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write the calibrated FX simulation as ONNX (dynamic batch), atomically; ``sim`` is not changed.

    Args:
        sim: a :func:`zq_plugin.quantize_fx` / :func:`zq_plugin.quantize` (FX) result.
        example: one input batch ``[N, C, H, W]`` on the model's device.
        path: the ``.onnx`` file to write (folders are created).

    Returns:
        ``path``.

    Raises:
        MissingDependencyError: onnx / onnxscript are not installed (``pip install 'zq-plugin[onnx]'``).
        ModelError: the exporter refused the model (its reason is named).

    Example:
        >>> import tempfile, torch, zq_plugin
        >>> from zq_plugin.backends.brevitas import run_onnx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 3)).eval()
        >>> sim = zq_plugin.quantize_fx(net, torch.randn(16, 1, 8, 8), w_bits=4, a_bits=4)
        >>> x = torch.randn(5, 1, 8, 8)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     got = run_onnx(export_onnx(sim, x[:2], f"{tmp}/sim.onnx"), x)
        >>> bool(torch.allclose(got, sim(x), atol=1e-5))
        True
    """
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript ({err}): pip install 'zq-plugin[onnx]'."
        ) from err
    from zq_plugin.data import atomic_write

    frozen = copy.deepcopy(sim).eval()
    for module in list(frozen.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _compat.FakeQuantize):
                setattr(module, name, _FrozenFakeQuant(child))
    example = example.repeat(2, *[1] * (example.dim() - 1)) if example.shape[0] == 1 else example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's progress notes
            program = torch.onnx.export(
                frozen, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
            )
    except Exception as exc:  # the exporter raises many kinds; name its reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"torch.onnx.export could not export the simulation ({type(exc).__name__}: {first}).") from exc
    if program is None:
        raise ModelError("torch.onnx.export returned no ONNX program; export with torch's own torch.onnx.export.")
    proto = program.model_proto
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return Path(path)
