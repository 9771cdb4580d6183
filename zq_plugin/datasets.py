"""Fashion-MNIST from the IDX gzip files of Debian's ``dataset-fashion-mnist`` package.

The files are looked up in, by priority: the ``root`` argument, the environment variable
``ZQ_FASHION_MNIST_DIR``, then ``/usr/share/datasets/fashion-mnist`` (where the Debian package
puts them). Images come back normalized, ``(pixel / 255 - MEAN) / STD``, which is the input
space of every model in :mod:`zq_plugin.zoo`.

Example:
    >>> from zq_plugin import datasets
    >>> images, labels = datasets.load_fashion_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.shape  # doctest: +SKIP
    (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from zq_plugin.errors import ConfigError, DatasetCorruptError, DatasetNotFoundError

#: Fashion-MNIST's pixel mean and standard deviation (training split, pixels in [0, 1]): every
#: zoo model takes ``(x - MEAN) / STD``.
MEAN = 0.2860
STD = 0.3530
ENV_VAR = "ZQ_FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPE = {0x08: np.uint8}


def data_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory the reader uses: ``root``, else ``$ZQ_FASHION_MNIST_DIR``, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def _hint(path: Path) -> str:
    return (
        f"Install the Debian package ('apt-get install {DEBIAN_PACKAGE}', files go to {DEFAULT_DIR}), "
        f"or point the reader at a folder holding the four IDX .gz files with root=... or "
        f"the environment variable {ENV_VAR} (tried: {path})."
    )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode one gzip-compressed IDX file into a numpy array.

    The IDX header is two zero bytes, a dtype code (0x08 = uint8), the number of dimensions
    d, then d big-endian uint32 sizes; the data follow in C order.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetCorruptError: the file is not a well-formed gzip IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Fashion-MNIST file {path} is missing. {_hint(path.parent)}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetCorruptError(f"{path} is not a readable gzip file ({exc}). {_hint(path.parent)}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise DatasetCorruptError(f"{path} has no IDX uint8 header. {_hint(path.parent)}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path} is truncated inside its IDX header. {_hint(path.parent)}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DatasetCorruptError(
            f"{path} holds {len(raw) - header} data bytes, but its header {shape} says {expected}. {_hint(path.parent)}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPE[raw[2]], offset=header).reshape(shape)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``[N, 28, 28]`` -> float32 model input ``[N, 1, 28, 28]``, ``(p/255 - MEAN)/STD``."""
    return ((pixels.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def load_fashion_mnist(
    split: Literal["train", "test"] = "test",
    root: str | os.PathLike[str] | None = None,
    *,
    raw: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder holding the IDX files; see the module docstring for the lookup order.
        raw: return uint8 pixels ``[N, 28, 28]`` instead of normalized float32 ``[N, 1, 28, 28]``.

    Returns:
        ``(images, labels)``; labels are int64 ``[N]`` class indices into :data:`CLASSES`.
    """
    if split not in _FILES:
        raise ConfigError(f"split={split!r} is unknown; use 'train' or 'test'.")
    folder = data_dir(root)
    img_file, lbl_file = _FILES[split]
    pixels = torch.from_numpy(read_idx(folder / img_file).copy())  # [N, 28, 28] uint8
    labels = torch.from_numpy(read_idx(folder / lbl_file).astype(np.int64))  # [N]
    if pixels.ndim != 3 or labels.ndim != 1 or pixels.shape[0] != labels.shape[0]:
        raise DatasetCorruptError(
            f"{folder}: images {tuple(pixels.shape)} and labels {tuple(labels.shape)} do not match. {_hint(folder)}"
        )
    return (pixels if raw else normalize(pixels)), labels
