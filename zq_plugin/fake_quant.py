"""FastFakeQuantize: torch.ao's FakeQuantize with a faster inference path, same numbers.

torch's fused CPU kernel (``fake_quantize_per_tensor_affine_cachemask``) is 4-7x slower than
a few in-place elementwise ops on activation-sized tensors (benchmarks/fake_quant.py); in a clamping FX
simulation it dominates evaluation time. When no gradient is needed, the observer is off and
fake quantization is on, this class computes ``qparams.fake_quantize`` instead: the same
formula, ``(clamp(round(x * (1/s)) + zp, qmin, qmax) - zp) * s``, with results equal to
torch's kernel (tested).

**Calibration without a search per batch.** torch's ``FakeQuantize.forward`` calls
``calculate_qparams()`` on every forward while its observer is enabled, so a search-based
observer (:mod:`zq_plugin.observers`) would run its search once per calibration batch. While the
observer is on and fake quantization is off (the calibration phase of
:func:`zq_plugin.backends.fx.quantize_fx`), this class only feeds the observer and marks its
``scale``/``zero_point`` stale; they are computed once, when the observer is switched off,
fake quantization is switched on, the state dict is saved, or a forward needs them. With
both switched on (QAT-style observing) it behaves exactly like torch, one search per forward.

Example:
    >>> import torch
    >>> fq = FastFakeQuantize(quant_min=0, quant_max=15)
    >>> _ = fq(torch.linspace(0, 3, 100))  # observe
    >>> fq.disable_observer()
    >>> with torch.no_grad():
    ...     len(torch.unique(fq(torch.linspace(-1, 4, 1000))))
    16
"""

from __future__ import annotations

from typing import Any

import torch

from zq_plugin._compat import FakeQuantize
from zq_plugin.qparams import fake_quantize


class FastFakeQuantize(FakeQuantize):
    """Drop-in ``FakeQuantize`` (same constructor) with an in-place no-grad path and deferred qparams.

    ``torch.jit.script`` works as for torch's ``FakeQuantize`` when the observer is scriptable
    (torch's own); with a zq_plugin observer it raises :class:`~zq_plugin.errors.ModelError` naming
    the observer (their statistics are Python code). The scripted module computes the same values.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Same arguments as ``torch.ao.quantization.FakeQuantize``."""
        super().__init__(*args, **kwargs)
        self._stale: bool = False  # set here, not as a class annotation: TorchScript reads those

    def sync_qparams(self) -> None:
        """Compute ``scale``/``zero_point`` from the observer now if observations arrived since the last time."""
        if not self._stale:
            return
        self._stale = False
        self._update_qparams()

    def _update_qparams(self) -> None:
        scale, zero_point = self.calculate_qparams()
        scale, zero_point = scale.to(self.scale.device), zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    @torch.jit.export
    def enable_observer(self, enabled: bool = True) -> None:
        """Switch observing; switching it off settles the deferred qparams."""
        if not enabled:
            self.sync_qparams()
        self.observer_enabled[0] = 1 if enabled else 0  # FakeQuantizeBase's; no super() in TorchScript

    @torch.jit.export
    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Switch fake quantization; switching it on settles the deferred qparams."""
        if enabled:
            self.sync_qparams()
        self.fake_quant_enabled[0] = 1 if enabled else 0

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.sync_qparams()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize ``X`` with ``FakeQuantize.forward``'s results."""
        observing = bool(self.observer_enabled[0] == 1)
        quantizing = bool(self.fake_quant_enabled[0] == 1)
        if observing and not quantizing:
            self.activation_post_process(X.detach())
            self._stale = True
            return X
        self.sync_qparams()
        if (torch.is_grad_enabled() and X.requires_grad) or self.is_dynamic or observing or not quantizing:
            return self._torch_forward(X, observing, quantizing)
        axis: int | None = None
        if self.is_per_channel:
            axis = self.ch_axis
        return fake_quantize(X, self.scale, self.zero_point, self.quant_min, self.quant_max, axis=axis)

    def _torch_forward(self, X: torch.Tensor, observing: bool, quantizing: bool) -> torch.Tensor:
        """What ``FakeQuantize.forward`` computes (written out: TorchScript cannot call ``super()``)."""
        if observing:
            self.activation_post_process(X.detach())
            self._update_qparams()
        if quantizing:
            if self.is_per_channel:
                return torch.fake_quantize_per_channel_affine(
                    X, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
                )
            return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return X
