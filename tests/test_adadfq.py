"""AdaDFQ / GDFQ: the game's losses (properties), the generator, and data-free fine-tuning."""

import logging
import math

import pytest
import torch
from conftest import assert_unchanged, pool_bn_net, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.finetuning import _checked_config, finetune
from zq_plugin.synth.adadfq import (
    AdaDFQConfig,
    ConditionalGenerator,
    GDFQConfig,
    entropy,
    low_pass,
    margin_loss,
    normalized_entropy,
    student_loss,
)

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(h=unit, lower=st.floats(0.0, 0.49), upper=st.floats(0.51, 1.0))
def test_margin_term_is_zero_inside_the_margins_and_rises_linearly_outside(h, lower, upper):
    value = float(margin_loss(torch.tensor([h]), lower, upper))
    if lower <= h <= upper:
        assert value == 0.0
    else:
        assert value == pytest.approx(max(lower - h, h - upper), abs=1e-6)
        further = min(max(h + (0.01 if h > upper else -0.01), 0.0), 1.0)
        if abs(further - h) > 1e-3:  # one step further from the band costs more
            assert float(margin_loss(torch.tensor([further]), lower, upper)) > value


@given(st.lists(st.floats(-20, 20), min_size=6, max_size=6), st.sampled_from(["batch", "max"]))
def test_normalized_entropy_lies_in_the_unit_interval(values, normalize):
    logits = torch.tensor(values).view(2, 3)
    h = entropy(logits)
    assert bool((h >= -1e-6).all() and (h <= math.log(3) + 1e-6).all())
    hn = normalized_entropy(h, 3, normalize)
    assert bool((hn >= 0).all() and (hn <= 1).all()) and torch.isfinite(hn).all()


def test_batch_normalization_of_uniform_samples_does_not_divide_by_zero():
    """methods.md §6.3 defect 4: every sample uniform makes min H = log C."""
    assert torch.equal(normalized_entropy(entropy(torch.zeros(4, 10)), 10, "batch"), torch.ones(4))


def test_student_loss_is_lowest_at_the_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(8, 10)
    near = teacher + 0.01 * torch.randn(8, 10)
    far = torch.randn(8, 10)
    for kind in ("kd", "entropy"):
        at = student_loss(teacher, teacher, None, kind=kind)
        assert float(student_loss(near, teacher, None, kind=kind)) <= float(student_loss(far, teacher, None, kind=kind))
        assert float(at) <= float(student_loss(near, teacher, None, kind=kind)) + 1e-6 * abs(float(at)) + 1e-6
    shifted = student_loss(teacher + 3.0, teacher, None, kind="entropy")  # AdaDFQ's: shift-invariant
    assert float(shifted) == pytest.approx(float(student_loss(teacher, teacher, None, kind="entropy")), abs=1e-4)
    # SynQ: no CE on hard samples (the teacher gives the label little probability)
    confident = torch.zeros(2, 3)
    confident[0, 0] = confident[1, 1] = 10.0
    y = torch.tensor([0, 2])  # sample 1's label is hard for the teacher
    all_ce = student_loss(confident, confident, y)
    easy_only = student_loss(confident, confident, y, hard_threshold=0.5)
    assert float(easy_only) < float(all_ce)


def test_low_pass_keeps_everything_at_one_and_only_the_mean_near_zero():
    x = torch.randn(3, 2, 9, 7)
    torch.testing.assert_close(low_pass(x, 1.0), x, atol=1e-5, rtol=0)
    flat = low_pass(x, 1e-3)
    torch.testing.assert_close(flat, x.mean((2, 3), keepdim=True).expand_as(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 30, 27), (2, 8, 8)])
def test_the_generator_makes_images_of_any_shape(shape):
    g = ConditionalGenerator(shape, num_classes=5, latent_dim=8, width=8)
    assert g(torch.randn(3, 8), torch.tensor([0, 4, 2])).shape == (3, *shape)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"margin": (0.8, 0.1)}, "lambda_l < lambda_u"),
        ({"margin": (0.1, 1.5)}, "lambda_l < lambda_u"),
        ({"margin": (0.1,)}, "two numbers"),
        ({"steps": 0}, "steps"),
        ({"steps": 10, "warmup": 10}, "warmup"),
        ({"w_bits": 1}, "w_bits=1"),
        ({"a_bits": 9}, "a_bits=9"),
        ({"lr_generator": 0.0}, "lr_generator"),
        ({"alpha_ds": -1.0}, "alpha_ds"),
        ({"class_loss": "other"}, "class_loss"),
        ({"lowpass": 0.0}, "lowpass"),
        ({"hard_threshold": 1.0}, "hard_threshold"),
        ({"oscillation": "wobble"}, "remedy"),
        ({"freeze_threshold": 0.0}, "threshold"),
        ({"holdout": 1.0}, "holdout"),
        ({"checks": 0}, "checks"),
    ],
)
def test_bad_options_raise_named_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        AdaDFQConfig(**options)


def test_gdfq_is_the_game_without_margins_on_the_teachers_class():
    config = GDFQConfig()
    assert config.margin is None and config.class_loss == "teacher" and config.bns_weight == 0.1
    assert AdaDFQConfig(margin=[0.2, 0.7]).margin == (0.2, 0.7)  # a JSON list from the CLI


QUICK = {"input_shape": (1, 8, 8), "batch_size": 16, "calibration_samples": 32, "progress": False}


def _game(steps, warmup=0, **options):
    return AdaDFQConfig(
        **{"steps": steps, "warmup": warmup, "width": 16, "latent_dim": 16, "lr_student": 0.01, **options}
    )


def test_generator_and_student_both_learn_on_a_tiny_model(tiny_bn_net, monkeypatch):
    """Over 60 iterations the generator's BN term falls; on a fixed set the student's distillation
    loss falls. (On the game's ever-new images the student's loss is no measure: the generator
    keeps seeking disagreement, the loss stays flat within a few percent, and whether its last
    iterations are lower depends on the thread count.)"""
    from zq_plugin import finetuning as ft

    log = []
    advance = ft._Run.advance

    def record(self):
        out = advance(self)
        log.append(out)
        return out

    monkeypatch.setattr(ft._Run, "advance", record)
    finetune(tiny_bn_net, config=_game(60, warmup=5), **QUICK)
    first, last = log[5:15], log[-10:]
    assert sum(r["g_bns"] for r in last) < sum(r["g_bns"] for r in first)
    log.clear()
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    finetune(tiny_bn_net, images, config=_game(60), w_bits=3, a_bits=3, first_last_bits=None, **QUICK)
    first, last = log[:10], log[-10:]
    assert sum(r["student"] for r in last) < sum(r["student"] for r in first)


def test_same_seed_same_model_and_the_source_is_unchanged(tiny_bn_net):
    before = snapshot(tiny_bn_net)
    a = finetune(tiny_bn_net, config=_game(6, warmup=2), seed=3, **QUICK)
    b = finetune(tiny_bn_net, config=_game(6, warmup=2), seed=3, **QUICK)
    c = finetune(tiny_bn_net, config=_game(6, warmup=2), seed=4, **QUICK)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert_unchanged(tiny_bn_net, before)


def test_a_killed_run_resumes_to_the_same_model(tiny_bn_net, tmp_path, monkeypatch):
    from zq_plugin import finetuning as ft

    config = _game(12, warmup=3)
    whole = finetune(tiny_bn_net, config=config, **QUICK)
    advance = ft._Run.advance

    def dies_at_8(self):
        if self.step == 8:
            raise KeyboardInterrupt
        return advance(self)

    monkeypatch.setattr(ft._Run, "advance", dies_at_8)
    before = snapshot(tiny_bn_net)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_bn_net, config=config, cache_dir=tmp_path, checkpoint_every=5, **QUICK)
    assert_unchanged(tiny_bn_net, before)  # also after an interruption
    monkeypatch.setattr(ft._Run, "advance", advance)
    steps_run = []
    monkeypatch.setattr(ft._Run, "advance", lambda self: steps_run.append(self.step) or advance(self))
    resumed = finetune(tiny_bn_net, config=config, cache_dir=tmp_path, checkpoint_every=5, **QUICK)
    assert steps_run[0] == 5
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(value, resumed.state_dict()[key], rtol=0, atol=0)


def test_fine_tuning_on_a_fixed_set_uses_its_labels(tiny_bn_net):
    from zq_plugin.data import SyntheticDataset

    data = SyntheticDataset(torch.randn(32, 1, 8, 8), labels=torch.randint(0, 3, (32,)), method="noise")
    q = finetune(tiny_bn_net, data, config=_game(5), batch_size=8, progress=False)
    assert q.zq_finetune["generator"] is None and q(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_data_initialize_the_student_and_the_generator_streams(tiny_bn_net):
    """finetune(model, data, generator=...): the student is calibrated on the data, trained on the game."""
    data = torch.randn(16, 1, 8, 8)
    q = finetune(tiny_bn_net, data, generator="gdfq", config=_game(4, warmup=2), batch_size=8, progress=False)
    assert q.zq_finetune["generator"] == "gdfq" and q.zq_generator.method == "gdfq"
    assert q.zq_finetune["config"]["warmup"] == 2


def test_named_errors(tiny_bn_net, tiny_plain_net):
    with pytest.raises(ConfigError, match="generator='other'"):
        finetune(tiny_bn_net, generator="other", **QUICK)
    with pytest.raises(ConfigError, match="w_bits=1"):
        finetune(tiny_bn_net, w_bits=1, **QUICK)
    with pytest.raises(ConfigError, match="steps=0"):
        finetune(tiny_bn_net, steps=0, **QUICK)
    with pytest.raises(ConfigError, match="input_shape"):
        finetune(tiny_bn_net, progress=False)
    before = snapshot(tiny_plain_net)
    with pytest.raises(ModelError, match=r"no BatchNorm.*generator='adadfq'.*finetune\(model, images\)"):
        finetune(tiny_plain_net, **QUICK)  # the game matches BN statistics: the message says to give images
    assert_unchanged(tiny_plain_net, before)


def test_fixed_images_need_no_input_range(tiny_plain_net, caplog):
    with caplog.at_level(logging.WARNING):  # nothing is synthesized from fixed images: no input_range warning
        q = finetune(tiny_plain_net, torch.randn(16, 1, 8, 8), config=_game(3), batch_size=8, progress=False)
    assert q(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert "input_range" not in caplog.text


def test_steps_shorter_than_the_warm_up_scale_it_and_say_so(caplog):
    def warmup(config, steps, generator="adadfq"):
        return _checked_config(
            config, generator, w_bits=4, a_bits=4, first_last_bits=8, init="calibrate", steps=steps, batch_size=16,
            calibration_samples=32, checkpoint_every=10,
        ).warmup  # fmt: skip

    assert warmup(None, 100) == AdaDFQConfig().warmup  # it fits: kept
    assert warmup(AdaDFQConfig(warmup=3), 6) == 3  # chosen by the user and fits: kept
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="zq_plugin.finetuning"):
        assert warmup(None, 30) == 4  # 50 of 400 -> the same share of 30, not 29 of 30
    assert "warm-up is scaled" in caplog.text
    assert warmup(None, 1) == 0
    assert warmup(None, 30, generator=None) == 0  # fixed data: no game, no warm-up


def test_a_model_in_float64_is_fine_tuned_in_its_dtype(tiny_bn_net):
    net = tiny_bn_net.double()
    q = finetune(net, config=_game(3, warmup=1), **QUICK)
    assert q(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


class _NoLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_model_without_class_logits_is_refused():
    with pytest.raises(ModelError, match="classes"):
        finetune(_NoLogits().eval(), **QUICK)


def test_the_trained_generator_streams_seeded_batches_and_round_trips(tiny_bn_net, tmp_path):
    import zq_plugin
    from zq_plugin.errors import DataMismatchError, DatasetCorruptError
    from zq_plugin.synth.stream import GeneratorStream

    q = finetune(tiny_bn_net, config=_game(4, warmup=1), input_range=(-1.0, 2.0), **QUICK)
    stream = q.zq_generator
    batches = list(stream)
    assert len(batches) == stream.num_batches and batches[0][0].shape == (16, 1, 8, 8)
    assert all(float(x.min()) >= -1.0 and float(x.max()) <= 2.0 for x, _ in batches)
    assert all(int(y.max()) < 3 for _, y in batches)
    assert not torch.equal(batches[0][0], batches[1][0])
    stream.save(tmp_path / "g.pt")
    again = GeneratorStream.load(tmp_path / "g.pt", tiny_bn_net)
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    two_workers = [y for _, y in again.loader(num_workers=2)]  # workers split the batches, none repeated
    assert sorted(map(tuple, (y.tolist() for y in two_workers))) == sorted(tuple(y.tolist()) for _, y in batches)
    zq_plugin.calibrate(zq_plugin.quantize_fx(tiny_bn_net, torch.randn(8, 1, 8, 8)), again)  # any loader
    other = tiny_bn_net.__class__().eval()
    with pytest.raises(DataMismatchError, match="another model"):
        GeneratorStream.load(tmp_path / "g.pt", other)
    (tmp_path / "bad.pt").write_bytes(b"not torch")
    with pytest.raises(DatasetCorruptError, match="not a readable zq generator file"):
        GeneratorStream.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("method", ["adadfq", "gdfq"])
def test_synthesize_plays_the_game_and_returns_labelled_images(tiny_bn_net, method):
    import zq_plugin

    before = snapshot(tiny_bn_net)
    options = {"steps": 3, "warmup": 1, "width": 8, "latent_dim": 8}
    data = zq_plugin.synthesize(
        tiny_bn_net, method, num_samples=12, batch_size=6, input_shape=(1, 8, 8), progress=False, **options
    )
    assert data.images.shape == (12, 1, 8, 8) and data.labels is not None and data.labels.shape == (12,)
    assert_unchanged(tiny_bn_net, before)


def test_two_process_torchrun_trains_with_ddp_like_one_process(tiny_bn_net, tmp_path):
    """Under torchrun each rank trains on its slice of the batch and DDP averages: the single-process model."""
    import os
    import pathlib
    import subprocess
    import sys

    from zq_plugin.synth.adadfq import AdaDFQConfig as Config

    helper = pathlib.Path(__file__).parent / "helpers" / "dist_finetune.py"
    out = tmp_path / "student.pt"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(helper)]
    proc = subprocess.run(
        [*cmd, str(out), str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["ranks_agree"]
    assert any((tmp_path / "cache").iterdir())  # rank 0 wrote the checkpoint
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = finetune(tiny_bn_net, images, config=Config(steps=6, warmup=0, lr_student=0.05), batch_size=16,
                          progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)


def test_learned_steps_train_and_are_written_back_into_plain_fake_quantizers(tiny_bn_net):
    from zq_plugin import _compat
    from zq_plugin import finetuning as ft

    data = torch.randn(32, 1, 8, 8)
    fixed = finetune(tiny_bn_net, data, config=_game(8), batch_size=8, progress=False)
    learned = finetune(tiny_bn_net, data, config=_game(8, learn_steps=True), batch_size=8, progress=False)
    assert not any(isinstance(m, ft.LearnedStep) for m in learned.modules())
    scales = {n: m.scale for n, m in learned.named_modules() if isinstance(m, _compat.FakeQuantize)}
    fixed_scales = {n: m.scale for n, m in fixed.named_modules() if isinstance(m, _compat.FakeQuantize)}
    assert scales.keys() == fixed_scales.keys()
    assert any(not torch.equal(scales[n], fixed_scales[n]) for n in scales)  # the steps moved
    assert all(bool((s > 0).all()) for s in scales.values())


def test_a_fine_tuned_plan_student_is_carried_into_pt2e():
    """Issue 17 item 2: the fine-tuned weights and the steps of a plan's student reach a converted PT2E model."""
    from zq_plugin.backends.pt2e import from_sim
    from zq_plugin.finetuning import fx_student
    from zq_plugin.mixed_precision import BitPlan

    net = pool_bn_net()
    x = torch.randn(64, 1, 8, 8)
    plan = BitPlan.uniform(net, w_bits=4, a_bits=4, first_last_bits=None)
    config = AdaDFQConfig(lr_student=0.1)
    ft = finetune(net, x, plan=plan, steps=20, batch_size=16, config=config, input_range=None, progress=False)
    q = from_sim(net, ft, x, plan=plan)
    assert q.zq_carried == {"weight_steps": 3, "act_steps": 3, "layers": 3}
    start = fx_student(net, x, w_bits=4, a_bits=4, plan=plan)
    t = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(t), ft(t), atol=1e-5, rtol=1e-5)  # one meaning: no double rounding left
        assert float((q(t) - start(t)).abs().median()) > 1e-3  # the fine-tuned weights, not the starting ones


def test_a_fine_tuned_student_is_carried_into_brevitas(tiny_bn_net):
    """Issue 17 item 2: Brevitas layers take the fine-tuned weights on the student's steps."""
    from zq_plugin.backends.brevitas import from_sim
    from zq_plugin.mixed_precision import BitPlan

    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    config = AdaDFQConfig(lr_student=0.1)
    ft = finetune(tiny_bn_net, images, steps=10, batch_size=16, config=config, input_range=None, progress=False)
    before = snapshot(tiny_bn_net)
    q = from_sim(tiny_bn_net, ft, images, plan=BitPlan.uniform(tiny_bn_net, w_bits=4, a_bits=4))
    assert_unchanged(tiny_bn_net, before)
    assert q.zq_carried["weight_steps"] == q.zq_carried["layers"] == 5
    for name, layer in q.named_modules():
        if hasattr(layer, "quant_weight"):
            student = ft.get_submodule(name)
            with torch.no_grad():
                want = student.weight_fake_quant(student.weight)
                torch.testing.assert_close(layer.quant_weight().value, want, rtol=0, atol=1e-6)


def test_synthesize_adadfq_trains_one_generator_per_call(monkeypatch):
    """Three batches, one game (before: a whole quantized student was trained for every batch);
    batch b does not depend on which batch played the game."""
    import zq_plugin
    from zq_plugin import finetuning

    games = []
    real = finetuning.finetune

    def counted(*args, **kwargs):
        games.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(finetuning, "finetune", counted)
    net = pool_bn_net()
    options = {"steps": 6, "warmup": 2, "latent_dim": 8, "width": 8}
    data = zq_plugin.synthesize(net, method="adadfq", num_samples=10, batch_size=4, input_shape=(1, 8, 8), **options)
    assert len(games) == 1 and tuple(data.images.shape) == (10, 1, 8, 8) and data.labels.shape == (10,)
    again = zq_plugin.synthesize(net, method="adadfq", num_samples=10, batch_size=4, input_shape=(1, 8, 8), **options)
    assert len(games) == 2 and torch.equal(again.images, data.images)  # seeded: the same call, the same data
    assert not torch.equal(data.images[:4], data.images[4:8])  # each batch draws its own latents


def test_fine_tuning_never_ends_worse_than_it_began_on_the_held_out_images(tiny_bn_net):
    """A learning rate that wrecks the student: the kept state is the starting one, bit for bit (issue 30)."""
    from zq_plugin.finetuning import fx_student

    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    wrecked = finetune(tiny_bn_net, images, config=_game(20, lr_student=50.0), **QUICK)
    record = wrecked.zq_finetune
    kls = [h["kl"] for h in record["held_out"]]
    assert record["held_out"][0]["step"] == 0 and len(kls) == 11  # the start, then 10 checks
    assert record["kept_step"] == 0 and min(kls) == kls[0] < max(kls)
    start = fx_student(tiny_bn_net, images, w_bits=4, a_bits=4)
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(wrecked(x), start(x))
    good = finetune(tiny_bn_net, images, config=_game(20), **QUICK).zq_finetune
    kept = [h["kl"] for h in good["held_out"] if h["step"] == good["kept_step"]]
    assert kept == [min(h["kl"] for h in good["held_out"])]


def test_held_out_images_never_train_and_a_generator_checks_on_its_calibration_images(tiny_bn_net, monkeypatch):
    from zq_plugin import finetuning as ft

    seen = []
    fixed = ft._Run._fixed_batch

    def record(self):
        x, y = fixed(self)
        seen.append(x)
        return x, y

    monkeypatch.setattr(ft._Run, "_fixed_batch", record)
    images = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 1, 8, 8) / 4096
    runs = []
    init = ft._Run.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        runs.append(self)

    monkeypatch.setattr(ft._Run, "__init__", keep)
    finetune(tiny_bn_net, images, config=_game(10), **QUICK)
    held = {float(h.flatten()[0]) for h in runs[0].held}
    trained = {float(x.flatten()[0]) for batch in seen for x in batch}
    assert len(held) == 8 and not held & trained  # 1/8 of 64 held out, never drawn
    finetune(tiny_bn_net, config=_game(4, warmup=1), **QUICK)
    assert runs[1].held is not None and runs[1].held.shape == (32, 1, 8, 8)  # calibration_samples=32


def test_oscillating_weights_freeze_during_fine_tuning_and_stay_frozen(tiny_bn_net):
    images = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = _game(40, lr_student=5.0, freeze_threshold=0.005)  # a large rate makes weights hop
    q = finetune(tiny_bn_net, images, config=config, w_bits=2, a_bits=4, first_last_bits=None, **QUICK)
    assert q.zq_finetune["frozen_weights"] > 0
    off = finetune(tiny_bn_net, images, config=_game(40, lr_student=5.0, freeze_threshold=0.005, oscillation=None),
                   w_bits=2, a_bits=4,
                   first_last_bits=None, **QUICK).zq_finetune  # fmt: skip
    assert off["frozen_weights"] == 0 and off["oscillating_share"] > 0
