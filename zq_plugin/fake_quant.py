"""FastFakeQuantize: torch.ao's FakeQuantize with a faster inference path, same numbers.

torch's fused CPU kernel (``fake_quantize_per_tensor_affine_cachemask``) is 4-7x slower than
a few in-place elementwise ops on activation-sized tensors (benchmarks/fake_quant.py); in a clamping FX
simulation it dominates evaluation time. When no gradient is needed, the observer is off and
fake quantization is on, this class computes ``qparams.fake_quantize`` instead: the same
formula, ``(clamp(round(x * (1/s)) + zp, qmin, qmax) - zp) * s``, with results equal to
torch's kernel (tested). In every other state it is exactly torch's FakeQuantize.

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

import torch

from zq_plugin._compat import FakeQuantize
from zq_plugin.qparams import fake_quantize


class FastFakeQuantize(FakeQuantize):
    """Drop-in ``FakeQuantize`` (same constructor) with an in-place no-grad path."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe and/or fake-quantize ``X`` exactly like ``FakeQuantize.forward``."""
        if (
            (torch.is_grad_enabled() and X.requires_grad)
            or self.is_dynamic
            or bool(self.observer_enabled[0] == 1)
            or bool(self.fake_quant_enabled[0] != 1)
        ):
            return super().forward(X)
        axis = self.ch_axis if self.is_per_channel else None
        return fake_quantize(X, self.scale, self.zero_point, self.quant_min, self.quant_max, axis=axis)
