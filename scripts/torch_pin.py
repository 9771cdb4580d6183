"""Print the pip constraint for torch that ``scripts/bootstrap.sh`` installs with.

A torch already installed in the environment is kept when pyproject's range admits it (for
example a CPU build a user installed from the PyTorch project's CPU index, or a CUDA build
they need); otherwise the pin of ``constraints.txt`` is used. Also prints the matching
torchvision version: torchvision 0.(minor + 15).patch goes with torch 2.minor.patch up to 2.14;
from torch 2.15 on, PyPI's torchvision is one wheel for every Python built on torch's stable ABI
(``torch>=2.14``), and its releases no longer follow torch's minor version (``_VISION``).

Usage: ``python scripts/torch_pin.py [INSTALLED_VERSION]`` prints two lines,
``torch==X`` and ``torchvision==Y``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# torch (major, minor) -> torchvision, where the 0.(minor + 15).patch rule does not hold. torch 2.15.0
# shipped with torchvision 0.29.2 (uploaded to PyPI the same day; py3-none wheel, _C_stable.so,
# requires torch>=2.14.0); there is no torchvision 0.30.
_VISION = {(2, 15): "0.29.2"}


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release and local tags are ignored."""
    match = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def supported_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(lower, upper)`` of pyproject's ``torch>=lower,<upper``."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"torch>=([\d.]+),<([\d.]+)"', text)
    if match is None:
        raise SystemExit('torch_pin: pyproject.toml has no "torch>=A,<B" requirement')
    return _release(match.group(1)), _release(match.group(2))


def pinned() -> str:
    """The version pinned in constraints.txt."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip().removeprefix("torch==")
    raise SystemExit("torch_pin: constraints.txt pins no torch")


def choose(installed: str | None) -> tuple[str, str]:
    """``(torch, torchvision)`` versions: the installed torch when in range, else the pin."""
    lower, upper = supported_range()
    keep = bool(installed) and lower <= _release(installed or "") < upper
    torch_version = installed if keep and installed else pinned()
    major, minor, patch = (*_release(torch_version), 0, 0, 0)[:3]
    vision = _VISION.get((major, minor)) or (f"0.{minor + 15}.{patch}" if major == 2 else "")
    return torch_version, vision


if __name__ == "__main__":
    torch_version, vision = choose(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)
    print(f"torch=={torch_version}")
    print(f"torchvision=={vision}" if vision else "")
