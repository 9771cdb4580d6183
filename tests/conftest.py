import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

# The README command must pass on any machine as it does in CI: the default profile is deterministic
# (derandomized, no example database in .hypothesis/ to replay a past failure forever). Random
# exploration is opt-in: HYPOTHESIS_PROFILE=explore (a failure it finds is kept as an @example).
# 100 examples a property (Hypothesis's own default) keeps the default suite under 15 minutes on 2
# cores; the observers' properties alone took 3.5 minutes at 200.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("default", max_examples=100, derandomize=True, database=None, **_common)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_common)
settings.register_profile("explore", max_examples=1000, **_common)
settings.register_profile("quick", max_examples=20, derandomize=True, database=None, **_common)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))


class TinyBNNet(nn.Module):
    """conv-BN-ReLU, strided conv-BN-ReLU with a residual 1x1 path, depthwise conv-BN, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(4, 8, 1, stride=2)
        self.relu2 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu3 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)) + self.short(x))
        x = self.relu3(self.bn3(self.dw(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


@pytest.fixture
def tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyBNNet()).eval()


def pool_bn_net() -> nn.Module:
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear for ``[N, 1, 8, 8]`` inputs, BN means off zero (seed 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 10),
    ).eval()  # fmt: skip
    net[1].running_mean.uniform_(-0.5, 0.5)
    return net


@pytest.fixture
def tiny_plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def snapshot(model: nn.Module) -> dict:
    """Everything synthesis must leave untouched."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grads"]) == all(g is None for g in before["grads"])
    assert before["hooks"] == after["hooks"]
