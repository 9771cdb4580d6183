import pytest
import torch

from zq_plugin import datasets, zoo
from zq_plugin.errors import ConfigError
from zq_plugin.evaluation import accuracy

THRESHOLDS = {"resnet_s": 92.0, "mobilenetv2_s": 91.0, "mobilenetv3_s": 91.0, "plain_cnn": 89.0}


def test_names_and_unknown_name():
    assert set(zoo.available()) == set(THRESHOLDS)
    with pytest.raises(ConfigError, match=r"known models: .*resnet_s"):
        zoo.load("resnet50")


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_load_returns_eval_model_with_input_range(name):
    model = zoo.load(name)
    assert not model.training and all(not m.training for m in model.modules())
    assert model(torch.zeros(2, *zoo.INPUT_SHAPE)).shape == (2, 10)
    assert model.input_range == pytest.approx(((0 - zoo.MEAN) / zoo.STD, (1 - zoo.MEAN) / zoo.STD))


def test_batchnorm_presence():
    assert zoo.has_batchnorm("resnet_s") and zoo.has_batchnorm("mobilenetv2_s")
    assert not zoo.has_batchnorm("plain_cnn")
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in zoo.load("plain_cnn").modules())


def test_architecture_features():
    mb = zoo.load("mobilenetv2_s")
    convs = [m for m in mb.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs), "depthwise convs"
    assert any(isinstance(m, torch.nn.ReLU6) for m in mb.modules())
    assert any(getattr(m, "use_residual", False) for m in mb.modules())


def test_mobilenetv3_s_has_the_parts_that_make_low_bits_hard():
    net = zoo.load("mobilenetv3_s")
    kinds = {type(m) for m in net.modules()}
    assert {torch.nn.Hardswish, torch.nn.SiLU, torch.nn.Hardsigmoid, torch.nn.Sigmoid} <= kinds
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 and c.kernel_size == (5, 5) for c in convs), "5x5 depthwise"
    assert zoo.has_batchnorm("mobilenetv3_s")


def test_checkpoints_are_small_and_recorded():
    total = sum((zoo.CHECKPOINT_DIR / f"{n}.pt").stat().st_size for n in THRESHOLDS)
    assert total < 5 * 2**20
    metrics = zoo.metrics()
    for name, floor in THRESHOLDS.items():
        assert metrics[name]["test_top1"] >= floor


@pytest.fixture(scope="module")
def test_set():
    return datasets.load_fashion_mnist("test")


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_accuracy_on_test_subset(name, test_set):
    x, y = test_set
    assert accuracy(zoo.load(name), x[:1000], y[:1000]) >= THRESHOLDS[name] - 3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_accuracy_on_full_test_set(name, test_set):
    x, y = test_set
    acc = accuracy(zoo.load(name), x, y)
    assert acc >= THRESHOLDS[name]
    assert acc == pytest.approx(zoo.metrics()[name]["test_top1"], abs=0.01)
