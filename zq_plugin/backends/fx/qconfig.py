"""QConfigs for W/A bits: :func:`qconfig` and the uniform mapping (first and last layer apart)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zq_plugin import _compat
from zq_plugin._utils import weight_layer_names
from zq_plugin.errors import ConfigError
from zq_plugin.fake_quant import FastFakeQuantize
from zq_plugin.qparams import check_bits, quant_range


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
        from zq_plugin.nonuniform import NonUniformFakeQuantize

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
