"""Weight-side corrections on a calibrated Brevitas model: bias correction and GPTQ."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from zq_plugin._utils import eval_mode, input_placement
from zq_plugin.backends.brevitas.calibrate import _batches, _failed, _init_weight_scales
from zq_plugin.backends.brevitas.layers import _brevitas, _quant_layers, uncalibrated
from zq_plugin.data import CalibrationData
from zq_plugin.errors import NotCalibratedError


def bias_correct(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Shift each quant layer's bias by its mean output error over ``data`` (bias correction); returns ``model``.

    As Brevitas's ``bias_correction_mode``: each layer runs once quantized and once in float on
    the same (float) input, the float output goes on (errors do not pile up), and the bias
    absorbs the mean of ``float - quantized`` per output channel. The channel is axis 1 of a
    Conv/ConvTranspose output and the **last** axis of a Linear output, whatever its rank (a
    Linear on ``[N, H, W, C]``, the ConvNeXt MLP, is corrected over ``N, H, W``). The mean is
    over every element of every batch. Hooks are removed and no bias changes unless every
    batch ran.

    Raises:
        NotCalibratedError: the model has not been calibrated.
        ConfigError: no batch, or NaN/Inf in the data.
        ModelError: the model fails on a batch (the model is left as it was).
    """
    b = _brevitas()
    missing = uncalibrated(model)
    if missing:
        raise NotCalibratedError(f"calibrate the model before bias correction ({missing[0]!r} has no range).")
    batches = _batches(model, data, batch_size)
    layers = _quant_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def correct(name: str, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        off = {"disable_act_quant": True, "disable_weight_quant": True, "disable_bias_quant": True}
        with b["status_manager"](module, is_training=False, **off):
            ref = module.forward(*args)  # .forward, not __call__: no hook recursion
        dim = ref.dim() - 1 if isinstance(module, nn.Linear) else 1
        err = (ref - output).movedim(dim, -1).reshape(-1, ref.shape[dim])  # [elements, channels]
        sums[name] = sums.get(name, 0) + err.sum(0, dtype=torch.float64)
        counts[name] = counts.get(name, 0) + err.shape[0]
        return ref

    handles = [layer.register_forward_hook(functools.partial(correct, name)) for name, layer in layers]
    index = 0
    try:
        with eval_mode(model), torch.no_grad():
            for x in batches:
                model(x)
                index += 1
    except Exception as exc:
        batch = batches[index] if index < len(batches) else None
        raise _failed("bias correction", index, exc, "no bias was changed and no hook is left.", batch) from exc
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, layer in layers:
            if counts.get(name):
                correction = sums[name] / counts[name]
                if layer.bias is None:  # a layer built outside to_brevitas
                    layer.bias = nn.Parameter(torch.zeros_like(correction, dtype=layer.weight.dtype))
                layer.bias.add_(correction.to(layer.bias.dtype))
    return model


def gptq(model: nn.Module, data: CalibrationData, *, batch_size: int = 64) -> nn.Module:
    """Brevitas's GPTQ on every quant layer over ``data`` (float inputs to each layer); returns ``model``.

    Call it after :func:`calibrate` (and before :func:`bias_correct`). Its Hessians live on the
    model's device.
    """
    _brevitas()
    gptq_mode = importlib.import_module("brevitas.graph.gptq").gptq_mode
    batches = _batches(model, data, batch_size)
    _init_weight_scales(model)  # fixed before GPTQ moves the weights
    with (
        eval_mode(model),
        torch.no_grad(),
        gptq_mode(model, use_quant_activations=False, device=str(input_placement(model)[0])) as g,
    ):
        for _ in range(g.num_layers):
            for x in batches:
                g.model(x)
            g.update()
    return model
