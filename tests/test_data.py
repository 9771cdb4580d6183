import os

import pytest
import torch

import zq_plugin
from zq_plugin.data import SyntheticDataset
from zq_plugin.errors import DataMismatchError, DatasetCorruptError, DatasetNotFoundError


@pytest.fixture
def data(tiny_bn_net):
    return zq_plugin.synthesize(tiny_bn_net, "zeroq", num_samples=5, input_shape=(1, 8, 8), steps=3, progress=False)


def test_round_trip(tmp_path, data, tiny_bn_net):
    path = tmp_path / "sub" / "data.pt"
    data.save(path)
    back = SyntheticDataset.load(path, tiny_bn_net)
    assert torch.equal(back.images, data.images)
    assert (back.method, back.seed, back.options, back.model_fingerprint) == (
        data.method,
        data.seed,
        data.options,
        data.model_fingerprint,
    )
    assert [p.name for p in path.parent.iterdir()] == ["data.pt"]  # no temporary file left


def test_refuses_other_model(tmp_path, data, tiny_bn_net):
    path = tmp_path / "data.pt"
    data.save(path)
    with torch.no_grad():
        tiny_bn_net.conv1.weight.add_(1e-3)
    with pytest.raises(DataMismatchError, match="allow_mismatch=True"):
        SyntheticDataset.load(path, tiny_bn_net)
    assert torch.equal(SyntheticDataset.load(path, tiny_bn_net, allow_mismatch=True).images, data.images)


def test_failed_write_keeps_old_file_and_leaves_no_partial(tmp_path, data, monkeypatch):
    path = tmp_path / "data.pt"
    data.save(path)
    original = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        data.save(path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["data.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="synthesize"):
        SyntheticDataset.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DatasetCorruptError):
        SyntheticDataset.load(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(DatasetCorruptError, match="SyntheticDataset"):
        SyntheticDataset.load(tmp_path / "other.pt")


def test_fingerprint_tracks_weights_and_buffers(tiny_bn_net):
    fp = zq_plugin.model_fingerprint(tiny_bn_net)
    assert fp == zq_plugin.model_fingerprint(tiny_bn_net)
    with torch.no_grad():
        tiny_bn_net.bn1.running_mean[0] += 1
    assert zq_plugin.model_fingerprint(tiny_bn_net) != fp
