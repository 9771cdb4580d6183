import json

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
    rc = cli.main([*argv, "--act-observer", "mse", "--weight-observer", "aciq"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["act_observer"], report["weight_observer"]) == ("mse", "aciq")


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


def test_quantize_with_plan_on_both_backends(data_file, tmp_path, capsys):
    pytest.importorskip("brevitas")
    pytest.importorskip("onnxruntime")
    from zq_plugin.mixed_precision import BitPlan

    model = zoo.load("resnet_s")
    plan = BitPlan.uniform(model, w_bits=4, a_bits=8).replace_layer("layer3.conv2", w_bits=3)
    plan.save(tmp_path / "plan.json")
    base = ["quantize", "--model", "resnet_s", "--data", str(data_file), "--plan", str(tmp_path / "plan.json")]
    assert cli.main(base) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"].endswith("plan.json") and report["average_w_bits"] < 4.0
    onnx = tmp_path / "m.onnx"
    argv = [*base, "--backend", "brevitas", "--bias-correction", "--act-stats", "zq-mse", "--onnx-out", str(onnx)]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "brevitas" and report["bias_correction"] and onnx.is_file()
    assert cli.main([*base, "--int8-out", str(tmp_path / "x.pt")]) == 2
    assert "--int8-out" in capsys.readouterr().err
    assert cli.main([*base, "--onnx-out", str(onnx)]) == 2  # FX backend has no ONNX export here
    assert "--backend brevitas" in capsys.readouterr().err


def test_synthesize_input_range_for_a_user_model(tmp_path):
    """Found from outside: a model without input_range was distilled unclamped, and the CLI had no flag for it."""
    ckpt, out = tmp_path / "w.pt", tmp_path / "d.pt"
    torch.save(zoo.load("resnet_s").state_dict(), ckpt)
    arch = ["--arch", "zq_plugin.zoo.models:ResNetS", "--checkpoint", str(ckpt)]
    argv = ["synthesize", *arch, "--num-samples", "4", "--batch-size", "4", "--option", "steps=5", "--out", str(out)]
    assert cli.main([*argv, "--input-range=-0.5,0.25"]) == 0  # "=": the value starts with "-"
    images = torch.load(out, weights_only=True)["images"]
    assert images.min() >= -0.5 and images.max() <= 0.25


def test_plan_readme_command_measures_the_default_points(data_file, tmp_path):
    """Issue 14: the README's `zq plan` (no --evaluate) crashed after writing plan.json, before frontier.json."""
    out = tmp_path / "plan"
    assert (
        cli.main(["plan", "--model", "resnet_s", "--data", str(data_file), "--budget", "MP4", "--out", str(out)]) == 0
    )
    doc = json.loads((out / "frontier.json").read_text())
    assert len(doc["measured"]) >= 2 and doc["measured"][-1]["chosen"]
    assert (out / "frontier.png").exists()


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


def test_int8_out_creates_its_folder(tmp_path, capsys):
    """Issue 14: --int8-out nodir/x.pt failed after the work while --onnx-out created its folder."""
    out = tmp_path / "nodir" / "int8.pt"
    argv = ["quantize", "--model", "plain_cnn", "--data", "noise", "--num-samples", "16", "--int8-out", str(out)]
    assert cli.main(argv) == 0
    assert torch.jit.load(out)(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
