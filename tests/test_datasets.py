import gzip
import struct

import numpy as np
import pytest
import torch

from zq_plugin import datasets
from zq_plugin.errors import DatasetCorruptError, DatasetNotFoundError, ZQError


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        img, lbl = datasets._FILES[split]
        write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / lbl, rng.integers(0, 10, (n,)))
    return tmp_path


def test_reads_and_normalizes(fake_root):
    images, labels = datasets.load_fashion_mnist("test", fake_root)
    raw, _ = datasets.load_fashion_mnist("test", fake_root, raw=True)
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    torch.testing.assert_close(images, datasets.normalize(raw))
    lo, hi = datasets.MEAN / -datasets.STD, (1 - datasets.MEAN) / datasets.STD
    assert images.min() >= lo - 1e-6 and images.max() <= hi + 1e-6


def test_env_var_override(fake_root, monkeypatch):
    monkeypatch.setenv(datasets.ENV_VAR, str(fake_root))
    assert datasets.data_dir() == fake_root
    assert datasets.load_fashion_mnist("train")[0].shape[0] == 6


def test_missing_names_package_path_and_override(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.load_fashion_mnist("test", tmp_path / "nowhere")
    msg = str(info.value)
    assert "dataset-fashion-mnist" in msg and "nowhere" in msg and datasets.ENV_VAR in msg
    assert isinstance(info.value, ZQError) and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(
    "payload",
    [b"not gzip at all", gzip.compress(b"\x00\x00\x0d\x01"), gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")],
    ids=["not-gzip", "bad-dtype", "truncated-data"],
)
def test_corrupt_files_raise(tmp_path, payload):
    path = tmp_path / datasets._FILES["test"][1]
    path.write_bytes(payload)
    img, _ = datasets._FILES["test"]
    write_idx(tmp_path / img, np.zeros((5, 28, 28)))
    with pytest.raises(DatasetCorruptError, match="dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test", tmp_path)


def test_mismatched_counts_raise(tmp_path):
    img, lbl = datasets._FILES["test"]
    write_idx(tmp_path / img, np.zeros((5, 28, 28)))
    write_idx(tmp_path / lbl, np.zeros((4,)))
    with pytest.raises(DatasetCorruptError, match="do not match"):
        datasets.load_fashion_mnist("test", tmp_path)


def test_unknown_split():
    with pytest.raises(ValueError, match="train"):
        datasets.load_fashion_mnist("valid")  # type: ignore[arg-type]
