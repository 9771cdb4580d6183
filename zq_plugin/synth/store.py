"""Finished batches on disk, and the split of batches across ``torch.distributed`` ranks.

A generation run is keyed by everything that determines its images: the model's weights
(fingerprint), the method, the source code of its module, its config, the seed, the batch size,
the input shape and the input box. Batch ``b`` of ``n`` images is the file ``<cache_dir>/<key>/batch-<b>-<n>.pt``,
written atomically when the batch is finished. A run that stops (exception, Ctrl-C, a killed
process) leaves only finished batches behind; the next run with the same key loads them and
generates the rest. Since batch ``b`` is a function of ``(seed, b, n)`` alone, the resumed
dataset equals the uninterrupted one, and asking for more samples reuses the batches already made.

Example:
    >>> import tempfile, torch
    >>> store = BatchStore(tempfile.mkdtemp(), "demo")
    >>> store.save(0, torch.zeros(2, 1, 4, 4))
    >>> images, labels = store.load(0, 2, (1, 4, 4))
    >>> images.shape, labels
    (torch.Size([2, 1, 4, 4]), None)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from zq_plugin.data import atomic_torch_save
from zq_plugin.runs import dist_info, method_code_hash, run_key

__all__ = ["BatchStore", "SynthesisInterrupted", "dist_info", "gather_batches", "method_code_hash", "run_key"]

logger = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor | None]  # images [n, ...], labels [n] or None


class SynthesisInterrupted(KeyboardInterrupt):
    """Ctrl-C during a cached :func:`~zq_plugin.synthesize` run: how many batches are kept, and where.

    A ``KeyboardInterrupt`` (``except KeyboardInterrupt`` still catches it); rerunning the same
    call with the same ``cache_dir`` loads the ``cached`` batches and makes the rest.
    """

    def __init__(self, cached: int, total: int, folder: Path) -> None:
        """Record ``cached`` finished batches of ``total`` in ``folder``."""
        super().__init__(f"{cached} of {total} batches cached in {folder}")
        self.cached, self.total, self.folder = cached, total, folder


class BatchStore:
    """Finished batches of one run under ``root / key``."""

    def __init__(self, root: str | os.PathLike[str], key: str) -> None:
        """Use the folder ``root/key`` (created on the first save)."""
        self.path = Path(root) / key

    def file(self, index: int, n: int) -> Path:
        """Path of batch ``index`` holding ``n`` images."""
        return self.path / f"batch-{index:06d}-{n}.pt"

    def count(self) -> int:
        """How many finished batch files the run's folder holds."""
        return len(list(self.path.glob("batch-*.pt"))) if self.path.is_dir() else 0

    def save(self, index: int, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write a finished batch ``[n, ...]`` (and its labels ``[n]``) atomically."""
        blob = {"images": images.detach().cpu(), "labels": None if labels is None else labels.cpu()}
        atomic_torch_save(blob, self.file(index, images.shape[0]))

    def load(self, index: int, n: int, input_shape: tuple[int, ...]) -> Batch | None:
        """The stored ``(images, labels)``, or None if absent or unreadable (then it is made again)."""
        path = self.file(index, n)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            images, labels = blob["images"], blob.get("labels")
        except Exception as exc:  # a damaged file is regenerated, never trusted
            logger.warning("ignoring unreadable cached batch %s (%s); it will be generated again", path, exc)
            return None
        if (
            not isinstance(images, torch.Tensor)
            or tuple(images.shape) != (n, *input_shape)
            or not bool(torch.isfinite(images).all())
            or (labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,)))
        ):
            logger.warning("ignoring cached batch %s with unexpected content; it will be generated again", path)
            return None
        return images, labels


def gather_batches(mine: dict[int, Batch]) -> dict[int, Batch]:
    """Every rank's ``{batch index: (images, labels)}`` merged, on every rank (identity without a group)."""
    _, world = dist_info()
    if world == 1:
        return dict(mine)
    parts: list[dict[int, Batch] | None] = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    merged: dict[int, Batch] = {}
    for part in parts:
        merged.update(part or {})
    return merged
