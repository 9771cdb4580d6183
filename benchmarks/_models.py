"""The models the benchmarks time: the zoo's by name, torchvision architectures as ``tv:NAME``.

``tv:NAME`` is a row of the conformance matrix (``tests/conformance.py``): random weights with
BatchNorm statistics warmed on noise, at ``size`` px, with its in-place ops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zq_plugin import zoo


def load(name: str, size: int = 32) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A zoo model, or ``tv:NAME`` from the conformance matrix's torchvision rows, and its input shape."""
    if not name.startswith("tv:"):
        return zoo.load(name), zoo.INPUT_SHAPE
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import conformance

    conformance.TORCHVISION[name[3:]] = (conformance.TORCHVISION[name[3:]][0], (3, size, size))
    return conformance.torchvision_model(name[3:])
