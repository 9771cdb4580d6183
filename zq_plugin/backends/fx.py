"""torch.ao.quantization FX backend: QConfigs for W/A bits, a calibrator, and a faithful low-bit simulation.

Two ways in:

1. **Your own flow, our data.** Prepare the model yourself (``prepare_fx`` or
   ``prepare_qat_fx``) and call :func:`calibrate` with any loader; it runs the model in
   eval/no-grad mode and restores its mode.
2. **One call.** :func:`quantize_fx` builds the mapping for uniform W/A bits, prepares with
   ``prepare_qat_fx`` (eval mode: BN folded with running statistics, weights fake-quantized),
   calibrates and returns a model whose fake quantization **clamps to quant_min/quant_max**.
   ``convert_fx`` does not clamp (integration-notes §1.2) and must not be used to measure
   accuracy below 8 bits; :func:`convert_int8_fx` gives the real int8 model at 8 bits.

Conventions of the uniform mapping: weights per-channel symmetric on a *narrow* range
(``[-(2^(b-1)-1), 2^(b-1)-1]``, a grid symmetric around 0); activations per-tensor affine
``[0, 2^b - 1]``. Affine activations represent the signed image input exactly (the zero
point shifts the grid, so negative pixels are not clipped). The first and last Conv/Linear
(in execution order) keep ``first_last_bits`` for their weights and their outputs; FX
attaches activation bits to a layer's *output* (integration-notes §1.3), so the first layer's
setting also quantizes the image, and the last layer's input keeps the bits of its producer.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10)).eval()
    >>> sim = quantize_fx(net, torch.randn(32, 1, 8, 8), w_bits=4, a_bits=4)
    >>> sim(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import WEIGHT_LAYERS as WEIGHT_LAYERS  # re-exported: part of this module's API
from zq_plugin._utils import eval_mode
from zq_plugin._utils import weight_layer_names as weight_layer_names
from zq_plugin.data import CalibrationData, iter_batches
from zq_plugin.errors import ConfigError
from zq_plugin.fake_quant import FastFakeQuantize
from zq_plugin.qparams import check_bits, quant_range

logger = logging.getLogger(__name__)


def calibrate(
    prepared: nn.Module, data: CalibrationData, *, batch_size: int = 64, max_batches: int | None = None
) -> nn.Module:
    """Run a prepared model over calibration data so its observers record ranges.

    Runs in eval mode (BN running statistics are not updated, even for a ``prepare_qat_fx``
    model) and under ``torch.no_grad``; each module's ``training`` flag is restored afterwards.
    Observer and fake-quant switches are left as the caller set them.

    Args:
        prepared: the output of ``prepare_fx`` / ``prepare_qat_fx`` (or any module).
        data: a SyntheticDataset, a DataLoader, a tensor ``[N, C, H, W]`` or an iterable of batches.
        batch_size: used when ``data`` is a tensor or a SyntheticDataset.
        max_batches: stop after this many batches.

    Returns:
        ``prepared`` itself.

    Raises:
        ConfigError: no batches, or a batch with NaN/Inf.
    """
    seen = 0
    with eval_mode(prepared), torch.no_grad():
        for x in iter_batches(data, batch_size):
            if max_batches is not None and seen >= max_batches:
                break
            if not torch.isfinite(x).all():
                raise ConfigError(f"calibration batch {seen} contains NaN or Inf; clean the data first.")
            prepared(x)
            seen += 1
    if seen == 0:
        raise ConfigError("the calibration data yielded no batch; pass at least one sample.")
    logger.debug("calibrated on %d batches", seen)
    return prepared


def qconfig(
    w_bits: int,
    a_bits: int,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    fake_quant: bool = True,
    granularity: str = "per_channel",
    grid: str = "uniform",
    tensor_weight_observer: Any = None,
) -> Any:
    """A ``QConfig`` for ``w_bits``-bit weights and ``a_bits``-bit activations.

    Weights: symmetric, narrow signed range, ``qint8`` container; per output channel
    (``ch_axis=0``) or per tensor; on a uniform grid or on the clustered non-uniform grid of
    :class:`zq_plugin.mixed_precision.nonuniform.NonUniformFakeQuantize` (fake quantization only).
    Activations: per-tensor affine ``[0, 2^a_bits - 1]``, ``quint8`` container.

    Args:
        w_bits: weight bits, 2 to 8.
        a_bits: activation bits, 2 to 8.
        act_observer: observer class for activations (default torch's ``MinMaxObserver``).
        weight_observer: per-channel observer class for weights (default ``PerChannelMinMaxObserver``).
        fake_quant: wrap both in :class:`FastFakeQuantize` (for ``prepare_qat_fx``) instead of bare observers.
        granularity: ``"per_channel"`` or ``"per_tensor"`` weights.
        grid: ``"uniform"`` or ``"nonuniform"`` weights.
        tensor_weight_observer: per-tensor observer class for weights (default ``MinMaxObserver``).
    """
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    if granularity not in ("per_channel", "per_tensor") or grid not in ("uniform", "nonuniform"):
        raise ConfigError(
            f"granularity={granularity!r}, grid={grid!r}: use 'per_channel'/'per_tensor' and 'uniform'/'nonuniform'."
        )
    per_channel = granularity == "per_channel"
    act_observer = act_observer or _compat.MinMaxObserver
    if per_channel:
        weight_observer = weight_observer or _compat.PerChannelMinMaxObserver
    else:
        weight_observer = tensor_weight_observer or _compat.MinMaxObserver
    a_min, a_max = quant_range(a_bits, signed=False)
    w_min, w_max = quant_range(w_bits, signed=True, narrow=True)
    act_kw = {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "quant_min": a_min, "quant_max": a_max}
    w_kw: dict[str, Any] = {"dtype": torch.qint8, "quant_min": w_min, "quant_max": w_max}
    w_kw.update(
        {"qscheme": torch.per_channel_symmetric, "ch_axis": 0}
        if per_channel
        else {"qscheme": torch.per_tensor_symmetric}
    )
    if grid == "nonuniform":
        if not fake_quant:
            raise ConfigError(
                "a non-uniform weight grid exists only as fake quantization: use fake_quant=True and prepare_qat_fx."
            )
        from zq_plugin.mixed_precision.nonuniform import NonUniformFakeQuantize

        weight = NonUniformFakeQuantize.with_args(bits=w_bits, per_channel=per_channel)
        return _compat.QConfig(activation=FastFakeQuantize.with_args(observer=act_observer, **act_kw), weight=weight)
    if fake_quant:
        return _compat.QConfig(
            activation=FastFakeQuantize.with_args(observer=act_observer, **act_kw),
            weight=FastFakeQuantize.with_args(observer=weight_observer, **w_kw),
        )
    return _compat.QConfig(activation=act_observer.with_args(**act_kw), weight=weight_observer.with_args(**w_kw))


def uniform_qconfig_mapping(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    *,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    fake_quant: bool = True,
) -> Any:
    """A ``QConfigMapping``: global W/A bits, first and last Conv/Linear at ``first_last_bits``.

    Built from ``set_global`` and ``set_module_name`` only, so torch.ao's own precedence applies.
    ``first_last_bits=None`` quantizes every layer at ``w_bits``/``a_bits``.
    """
    kw = {"act_observer": act_observer, "weight_observer": weight_observer, "fake_quant": fake_quant}
    mapping = _compat.QConfigMapping().set_global(qconfig(w_bits, a_bits, **kw))
    if first_last_bits is not None:
        check_bits(first_last_bits, "first_last_bits")
        names = weight_layer_names(model)
        if not names:
            raise ConfigError(f"{type(model).__name__} has no Conv/Linear layer to quantize.")
        for name in {names[0], names[-1]}:
            mapping.set_module_name(name, qconfig(first_last_bits, first_last_bits, **kw))
    return mapping


def _example_inputs(data: CalibrationData, batch_size: int) -> tuple[torch.Tensor]:
    if isinstance(data, Iterator):
        raise ConfigError(
            "the calibration data is a one-shot iterator, but it is read twice (an example input for tracing, "
            "then calibration); pass a list, a tensor, a DataLoader or a SyntheticDataset."
        )
    try:
        first = next(iter(iter_batches(data, batch_size)))
    except StopIteration:
        raise ConfigError("the calibration data yielded no batch; pass at least one sample.") from None
    return (first[:1],)


def _folded_float_module(qat: nn.Module) -> nn.Module | None:
    """A float Conv/Linear (+ReLU) equal to an eval-mode QAT module, with its fake-quantized weight baked in.

    For a ConvBn QAT module in eval mode torch computes ``bn(conv(x, fq(w * f)) / f + b)`` with
    ``f = gamma / sqrt(running_var + eps)``, which equals ``conv(x, fq(w * f)) + (b - mean) * f + beta``:
    a plain conv with the fake-quantized folded weight and the folded bias. Returns None for
    modules of another kind.
    """
    wfq = getattr(qat, "weight_fake_quant", None)
    weight = getattr(qat, "weight", None)
    if wfq is None or not isinstance(weight, torch.Tensor):
        return None
    raw_bias = getattr(qat, "bias", None)
    bias: torch.Tensor | None = raw_bias if isinstance(raw_bias, torch.Tensor) else None
    bn = getattr(qat, "bn", None)
    with torch.no_grad():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
            factor = bn.weight / torch.sqrt(var + bn.eps)  # [C_out]
            shape = [-1] + [1] * (weight.dim() - 1)
            weight = cast(torch.Tensor, wfq(weight * factor.reshape(shape)))
            base = bias if bias is not None else torch.zeros_like(factor)
            bias = (base - mean) * factor + bn.bias
        else:
            weight = cast(torch.Tensor, wfq(weight))
    plain: nn.Linear | nn.modules.conv._ConvNd
    if isinstance(qat, nn.Linear):
        plain = nn.Linear(qat.in_features, qat.out_features, bias=bias is not None)
    elif isinstance(qat, nn.modules.conv._ConvNd):
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(qat.kernel_size)]
        plain = conv_cls(
            qat.in_channels,
            qat.out_channels,
            qat.kernel_size,  # type: ignore[arg-type]
            stride=qat.stride,  # type: ignore[arg-type]
            padding=qat.padding,  # type: ignore[arg-type]
            dilation=qat.dilation,  # type: ignore[arg-type]
            groups=qat.groups,
            bias=bias is not None,
            padding_mode=qat.padding_mode,
        )
    else:
        return None
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None and plain.bias is not None:
            plain.bias.copy_(bias)
    if "ReLU" in type(qat).__name__:
        return nn.Sequential(plain, nn.ReLU())
    return plain


def fold_weights(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each QAT Conv/Linear (BN folded or not) by a float module holding its fake-quantized weight.

    Outputs are unchanged up to float rounding; inference is faster (no per-pass weight fake
    quantization, BN, or unscaling). Activation FakeQuantize modules stay. Not for fine-tuning.
    """
    for name, module in list(model.named_modules()):
        plain = _folded_float_module(module)
        if plain is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    model.recompile()
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stop observing and turn fake quantization on, for every FakeQuantize of ``model``."""
    model.apply(_compat.disable_observer)
    model.apply(_compat.enable_fake_quant)
    return model


def quantize_fx(
    model: nn.Module,
    data: CalibrationData,
    *,
    w_bits: int = 8,
    a_bits: int = 8,
    first_last_bits: int | None = 8,
    act_observer: Any = None,
    weight_observer: Any = None,
    mapping: Any = None,
    batch_size: int = 64,
    fold: bool = True,
) -> torch.fx.GraphModule:
    """Quantize a copy of ``model`` at W``w_bits``A``a_bits`` in a clamping FX simulation.

    ``prepare_qat_fx`` on an eval-mode deep copy (BN folded with running statistics), calibration
    with float statistics (observers on, fake quantization off), then observers off and fake
    quantization on. The result stays in eval mode; its outputs honour quant_min/quant_max at
    every bit width. The source model is not changed.

    Args:
        model: float model.
        data: calibration data (any source).
        w_bits: weight bits of all but the first/last layer.
        a_bits: activation bits of all but the first/last layer.
        first_last_bits: bits of the first and last Conv/Linear (``None``: no exception).
        act_observer: activation observer class (default ``MinMaxObserver``).
        weight_observer: weight observer class (default ``PerChannelMinMaxObserver``).
        mapping: a ready ``QConfigMapping`` of FakeQuantize qconfigs, overriding the bit arguments.
        batch_size: calibration batch size for tensor data.
        fold: after calibration, replace the QAT Conv/Linear modules by float ones holding the
            BN-folded, fake-quantized weights (:func:`fold_weights`: same outputs up to float
            rounding, faster). ``False`` keeps the QAT modules, e.g. to fine-tune.
    """
    if mapping is None:
        mapping = uniform_qconfig_mapping(
            model,
            w_bits,
            a_bits,
            first_last_bits=first_last_bits,
            act_observer=act_observer,
            weight_observer=weight_observer,
        )
    float_model = copy.deepcopy(model).eval()
    prepared = _compat.prepare_qat_fx(float_model, mapping, _example_inputs(data, batch_size)).eval()
    prepared.apply(_compat.enable_observer)
    prepared.apply(_compat.disable_fake_quant)
    calibrate(prepared, data, batch_size=batch_size)
    freeze(prepared)
    return fold_weights(prepared) if fold else prepared


def convert_int8_fx(
    model: nn.Module,
    data: CalibrationData,
    *,
    act_observer: Any = None,
    weight_observer: Any = None,
    batch_size: int = 64,
) -> torch.fx.GraphModule:
    """A real int8 model (torch's quantized CPU kernels) from ``prepare_fx`` + calibration + ``convert_fx``.

    Only 8 bits: ``convert_fx`` ignores narrower quant_min/quant_max, so lower bit widths
    would silently run at more levels than asked. Every layer, first and last included, is W8A8.
    """
    mapping = uniform_qconfig_mapping(
        model, 8, 8, first_last_bits=None, act_observer=act_observer, weight_observer=weight_observer, fake_quant=False
    )
    prepared = _compat.prepare_fx(copy.deepcopy(model).eval(), mapping, _example_inputs(data, batch_size))
    calibrate(prepared, data, batch_size=batch_size)
    return _compat.convert_fx(prepared)
