"""Dependable generation: deterministic per batch, resumable from a cache, split across processes."""

import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import assert_unchanged, snapshot

import zq_plugin
from zq_plugin.synth import registry

SHAPE = (1, 12, 12)
KW = {"input_shape": SHAPE, "batch_size": 3, "seed": 7, "steps": 4, "progress": False}


def run(model, num_samples=10, **kw):
    return zq_plugin.synthesize(model, "zeroq", num_samples=num_samples, **{**KW, **kw}).images


def test_same_seed_same_images_and_batches_do_not_depend_on_the_total(tiny_bn_net):
    full = run(tiny_bn_net)
    assert torch.equal(full, run(tiny_bn_net))
    # batch b is a function of (seed, b, batch_size): a shorter run is a prefix
    assert torch.equal(run(tiny_bn_net, num_samples=6), full[:6])
    assert not torch.equal(run(tiny_bn_net, seed=8), full)


def test_full_batches_are_shared_by_runs_of_different_sizes(tiny_bn_net):
    """docs/synthesis.md: the full batches are shared; a last partial batch is made at its own size."""
    ten = run(tiny_bn_net, num_samples=10, batch_size=4)  # batches of 4, 4, 2
    six = run(tiny_bn_net, num_samples=6, batch_size=4)  # batches of 4, 2
    assert torch.equal(six[:4], ten[:4])
    assert not torch.equal(six[4:], ten[4:6])


def test_cache_reuses_finished_batches(tiny_bn_net, tmp_path, monkeypatch):
    first = run(tiny_bn_net, num_samples=6, cache_dir=tmp_path)
    calls = []
    original = registry.METHODS["zeroq"]
    monkeypatch.setitem(
        registry.METHODS,
        "zeroq",
        registry.Method(
            original.name,
            original.config_cls,
            lambda *a: calls.append(1) or original.make_batch(*a),
            original.needs_batchnorm,
        ),
    )
    more = run(tiny_bn_net, num_samples=10, cache_dir=tmp_path)
    assert len(calls) == 2  # batches 0 and 1 came from the cache; 2 and 3 (of 3 and 1) were made
    assert torch.equal(more[:6], first)
    assert torch.equal(more, run(tiny_bn_net))


def test_resume_after_an_exception_gives_the_uninterrupted_dataset(tiny_bn_net, tmp_path, monkeypatch):
    expected = run(tiny_bn_net)
    before = snapshot(tiny_bn_net)
    original = registry.METHODS["zeroq"]
    made = []

    def failing(*args):
        if len(made) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the third batch
        made.append(1)
        return original.make_batch(*args)

    monkeypatch.setitem(
        registry.METHODS,
        "zeroq",
        registry.Method(original.name, original.config_cls, failing, original.needs_batchnorm),
    )
    with pytest.raises(KeyboardInterrupt):
        run(tiny_bn_net, cache_dir=tmp_path)
    assert_unchanged(tiny_bn_net, before)
    files = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert files == ["batch-000000-3.pt", "batch-000001-3.pt"]
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written
    monkeypatch.setitem(registry.METHODS, "zeroq", original)
    assert torch.equal(run(tiny_bn_net, cache_dir=tmp_path), expected)


def test_damaged_cached_batch_is_made_again(tiny_bn_net, tmp_path):
    expected = run(tiny_bn_net, cache_dir=tmp_path)
    victim = next(tmp_path.rglob("batch-000001-3.pt"))
    victim.write_bytes(b"not a tensor file")
    assert torch.equal(run(tiny_bn_net, cache_dir=tmp_path), expected)


def test_cache_key_separates_options_and_code(tiny_bn_net, tmp_path, monkeypatch):
    run(tiny_bn_net, cache_dir=tmp_path)
    run(tiny_bn_net, cache_dir=tmp_path, lr=0.1)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    # data made by other code of the method is not reused
    monkeypatch.setattr("zq_plugin.synth.api.method_code_hash", lambda _cls: "edited")
    run(tiny_bn_net, cache_dir=tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_two_process_torchrun_equals_one_process(tiny_bn_net, tmp_path):
    tests = pathlib.Path(__file__).parent
    out = tmp_path / "images.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a port torchrun picks itself (no race for a free port)
        "--nproc_per_node=2",
        str(tests / "helpers" / "dist_synth.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # float reductions depend on the intra-op thread count; torchrun gives each rank one thread,
    # so the single process is compared at one thread too (docs/synthesis.md)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(tiny_bn_net)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.load(out), single)


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
