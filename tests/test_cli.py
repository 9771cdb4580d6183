import json
import os

import pytest
import torch

import zq_plugin
from zq_plugin import cli, zoo
from zq_plugin.data import SyntheticDataset


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "resnet_s.pt"
    rc = cli.main(
        [
            "synthesize",
            "--model",
            "resnet_s",
            "--num-samples",
            "8",
            "--batch-size",
            "4",
            "--option",
            "steps=2",
            "--option",
            "statistics=batch",
            "--out",
            str(path),
        ]
    )
    assert rc == 0
    return path


def test_synthesize_writes_dataset_for_the_model(data_file):
    data = SyntheticDataset.load(data_file, zoo.load("resnet_s"))
    assert data.images.shape == (8, 1, 28, 28)
    assert data.options["steps"] == 2 and data.options["statistics"] == "batch"


def test_quantize_reports_accuracy_and_writes_int8(data_file, tmp_path, capsys):
    out = tmp_path / "int8.pt"
    rc = cli.main(["quantize", "--model", "resnet_s", "--data", str(data_file), "--evaluate", "--int8-out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fp32_top1"] > 90 and report["quantized_top1"] > 85
    scripted = torch.jit.load(out)
    assert scripted(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_user_checkpoint_and_arch(tmp_path, capsys):
    ckpt = tmp_path / "w.pt"
    torch.save(zoo.load("plain_cnn").state_dict(), ckpt)
    rc = cli.main(
        [
            "quantize",
            "--arch",
            "zq_plugin.zoo.models:PlainCNN",
            "--checkpoint",
            str(ckpt),
            "--data",
            "noise",
            "--num-samples",
            "16",
            "--w-bits",
            "4",
            "--a-bits",
            "8",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["w_bits"] == 4


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["quantize", "--model", "resnet_s", "--data", "noise", "--w-bits", "9"], "2 to 8"),
        (["quantize", "--model", "resnet_s", "--data", "missing.pt"], "no synthetic dataset"),
        (["synthesize", "--model", "plain_cnn", "--out", "x.pt"], "no BatchNorm"),
        (["synthesize", "--model", "resnet_s", "--num-samples", "0", "--out", "x.pt"], "num_samples"),
        (["synthesize", "--arch", "nowhere:Net", "--checkpoint", "c.pt", "--out", "x.pt"], "cannot import"),
        (["quantize", "--model", "resnet_s", "--data", "noise", "--w-bits", "4", "--int8-out", "q.pt"], "8"),
        (["synthesize", "--model", "resnet_s", "--input-range", "low,high", "--out", "x.pt"], "--input-range"),
        (["quantize", "--model", "resnet_s", "--data", "dsgg"], "zeroq"),
        (["quantize", "--model", "resnet_s", "--data", "noise", "--plan", "missing.json"], "does not exist"),
        (["synthesize", "--model", "resnet_s", "--option", "steps=abc", "--out", "x.pt"], "steps='abc'"),
        (["synthesize", "--model", "resnet_s", "--out", "afile/x.pt"], "cannot be written"),
        (["synthesize", "--model", "resnet_s", "--input-range", "2,1", "--out", "x.pt"], "lo < hi"),
        (
            [
                "quantize",
                "--model",
                "resnet_s",
                "--data",
                "noise",
                "--recipe",
                "best",
                "--backend",
                "brevitas",
                "--gptq",
            ],
            "--gptq",
        ),
        (["quantize", "--model", "resnet_s", "--data", "noise", "--reconstruct", "qdrop", "--iterations", "0"], ">= 1"),
    ],
)
def test_bad_input_exits_2_with_message(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file where a folder is needed")
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_dataset_for_other_model_is_refused(data_file, capsys):
    assert cli.main(["quantize", "--model", "mobilenetv2_s", "--data", str(data_file)]) == 2
    err = capsys.readouterr().err
    assert "--allow-mismatch" in err and "allow_mismatch=True" not in err  # the flag, not the library's keyword


def test_quantize_with_search_observers(data_file, capsys):
    argv = ["quantize", "--model", "resnet_s", "--data", str(data_file), "--w-bits", "4", "--a-bits", "4"]
    rc = cli.main([*argv, "--observer", "mse", "--weight-observer", "aciq"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["observer"], report["weight_observer"]) == ("mse", "aciq")
    assert {row["a_bits"] for row in report["model"]["layers"]} == {8, 4}  # read from the built model
    assert cli.main([*argv, "--act-observer", "mse"]) == 0  # the old spelling still works
    assert json.loads(capsys.readouterr().out)["observer"] == "mse"
    assert cli.main([*argv, "--act-stats", "zq-mse"]) == 2  # replaced by --observer, refused by name
    assert "--observer" in capsys.readouterr().err


def test_observer_names_resolve():
    from zq_plugin.observers import ao

    for name in ao.NAMES:
        assert ao.observer_class(name) is not None
    with pytest.raises(zq_plugin.ConfigError, match="no per-channel"):
        ao.observer_class("histogram", per_channel=True)
    with pytest.raises(zq_plugin.ConfigError, match="unknown observer"):
        ao.observer_class("kl")


def test_plan_writes_plan_frontier_and_plot(data_file, tmp_path, capsys):
    from zq_plugin.mixed_precision import BitPlan

    out = tmp_path / "plan"
    argv = ["plan", "--model", "resnet_s", "--data", str(data_file), "--budget", "MP4", "--bits", "2", "4", "8"]
    assert cli.main([*argv, "--out", str(out), "--evaluate", "2"]) == 0
    plan = BitPlan.load(out / "plan.json")
    assert plan.weight_bits() <= 4 * sum(b.params for b in plan.layers.values())
    doc = json.loads((out / "frontier.json").read_text())
    assert doc["budget_bits"] == 4 * sum(b.params for b in plan.layers.values())
    sizes = [r["bytes"] for r in doc["frontier"]]
    assert sizes == sorted(sizes) and len(sizes) > 3
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    # the cheapest and the least sensitive frontier points, then the chosen plan, measured on the test set
    assert [m["chosen"] for m in doc["measured"]] == [False, False, True]
    assert doc["measured"][0]["average_bits"] < doc["measured"][1]["average_bits"]
    assert all(0 <= m["top1"] <= 100 for m in doc["measured"])
    assert "| layer1.conv1 |" in capsys.readouterr().out


def test_plan_bad_budget_exits_2(data_file, tmp_path, capsys):
    argv = ["plan", "--model", "resnet_s", "--data", str(data_file), "--out", str(tmp_path), "--evaluate", "0"]
    assert cli.main([*argv, "--budget", "1avg"]) == 2
    assert "below the smallest possible plan" in capsys.readouterr().err
    assert cli.main([*argv, "--budget", "lots"]) == 2
    assert "not understood" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def _mixed_plan(tmp_path):
    """A W4A8 plan for resnet_s with layer3.conv2 at 3 bits, saved as tmp_path/plan.json."""
    from zq_plugin.mixed_precision import BitPlan

    plan = BitPlan.uniform(zoo.load("resnet_s"), w_bits=4, a_bits=8).replace_layer("layer3.conv2", w_bits=3)
    plan.save(tmp_path / "plan.json")
    return plan


def test_quantize_with_plan_on_both_backends(data_file, tmp_path, capsys):
    pytest.importorskip("brevitas")
    pytest.importorskip("onnxruntime")
    _mixed_plan(tmp_path)
    base = ["quantize", "--model", "resnet_s", "--data", str(data_file), "--plan", str(tmp_path / "plan.json")]
    assert cli.main(base) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"].endswith("plan.json") and report["average_w_bits"] < 4.0
    onnx = tmp_path / "m.onnx"
    argv = [*base, "--backend", "brevitas", "--bias-correction", "--observer", "mse", "--onnx-out", str(onnx)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "brevitas" and report["bias_correction"] and onnx.is_file()
    assert cli.main([*base, "--int8-out", str(tmp_path / "x.pt")]) == 2
    assert "--int8-out" in capsys.readouterr().err
    assert cli.main([*base, "--onnx-out", str(tmp_path / "fx.onnx")]) == 0  # FX: the simulation's ops in ONNX
    assert json.loads(capsys.readouterr().out)["onnx_out"].endswith("fx.onnx")


def test_synthesize_input_range_for_a_user_model(tmp_path):
    """Found from outside: a model without input_range was distilled unclamped, and the CLI had no flag for it."""
    ckpt, out = tmp_path / "w.pt", tmp_path / "d.pt"
    torch.save(zoo.load("resnet_s").state_dict(), ckpt)
    arch = ["--arch", "zq_plugin.zoo.models:ResNetS", "--checkpoint", str(ckpt)]
    argv = ["synthesize", *arch, "--num-samples", "4", "--batch-size", "4", "--option", "steps=5", "--out", str(out)]
    assert cli.main([*argv, "--input-range=-0.5,0.25"]) == 0  # "=": the value starts with "-"
    images = torch.load(out, weights_only=True)["images"]
    assert images.min() >= -0.5 and images.max() <= 0.25


class NeedsArgs(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(width, 2)


@pytest.mark.parametrize("case", ["other_weights", "truncated", "pickled_module", "constructor_args"])
def test_arch_checkpoint_mistakes_get_one_error_line(case, tmp_path, capsys):
    """Issue 14: a wrong state_dict, a corrupt checkpoint or a constructor needing arguments printed tracebacks."""
    ckpt, arch = tmp_path / "w.pt", "zq_plugin.zoo.models:PlainCNN"
    if case == "other_weights":
        torch.save(zoo.load("resnet_s").state_dict(), ckpt)
    elif case == "truncated":
        torch.save(zoo.load("plain_cnn").state_dict(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif case == "pickled_module":
        torch.save(zoo.load("plain_cnn"), ckpt)
    else:
        torch.save({}, ckpt)
        arch = f"{__name__}:NeedsArgs"
    rc = cli.main(["synthesize", "--arch", arch, "--checkpoint", str(ckpt), "--method", "noise", "--out", "x.pt"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("zq: error:") and "Traceback" not in err
    want = {
        "other_weights": "does not fit",
        "truncated": "not a readable state_dict",
        "pickled_module": "save its state_dict",
        "constructor_args": "without arguments",
    }[case]
    assert want in err


def test_negative_evaluate_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "--model", "resnet_s", "--data", "noise", "--budget", "MP4", "--evaluate", "-1"])
    assert info.value.code == 2 and "must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--w-bits", "--a-bits", "--first-last-bits"])
def test_bad_bits_are_refused_before_the_data_are_made(flag, monkeypatch, capsys):
    """--w-bits 1 was refused only after synthesis had run (an outside check)."""
    monkeypatch.setattr(cli, "load_data", lambda *a, **k: pytest.fail("data made before the bits were checked"))
    assert cli.main(["quantize", "--model", "plain_cnn", "--data", "zeroq", flag, "1"]) != 0
    assert f"{flag}=1 is not supported" in capsys.readouterr().err


def test_int8_out_creates_its_folder(tmp_path, capsys):
    """Issue 14: --int8-out nodir/x.pt failed after the work while --onnx-out created its folder."""
    out = tmp_path / "nodir" / "int8.pt"
    argv = ["quantize", "--model", "plain_cnn", "--data", "noise", "--num-samples", "16", "--int8-out", str(out)]
    assert cli.main(argv) == 0
    assert torch.jit.load(out)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


class Cifar3(torch.nn.Module):
    """3x32x32 inputs, 10 classes, no BatchNorm: not a Fashion-MNIST model."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 30 * 30, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class FiveClasses(torch.nn.Module):
    """1x28x28 inputs but 5 classes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


def _arch_args(tmp_path, cls):
    ckpt = tmp_path / f"{cls.__name__}.pt"
    torch.manual_seed(0)
    torch.save(cls().state_dict(), ckpt)
    return ["--arch", f"{__name__}:{cls.__name__}", "--checkpoint", str(ckpt)]


@pytest.mark.parametrize(
    ("cls", "extra", "want"),
    [
        (Cifar3, ["--input-shape", "3,32,32", "--data", "noise", "--evaluate"], "but this model takes 3,32,32 inputs."),
        (FiveClasses, ["--data", "noise", "--evaluate"], "but this model returns 5 classes."),
        (Cifar3, ["--input-shape", "3,32,32", "--data", "real"], "--data noise"),
        (Cifar3, ["--data", "noise", "--evaluate"], "but this model does not run on 1,28,28 inputs."),
    ],
)
def test_fashion_mnist_flags_on_another_model_get_one_error_before_the_work(
    cls, extra, want, tmp_path, capsys, monkeypatch
):
    """Issue 14: --evaluate / --data real on a non-Fashion-MNIST --arch model ended in a traceback."""

    def no_work(*a, **k):
        raise AssertionError("the check must come before any data are made or loaded")

    monkeypatch.setattr(cli, "synthesize", no_work)
    monkeypatch.setattr(cli, "real_subset", no_work)
    assert cli.main(["quantize", *_arch_args(tmp_path, cls), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zq: error:") and err.count("\n") == 1
    assert "uses Fashion-MNIST (1x28x28 images, 10 classes)" in err and want in err
    assert ("zq_plugin.accuracy" in err) == ("--evaluate" in extra)


def test_plan_evaluate_on_another_model_gets_one_error_before_the_work(tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the check must come before any data are made or loaded")

    monkeypatch.setattr(cli, "synthesize", no_work)
    argv = ["plan", *_arch_args(tmp_path, FiveClasses), "--data", "noise", "--budget", "MP4", "--evaluate", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "plan")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zq: error: --evaluate uses Fashion-MNIST") and "returns 5 classes" in err
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--model", "resnet_s", "--input-shape", "1,2,2"], "takes 1,28,28"),
        (["--model", "resnet_s", "--input-shape", "1,0,28"], "channels first"),
        (["ARCH"], "cannot run on one input of shape 1,28,28 (the default"),
        (["ARCH", "--input-shape", "1,32,32"], "cannot run on one input of shape 1,32,32: RuntimeError"),
    ],
)
def test_input_shape_is_checked_against_the_model(argv, want, tmp_path, capsys, monkeypatch):
    """Issue 14: --input-shape 1,2,2 on a 28x28 zoo model was silently accepted."""
    monkeypatch.chdir(tmp_path)
    argv = [a for v in argv for a in (_arch_args(tmp_path, Cifar3) if v == "ARCH" else [v])]
    assert cli.main(["synthesize", *argv, "--method", "noise", "--out", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zq: error:") and err.count("\n") == 1 and want in err
    assert not (tmp_path / "x.pt").exists()


def test_data_file_gives_the_input_shape(tmp_path, capsys):
    """A --data file needs no --input-shape (its images have one); a different --input-shape is refused."""
    path = tmp_path / "d.pt"
    SyntheticDataset(torch.zeros(4, 3, 32, 32), method="noise").save(path)
    argv = ["quantize", *_arch_args(tmp_path, Cifar3), "--data", str(path), "--allow-mismatch"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["w_bits"] == 8
    SyntheticDataset(torch.zeros(4, 1, 28, 28), method="noise").save(path)
    argv = ["quantize", *_arch_args(tmp_path, FiveClasses), "--data", str(path), "--allow-mismatch"]
    assert cli.main([*argv, "--input-shape", "1,20,20"]) == 2  # the model runs on it, the data are 1,28,28
    assert "--input-shape 1,20,20 does not match the images of" in capsys.readouterr().err


def test_arch_from_a_package_in_the_current_folder(tmp_path, capsys, monkeypatch):
    """Issue 14: --arch mypkg.models:MyNet needed PYTHONPATH=. to find a package in the current folder."""
    import sys

    pkg = tmp_path / "zq_test_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch\n\nclass MyNet(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, 10)\n\n    def forward(self, x):\n"
        "        return self.fc(x.flatten(1))\n"
    )
    torch.save(torch.nn.Linear(784, 10).state_dict(), tmp_path / "w.pt")
    state = {"fc." + k: v for k, v in torch.load(tmp_path / "w.pt").items()}
    torch.save(state, tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        argv = ["synthesize", "--arch", "zq_test_userpkg.models:MyNet", "--checkpoint", "w.pt", "--method", "noise"]
        assert cli.main([*argv, "--num-samples", "2", "--input-range", "none", "--out", "x.pt"]) == 0
    finally:
        for name in [m for m in sys.modules if m.startswith("zq_test_userpkg")]:
            del sys.modules[name]
    assert SyntheticDataset.load(tmp_path / "x.pt").images.shape == (2, 1, 28, 28)


def test_normalization_gives_the_input_box(tmp_path, capsys, monkeypatch):
    """Issue 14: --normalization MEAN,STD computes the box ((0 - mean) / std, (1 - mean) / std)."""
    monkeypatch.chdir(tmp_path)
    base = ["synthesize", "--method", "noise", "--num-samples", "4", "--option", "std=10"]
    one = [*base, *_arch_args(tmp_path, FiveClasses), "--normalization", "0.5,0.25", "--out", "one.pt"]
    assert cli.main(one) == 0
    data = SyntheticDataset.load("one.pt")
    assert tuple(data.options["input_range"]) == (-2.0, 2.0)
    assert data.images.min() == -2.0 and data.images.max() == 2.0  # std=10 noise clamped to the box
    per_channel = ["--input-shape", "3,32,32", "--normalization", "0.5,0.4,0.3/0.25,0.5,0.1"]
    assert cli.main([*base, *_arch_args(tmp_path, Cifar3), *per_channel, "--out", "three.pt"]) == 0
    lo, hi = SyntheticDataset.load("three.pt").options["input_range"]
    assert (lo, hi) == pytest.approx((-3.0, 7.0))  # the widest of the per-channel boxes
    capsys.readouterr()
    both = [*base, *_arch_args(tmp_path, FiveClasses), "--normalization", "0.5,0.25", "--input-range=-1,1"]
    assert cli.main([*both, "--out", "x.pt"]) == 2
    assert "not both" in capsys.readouterr().err
    wrong = [*base, *_arch_args(tmp_path, FiveClasses), "--normalization", "0.5,0.4/0.25,0.5", "--out", "x.pt"]
    assert cli.main(wrong) == 2
    assert "2 channels but the input has 1" in capsys.readouterr().err
    assert cli.main([*base, "--model", "resnet_s", "--normalization", "0.5", "--out", "x.pt"]) == 2
    assert "MEAN,STD" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_corrupt_data_file_gets_one_line(tmp_path, capsys):
    """Issue 14: a garbage --data file showed torch's weights_only=False advice."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file" * 8)
    assert cli.main(["quantize", "--model", "resnet_s", "--data", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a complete zq dataset file" in err and "zq synthesize" in err
    assert "weights_only" not in err


def test_ctrl_c_during_synthesize_says_what_is_cached_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """Issue 14: Ctrl-C printed ~40 lines of traceback; now one line, and the same command resumes."""
    import dataclasses

    from zq_plugin.synth import api

    made: list[int] = []
    interrupt_at = [1]  # the second batch
    real_get = api.get_method

    def get_method(name):
        spec = real_get(name)

        def make_batch(model, config, ctx):
            if len(made) == interrupt_at[0]:
                raise KeyboardInterrupt
            made.append(ctx.offset)
            return spec.make_batch(model, config, ctx)

        return dataclasses.replace(spec, make_batch=make_batch)

    monkeypatch.setattr(api, "get_method", get_method)
    monkeypatch.chdir(tmp_path)
    argv = ["synthesize", "--model", "resnet_s", "--num-samples", "8", "--batch-size", "4", "--option", "steps=2"]
    try:
        rc = cli.main([*argv, "--out", "d.pt"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped zq as a traceback")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith("zq: interrupted: 1 of 2 batches are cached in d.pt.cache") and err.count("\n") == 1
    assert "same command" in err and not (tmp_path / "d.pt").exists()
    assert made == [0]
    interrupt_at[0] = -1
    assert cli.main([*argv, "--out", "d.pt"]) == 0
    assert made == [0, 4]  # the rerun made only the second batch
    assert not (tmp_path / "d.pt.cache").exists()  # the default cache is removed once the file is written
    made.clear()
    assert cli.main([*argv, "--out", "whole.pt"]) == 0  # uninterrupted
    assert made == [0, 4]
    assert torch.equal(SyntheticDataset.load("d.pt").images, SyntheticDataset.load("whole.pt").images)


def _quantize_out(backend, out, capsys):
    argv = ["quantize", "--model", "plain_cnn", "--data", "noise", "--num-samples", "8", "--w-bits", "4"]
    assert cli.main([*argv, "--a-bits", "4", "--backend", backend, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out)
    assert report["out_format"].startswith(
        {"fx": "torch.export", "pt2e": "torch.export", "brevitas": "TorchScript"}[backend]
    )
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # written atomically: no temporary file left
    model = zoo.load("plain_cnn")
    data = zq_plugin.synthesize(model, "noise", num_samples=8, input_shape=(1, 28, 28), seed=0, progress=False)
    return model, data


def _library(model, data, backend):
    """What ``zq quantize --w-bits 4 --a-bits 4 --backend B`` is in Python: the pipeline's calibrate stage."""
    return zq_plugin.quantize(
        model, data=data, w_bits=4, a_bits=4, backend=backend, stage="calibrate", observer="minmax", progress=False
    )


def test_quantize_out_saves_the_fx_simulation(tmp_path, capsys):
    """Issue 14: zq quantize below 8 bits wrote nothing; --out saves the calibrated simulation (torch.export)."""
    out = tmp_path / "out" / "sim.pt2"
    model, data = _quantize_out("fx", out, capsys)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sim = _library(model, data, "fx")
        assert torch.equal(torch.export.load(out).module()(x), sim(x))  # any batch size, the same logits
    assert cli.main(["quantize", "--model", "plain_cnn", "--data", "noise", "--out", str(tmp_path / "m.pt")]) == 2
    assert "ends in .pt2" in capsys.readouterr().err
    (tmp_path / "afile").write_text("a file where a folder is needed")
    assert (
        cli.main(["quantize", "--model", "plain_cnn", "--data", "noise", "--out", str(tmp_path / "afile/m.pt2")]) == 2
    )
    assert "cannot be written" in capsys.readouterr().err


def _in_fresh_process(folder, script):
    """Save a fixed input batch as ``folder/x.pt``, run ``script`` in a new Python there; return the batch."""
    import subprocess
    import sys

    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.save(x, folder / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return x


def test_quantize_backend_pt2e_saves_a_program_that_loads_in_a_fresh_process(tmp_path, capsys):
    """Issue 16: ``--backend pt2e --out`` writes the converted program; a process without zq_plugin loads it."""
    model, data = _quantize_out("pt2e", tmp_path / "q.pt2", capsys)
    x = _in_fresh_process(
        tmp_path,
        "import sys, torch, torchao.quantization.pt2e\n"
        "y = torch.export.load('q.pt2').module()(torch.load('x.pt'))\n"
        "assert not any(m.startswith('zq_plugin') for m in sys.modules), 'imported'\n"
        "torch.save(y.detach(), 'y.pt')\n",
    )
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), _library(model, data, "pt2e")(x))
    argv = ["quantize", "--model", "plain_cnn", "--data", "noise", "--num-samples", "8", "--backend", "pt2e"]
    assert cli.main([*argv, "--reconstruct", "genie-m", "--iterations", "2"]) == 0  # carried into PT2E
    report = json.loads(capsys.readouterr().out)
    assert (report["reconstruction"], report["observer"]) == ("genie-m", "mse")
    steps = [(row["weight_step"], row["input_step"]) for row in report["model"]["layers"]]
    assert steps == [("carried", "carried")] * 6
    assert cli.main([*argv, "--bias-correction"]) == 2
    assert "belong to --backend brevitas" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_out_loads_without_zq_plugin_on_both_backends(tmp_path, capsys):
    """Issue 14: the saved models load in a process that imports neither zq_plugin nor Brevitas."""
    pytest.importorskip("brevitas")
    model, data = _quantize_out("fx", tmp_path / "fx" / "sim.pt2", capsys)
    _quantize_out("brevitas", tmp_path / "brevitas" / "model.pt", capsys)
    script = (
        "import sys, torch\n"
        "x = torch.load('x.pt')\n"
        "y = {'fx': torch.export.load('fx/sim.pt2').module()(x), 'brevitas': torch.jit.load('brevitas/model.pt')(x)}\n"
        "assert not any(m.startswith(('zq_plugin', 'brevitas')) for m in sys.modules), 'imported'\n"
        "torch.save({k: v.detach() for k, v in y.items()}, 'y.pt')\n"
    )
    x = _in_fresh_process(tmp_path, script)
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        assert torch.equal(got["fx"], _library(model, data, "fx")(x))
        assert torch.allclose(got["brevitas"], _library(model, data, "brevitas")(x), atol=1e-5)
        assert torch.allclose(got["brevitas"], got["fx"], atol=1e-4)  # one request, one model


def _umask():
    old = os.umask(0o022)
    os.umask(old)
    return old


def test_quantize_with_plan_reports_the_plans_bits(data_file, tmp_path, capsys):
    """Issue 14: with --plan the summary said w_bits: 8, a_bits: 8 (the unused uniform flags)."""
    plan = _mixed_plan(tmp_path)
    argv = ["quantize", "--model", "resnet_s", "--data", str(data_file), "--plan", str(tmp_path / "plan.json")]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert "w_bits" not in report and "a_bits" not in report
    assert report["average_w_bits"] == round(plan.average_w_bits(), 3)
    n = len(plan.layers)
    assert report["layers_by_w_bits"] == {"3": 1, "4": n - 3, "8": 2}
    assert report["layers_by_a_bits"] == {"8": n}


def test_version_and_every_option_has_help(capsys):
    """Issue 14: --help lacked help texts and defaults for most options, and there was no --version."""
    import argparse

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"zq {zq_plugin.__version__}"
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("synthesize", "quantize"):
        missing = [a.option_strings for a in commands[name]._actions if not a.help]
        assert missing == [], name
        text = commands[name].format_help()
        assert "(default: 256)" in text and "(default: 0)" in text and "(default: None)" not in text
    assert "(default: zeroq)" in commands["synthesize"].format_help()
    assert "(default: 8)" in commands["quantize"].format_help()


def test_quantize_best_recipe_reconstructs(tmp_path, capsys):
    argv = ["quantize", "--model", "resnet_s", "--data", "noise", "--num-samples", "32", "--w-bits", "4"]
    rc = cli.main([*argv, "--a-bits", "4", "--recipe", "best", "--iterations", "3", "--cache-dir", str(tmp_path)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["reconstruction"], report["iterations"], report["observer"]) == ("genie-m", 3, "mse")
    assert [p.name for p in tmp_path.glob("reconstruct-*/unit-*.pt")] == ["unit-00005.pt"]  # 5 units, resumable


def test_quantize_best_recipe_on_brevitas_exports_onnx(tmp_path, capsys):
    pytest.importorskip("brevitas")
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "best.onnx"
    argv = ["quantize", "--model", "resnet_s", "--data", "noise", "--num-samples", "32", "--w-bits", "4"]
    argv += ["--a-bits", "4", "--recipe", "best", "--iterations", "3", "--backend", "brevitas", "--onnx-out", str(onnx)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["backend"], report["reconstruction"], report["observer"]) == ("brevitas", "genie-m", "mse")
    assert onnx.is_file()


def test_finetune_writes_the_model_and_the_generator_as_the_library_would(tmp_path, capsys):
    """Issue 17: ``zq finetune`` is ``zq_plugin.finetune`` with the same options, and its files load back."""
    from zq_plugin import AdaDFQConfig, GeneratorStream

    out, gen = tmp_path / "ft.pt2", tmp_path / "gen.pt"
    argv = ["finetune", "--model", "resnet_s", "--w-bits", "3", "--a-bits", "3", "--steps", "3", "--batch-size", "8"]
    argv += ["--num-samples", "16", "--option", "warmup=1", "--out", str(out), "--generator-out", str(gen)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generator"] == "adadfq" and report["steps"] == 3 and report["first_last_bits"] == 8
    assert not (tmp_path / "ft.pt2.cache").exists()  # the resume checkpoints go once the model is written
    model = zoo.load("resnet_s")
    want = zq_plugin.finetune(
        model, w_bits=3, a_bits=3, steps=3, batch_size=8, calibration_samples=16, input_shape=(1, 28, 28),
        config=AdaDFQConfig(warmup=1), progress=False,
    )  # fmt: skip
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(torch.export.load(out).module()(x), want(x), atol=1e-5)
    images, labels = next(iter(GeneratorStream.load(gen, model)))
    assert images.shape == (8, 1, 28, 28) and labels.shape == (8,)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--generator", "none"], "--generator none needs --data"),
        (["--generator", "none", "--data", "noise", "--generator-out", "g.pt"], "--generator-out saves"),
        (["--out", "m.pt"], "ends in .pt2"),
        (["--option", "margin=[0.9,0.1]"], "lambda_l < lambda_u"),
        (["--option", "nosuch=1"], "not an option of --generator adadfq"),
        (["--option", "reconstruct.iterations=2"], "the prefix is one of game."),  # no --init reconstruct
        (["--w-bits", "1"], "--w-bits=1 is not supported"),
    ],
)
def test_finetune_bad_options_are_refused_before_the_model_is_loaded(extra, match, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("model loaded before the options were checked"))
    assert cli.main(["finetune", "--model", "resnet_s", *extra]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["pt2e", "brevitas"])
def test_finetune_deploys_on_each_backend_with_the_reconstruction_options(backend, tmp_path, capsys):
    """Issue 29: zq finetune goes through the pipeline: --backend carries the fine-tuned simulation,
    --option reaches the reconstruction of --init reconstruct, the JSON holds describe()'s report."""
    pytest.importorskip("torchao" if backend == "pt2e" else "brevitas")
    onnx = tmp_path / "m.onnx"
    argv = ["finetune", "--model", "plain_cnn", "--generator", "none", "--data", "noise", "--num-samples", "16"]
    argv += ["--steps", "2", "--batch-size", "8", "--init", "reconstruct", "--option", "iterations=2"]
    argv += ["--option", "lr_student=1e-4", "--backend", backend]
    if backend == "brevitas":  # PT2E's ONNX export (dynamo) costs 10 s: tested in test_pt2e_backend
        argv += ["--onnx-out", str(onnx)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"] == {"game": {"lr_student": 1e-4}, "reconstruct": {"iterations": 2}}
    assert report["model"]["backend"] == backend and report["model"]["build"]["stage"] == "finetune"
    quantized = [row for row in report["model"]["layers"] if row["w_bits"] is not None]
    assert quantized and {row["weight_step"] for row in quantized} == {"carried"}
    assert onnx.is_file() == (backend == "brevitas")


def test_quantize_option_reaches_synthesis_and_reconstruction(capsys):
    """Issue 29: --option reaches the synthesizer and the reconstruction from zq quantize; bad names refused first."""
    argv = ["quantize", "--model", "plain_cnn", "--data", "noise", "--num-samples", "8", "--w-bits", "4"]
    argv += ["--a-bits", "4"]
    assert cli.main([*argv, "--reconstruct", "adaround", "--option", "std=0.5", "--option", "iterations=2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"] == {"std": 0.5, "iterations": 2} and report["iterations"] == 2
    assert cli.main([*argv, "--option", "nope=1"]) == 2
    assert "not an option of --data noise" in capsys.readouterr().err
    assert cli.main([*argv, "--option", "iterations=2"]) == 2  # no reconstruction asked for
    assert "iterations" in capsys.readouterr().err


def test_quantize_with_a_bops_budget_reports_the_plan_it_built(data_file, capsys):
    """Issue 30: --budget W4A4 plans weight and input bits per layer and builds that plan."""
    base = ["quantize", "--model", "resnet_s", "--data", str(data_file), "--budget", "W3A3"]
    assert cli.main(base) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["budget"] == "W3A3" and report["bops"] <= report["budget_bops"]
    assert "w_bits" not in report and sum(report["layers_by_a_bits"].values()) == 10  # resnet_s: 10 layers
    assert cli.main([*base, "--w-bits", "4"]) == 2 and "--budget" in capsys.readouterr().err
    assert cli.main([*base[:-1], "MP4"]) == 2 and "budget" in capsys.readouterr().err
