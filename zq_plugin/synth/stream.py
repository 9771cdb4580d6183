"""A trained conditional generator as a streaming, seeded data source.

:class:`GeneratorStream` wraps a generator trained by :func:`zq_plugin.finetune` (AdaDFQ or
GDFQ's game) with what it needs to sample: latent size, class count, the input box, the
low-pass option. It is a ``torch.utils.data.IterableDataset`` of ``(images, labels)`` batches
(``[B, C, H, W]`` float32, ``[B]`` int64): batch ``b`` is drawn from its own seed
``hash(seed, b)``, so a stream gives the same batches on every pass, in any process, and a
``DataLoader`` with workers splits the batches between them without repeating one. Hand it to
:func:`zq_plugin.calibrate`, to reconstruction or to your own loop like any loader; save it
with :meth:`GeneratorStream.save` and read it back with :meth:`GeneratorStream.load` (a
``weights_only`` file, checked against the model it was trained for).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zq_plugin.data import atomic_torch_save, model_fingerprint
from zq_plugin.errors import ConfigError, DataMismatchError, DatasetCorruptError, DatasetNotFoundError
from zq_plugin.synth.adadfq import ConditionalGenerator, generate

FORMAT = "zq_plugin.generator"
FORMAT_VERSION = 1


class GeneratorStream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fresh, seeded ``(images, labels)`` batches from a trained conditional generator.

    Args:
        generator: a :class:`~zq_plugin.synth.adadfq.ConditionalGenerator` (copied; not changed).
        method: the game that trained it (``"adadfq"``, ``"gdfq"``).
        batch_size: images per batch.
        num_batches: batches per pass; ``None``: endless (for training loops; ``calibrate``
            needs a finite stream).
        seed: batch ``b`` uses the seed ``hash(seed, b)``.
        input_range: the model's valid input box; images are clamped to it.
        lowpass: SynQ's low-pass filter (:func:`~zq_plugin.synth.adadfq.low_pass`), as in training.
        model_fingerprint: :func:`zq_plugin.data.model_fingerprint` of the model it was trained for.
        options: the training options, as plain values (kept in the file).

    Example:
        >>> g = ConditionalGenerator((1, 8, 8), num_classes=3, latent_dim=4, width=8)
        >>> stream = GeneratorStream(g, method="adadfq", batch_size=5, num_batches=2)
        >>> [tuple(x.shape) for x, y in stream]
        [(5, 1, 8, 8), (5, 1, 8, 8)]
        >>> torch.equal(next(iter(stream))[0], next(iter(stream))[0])  # seeded: the same on every pass
        True
    """

    def __init__(
        self,
        generator: ConditionalGenerator,
        *,
        method: str,
        batch_size: int = 64,
        num_batches: int | None = 4,
        seed: int = 0,
        input_range: tuple[float, float] | None = None,
        lowpass: float | None = None,
        model_fingerprint: str = "",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(generator, ConditionalGenerator):
            raise ConfigError(f"GeneratorStream takes a ConditionalGenerator, not {type(generator).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive int.")
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ConfigError(f"num_batches={num_batches!r} must be a positive int or None (endless).")
        import copy

        self.generator = copy.deepcopy(generator).cpu().float().train()  # BN on batch statistics, as trained
        self.generator.requires_grad_(False)
        self.method, self.batch_size, self.num_batches, self.seed = method, batch_size, num_batches, seed
        self.input_range, self.lowpass = input_range, lowpass
        self.model_fingerprint, self.options = model_fingerprint, dict(options or {})

    def __repr__(self) -> str:
        shape = (self.generator.conv3.out_channels, *self.generator.out_hw)
        return (
            f"GeneratorStream(method={self.method!r}, shape={shape}, classes={self.generator.num_classes}, "
            f"batch_size={self.batch_size}, num_batches={self.num_batches}, seed={self.seed})"
        )

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index``: images ``[batch_size, C, H, W]`` float32 and labels ``[batch_size]`` int64 (CPU)."""
        from zq_plugin.synth.api import batch_seed

        gen = torch.Generator().manual_seed(batch_seed(self.seed, index))
        z = torch.randn(self.batch_size, self.generator.latent_dim, generator=gen)
        labels = torch.randint(0, self.generator.num_classes, (self.batch_size,), generator=gen)
        with torch.no_grad():
            x = generate(self.generator, z, labels, input_range=self.input_range, lowpass=self.lowpass)
        return x, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        start, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        index = start
        while self.num_batches is None or index < self.num_batches:
            yield self.batch(index)
            index += step

    def loader(self, **kwargs: Any) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        """A ``DataLoader`` over the stream's batches (already batched: ``batch_size=None``)."""
        return DataLoader(self, batch_size=None, **kwargs)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the generator's weights and metadata to ``path`` atomically (a ``weights_only`` file)."""
        g = self.generator
        atomic_torch_save(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "state": {k: v.detach().cpu() for k, v in g.state_dict().items()},
                "shape": [g.conv3.out_channels, *g.out_hw],
                "num_classes": g.num_classes,
                "latent_dim": g.latent_dim,
                "width": g.width,
                "method": self.method,
                "batch_size": self.batch_size,
                "num_batches": self.num_batches,
                "seed": self.seed,
                "input_range": None if self.input_range is None else list(self.input_range),
                "lowpass": self.lowpass,
                "model_fingerprint": self.model_fingerprint,
                "options": self.options,
            },
            path,
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], model: nn.Module | None = None, *, allow_mismatch: bool = False
    ) -> GeneratorStream:
        """Read a file written by :meth:`save`.

        Raises:
            DatasetNotFoundError: no such file.
            DatasetCorruptError: not a generator file of this format.
            DataMismatchError: trained for another model (and ``allow_mismatch`` is False).
        """
        path = Path(path)
        if not path.is_file():
            raise DatasetNotFoundError(f"no generator file at {path}; write one with GeneratorStream.save(path).")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            g = ConditionalGenerator(tuple(blob["shape"]), blob["num_classes"], blob["latent_dim"], blob["width"])
            g.load_state_dict(blob["state"])
        except Exception as exc:
            raise DatasetCorruptError(
                f"{path} is not a readable zq generator file ({type(exc).__name__}: {exc}); write it again with "
                "GeneratorStream.save(path)."
            ) from exc
        if model is not None and not allow_mismatch and blob["model_fingerprint"] != model_fingerprint(model):
            raise DataMismatchError(
                f"{path} holds a generator trained for another model's weights; train one for this model "
                "(zq_plugin.finetune) or pass allow_mismatch=True."
            )
        box = blob["input_range"]
        return cls(
            g,
            method=blob["method"],
            batch_size=blob["batch_size"],
            num_batches=blob["num_batches"],
            seed=blob["seed"],
            input_range=None if box is None else (float(box[0]), float(box[1])),
            lowpass=blob["lowpass"],
            model_fingerprint=blob["model_fingerprint"],
            options=blob["options"],
        )
