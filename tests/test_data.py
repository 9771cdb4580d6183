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


@pytest.mark.parametrize("damage", ["garbage", "truncated", "cut_early", "empty"])
def test_corrupt_file_says_not_a_zq_dataset_and_how_to_remake_it(tmp_path, data, damage):
    """Issue 14: garbage showed torch's weights_only=False advice, a truncated file only "[Errno 22]"."""
    path = tmp_path / "data.pt"
    data.save(path)
    whole = path.read_bytes()
    cut = {"garbage": b"garbage" * 10, "truncated": whole[: len(whole) // 2], "cut_early": whole[:100], "empty": b""}
    path.write_bytes(cut[damage])
    with pytest.raises(DatasetCorruptError) as info:
        SyntheticDataset.load(path)
    msg = str(info.value)
    assert "is not a complete zq dataset file" in msg and "zq synthesize" in msg and "SyntheticDataset.save" in msg
    assert "weights_only" not in msg and "Errno" not in msg and "\n" not in msg


def test_written_files_get_the_mode_open_would_give(tmp_path, data, tiny_bn_net):
    """Issue 14: mkstemp left data files and plan.json at 0600 while other outputs got 0644."""
    from zq_plugin.mixed_precision import BitPlan

    def mode(name):
        return os.stat(tmp_path / name).st_mode & 0o777

    old = os.umask(0o022)
    try:
        data.save(tmp_path / "data.pt")
        BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=8).save(tmp_path / "plan.json")
        os.umask(0o077)
        data.save(tmp_path / "private.pt")
        data.save(tmp_path / "data.pt")  # replacing a file keeps its mode, as open() does
    finally:
        os.umask(old)
    assert (mode("data.pt"), mode("plan.json"), mode("private.pt")) == (0o644, 0o644, 0o600)
