"""Backends turn a float model plus calibration data into a calibrated quantized model.

A backend only sees data (a loader, a tensor or a SyntheticDataset); it never knows which
synthesizer made it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved_names(module: str, moved: dict[str, str], *, backend: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves names moved to a higher layer, with a DeprecationWarning.

    ``moved`` maps each old name to the module that holds it now; the import happens on first use,
    so the backend module itself imports nothing above it.
    """

    def __getattr__(name: str) -> Any:
        if name in moved:
            warnings.warn(
                f"{module}.{name} moved: use zq_plugin.{name} or "
                f"zq_plugin.quantize(..., backend='{backend}', stage='reconstruct').",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def carried_counts(steps: Mapping[str, Mapping[str, str]]) -> dict[str, int]:
    """How many steps a carrier took from the simulation: the one count every result reports.

    Args:
        steps: ``layer -> {"weight": how, "input": how}`` as a ``from_sim`` records it
            (``how``: ``"carried"`` or ``"calibrated"``).

    Returns:
        ``{"weight_steps": carried weight steps, "act_steps": carried input steps, "layers": layers}``.

    Example:
        >>> carried_counts({"conv": {"weight": "carried", "input": "calibrated"}})
        {'weight_steps': 1, 'act_steps': 0, 'layers': 1}
    """
    return {
        "weight_steps": sum(how.get("weight") == "carried" for how in steps.values()),
        "act_steps": sum(how.get("input") == "carried" for how in steps.values()),
        "layers": len(steps),
    }
