"""Run keys and the process group: what every cached, resumable or distributed stage shares.

Neutral: synthesis batches, reconstruction and fine-tuning checkpoints are all keyed by
:func:`run_key` over their inputs and :func:`method_code_hash` of their code, so that a cache
made by other inputs or other code is never reused; :func:`dist_info` reads the torchrun group.

Example:
    >>> run_key(a=1, b=[2, 3]) == run_key(b=[2, 3], a=1)
    True
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import torch


def method_code_hash(fn: Any) -> str:
    """Hash of the source of the module defining ``fn``: a cache made by other code is not reused."""
    module = inspect.getmodule(fn)
    try:
        source = inspect.getsource(module) if module is not None else repr(fn)
    except (OSError, TypeError):  # no source (frozen or interactive code): fall back to the name
        source = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def run_key(**parts: Any) -> str:
    """A short stable hash of the JSON of ``parts`` (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
