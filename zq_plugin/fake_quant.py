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
    """Drop-in ``FakeQuantize`` (same constructor) with an in-place no-grad path and deferred qparams."""

    _stale: bool = False

    def sync_qparams(self) -> None:
        """Compute ``scale``/``zero_point`` from the observer now if observations arrived since the last time."""
        if not self._stale:
            return
        self._stale = False
        scale, zero_point = self.calculate_qparams()
        scale, zero_point = scale.to(self.scale.device), zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def enable_observer(self, enabled: bool = True) -> None:
        """Switch observing; switching it off settles the deferred qparams."""
        if not enabled:
            self.sync_qparams()
        super().enable_observer(enabled)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Switch fake quantization; switching it on settles the deferred qparams."""
        if enabled:
            self.sync_qparams()
        super().enable_fake_quant(enabled)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.sync_qparams()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize ``X`` with ``FakeQuantize.forward``'s results."""
        if bool(self.observer_enabled[0] == 1) and bool(self.fake_quant_enabled[0] != 1):
            self.activation_post_process(X.detach())
            self._stale = True
            return X
        self.sync_qparams()
        if (
            (torch.is_grad_enabled() and X.requires_grad)
            or self.is_dynamic
            or bool(self.observer_enabled[0] == 1)
            or bool(self.fake_quant_enabled[0] != 1)
        ):
            return super().forward(X)
        axis = self.ch_axis if self.is_per_channel else None
        return fake_quantize(X, self.scale, self.zero_point, self.quant_min, self.quant_max, axis=axis)
