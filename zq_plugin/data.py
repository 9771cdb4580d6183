"""SyntheticDataset: synthetic calibration images plus the metadata that made them.

Saved files are plain ``torch.save`` dictionaries of tensors, strings and numbers, written
atomically (temporary file in the same folder, then ``os.replace``) and read back with
``torch.load(weights_only=True)``. Each file records a fingerprint of the model's weights;
loading it for another model raises :class:`~zq_plugin.errors.DataMismatchError` unless
``allow_mismatch=True``.

Example:
    >>> import torch
    >>> data = SyntheticDataset(torch.zeros(8, 1, 4, 4), method="noise", seed=0)
    >>> [tuple(b.shape) for b in data.loader(batch_size=5)]
    [(5, 1, 4, 4), (3, 1, 4, 4)]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zq_plugin.errors import ConfigError, DataMismatchError, DatasetCorruptError, DatasetNotFoundError

FORMAT = "zq_plugin.SyntheticDataset"
FORMAT_VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 over the model's state_dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _new_file_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, else 0666 less the umask."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename: readers never see half a file.

    Parent folders are created; on any error (Ctrl-C included) the temporary file is removed
    and ``path`` is left as it was. The file gets the permissions ``open(path, "w")`` would give
    it: those of the file it replaces, else 0666 less the umask (0644 under the usual 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; give the mode open() would (umask, or the replaced file's)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _load_failure(exc: Exception) -> str:
    """What went wrong in a ``torch.load``, in a few words, without torch's ``weights_only=False`` advice."""
    text = str(exc)
    if "weights_only" in text or "Unpickl" in type(exc).__name__:
        return "not a torch.save file of tensors"
    if "not a ZIP archive" in text:
        return "not a torch.save file"
    if "zip archive" in text or isinstance(exc, OSError | EOFError):  # e.g. no central directory, [Errno 22]
        return "the file ends early or is damaged"
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


class SyntheticDataset(Dataset[torch.Tensor]):
    """Images ``[N, C, H, W]`` in the model's input space, with how they were made.

    Args:
        images: float32 ``[N, C, H, W]``.
        method: name of the synthesis method (``"zeroq"``, ``"noise"``, ...; ``"real"`` for real data).
        options: the method's options, as plain values.
        seed: the seed given to :func:`zq_plugin.synthesize`.
        model_fingerprint: :func:`model_fingerprint` of the model the data were made from ("" if none).
        labels: optional int64 ``[N]`` (class-targeted methods).
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        method: str,
        options: dict[str, Any] | None = None,
        seed: int | None = None,
        model_fingerprint: str = "",
        labels: torch.Tensor | None = None,
    ) -> None:
        if images.dim() < 2 or images.shape[0] == 0:
            raise ConfigError(f"images must be a non-empty [N, C, H, W] tensor, got shape {tuple(images.shape)}.")
        self.images = images.detach().to(torch.float32)
        self.labels = labels
        self.method = method
        self.options = dict(options or {})
        self.seed = seed
        self.model_fingerprint = model_fingerprint

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset(n={len(self)}, shape={tuple(self.images.shape[1:])}, method={self.method!r}, "
            f"seed={self.seed}, model={self.model_fingerprint or '?'})"
        )

    def loader(self, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0) -> DataLoader[torch.Tensor]:
        """A DataLoader yielding image batches ``[B, C, H, W]`` (shuffled reproducibly if asked)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1.")
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=gen)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write images and metadata to ``path`` atomically."""
        atomic_torch_save(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "images": self.images,
                "labels": self.labels,
                "method": self.method,
                "options": self.options,
                "seed": self.seed,
                "model_fingerprint": self.model_fingerprint,
            },
            path,
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: nn.Module | None = None, *, allow_mismatch: bool = False
    ) -> SyntheticDataset:
        """Read a file written by :meth:`save`.

        Args:
            path: the file.
            model: if given, the file must have been made for a model with the same weights.
            allow_mismatch: load even if the fingerprints differ.

        Raises:
            DatasetNotFoundError: no such file.
            DatasetCorruptError: not a SyntheticDataset file.
            DataMismatchError: made for another model (and ``allow_mismatch`` is False).
        """
        path = Path(path)
        if not path.is_file():
            raise DatasetNotFoundError(
                f"no synthetic dataset at {path}; create one with zq_plugin.synthesize(...).save(path)."
            )
        remake = "Re-create it with 'zq synthesize ... --out FILE' or SyntheticDataset.save(path)."
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's own text advises weights_only=False or says only "[Errno 22]"
            raise DatasetCorruptError(
                f"{path} is not a complete zq dataset file: torch cannot read it ({_load_failure(exc)}); it is "
                f"truncated, damaged or of another kind. {remake}"
            ) from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise DatasetCorruptError(
                f"{path} is a torch file but not a zq dataset file ({FORMAT}, written by SyntheticDataset.save). "
                f"{remake}"
            )
        data = cls(
            blob["images"],
            method=blob["method"],
            options=blob["options"],
            seed=blob["seed"],
            model_fingerprint=blob["model_fingerprint"],
            labels=blob["labels"],
        )
        if model is not None and not allow_mismatch:
            expected = model_fingerprint(model)
            if data.model_fingerprint != expected:
                raise DataMismatchError(
                    f"{path} was synthesized for a model with fingerprint {data.model_fingerprint!r}, but this "
                    f"model's weights give {expected!r}. Synthesize new data for this model, or pass "
                    "allow_mismatch=True to use it anyway."
                )
        return data


CalibrationData = SyntheticDataset | DataLoader[Any] | torch.Tensor | Iterable[Any]


def iter_batches(data: CalibrationData, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield input batches from a SyntheticDataset, a DataLoader, a tensor ``[N, ...]`` or an iterable.

    From a loader of ``(x, y)`` pairs only ``x`` is used.
    """
    batches: Iterable[Any]
    if isinstance(data, SyntheticDataset):
        batches = data.loader(batch_size)
    elif isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ConfigError(f"calibration tensor of shape {tuple(data.shape)} holds no samples.")
        batches = data.split(batch_size)
    else:
        batches = data
    for batch in batches:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"calibration batches must be tensors (or (x, y) pairs), got {type(x).__name__}.")
        yield x


def collect_batches(data: CalibrationData, batch_size: int = 64, max_batches: int | None = None) -> list[torch.Tensor]:
    """The batches of ``data`` (:func:`iter_batches`) as a list, for code that passes over them several times.

    Raises:
        ConfigError: no sample at all, or a batch with NaN/Inf.
    """
    batches: list[torch.Tensor] = []
    for x in iter_batches(data, batch_size):
        if max_batches is not None and len(batches) >= max_batches:
            break
        if not torch.isfinite(x).all():
            raise ConfigError(f"batch {len(batches)} of the data contains NaN or Inf; clean the data first.")
        batches.append(x)
    if sum(len(x) for x in batches) == 0:
        raise ConfigError(
            "the data yielded no sample (no batch): pass synthetic images (zq_plugin.synthesize), a tensor or a loader."
        )
    return batches
