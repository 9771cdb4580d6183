"""measure_sensitivity reruns only what a perturbed layer reaches: the same numbers as whole forwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zq_plugin.mixed_precision import sensitivity as sens_mod
from zq_plugin.mixed_precision.sensitivity import measure_sensitivity


class InplaceResidual(nn.Module):
    """`out += skip` and ReLU(inplace=True): in-place ops on values the cache also holds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        out = self.a(x)
        out += x
        out = self.relu(out)
        out = self.b(out).mean((2, 3))
        return self.fc(out)


class Functional(nn.Module):
    """A weight read by F.linear (no module call), a module called twice, a tuple output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        x = self.shared(self.shared(F.relu(self.conv(x))))
        x = x.mean((2, 3))
        return F.linear(x, self.head.weight, self.head.bias), x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: no graph, whole forwards
            x = x * 2
        return self.fc(x.mean((2, 3)))


def _warm(model):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


@pytest.mark.parametrize("cls", [InplaceResidual, Functional, Untraceable])
def test_suffix_gives_the_numbers_of_whole_forwards(cls, monkeypatch):
    torch.manual_seed(0)
    model = _warm(cls())
    data = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"bits": (2, 4, 8), "activations": True, "act_range": "mse", "batch_size": 16, "progress": False}
    fast = measure_sensitivity(model, data, **kwargs)
    monkeypatch.setattr(sens_mod, "SUFFIX_CACHE_BYTES", -1)  # whole forwards
    whole = measure_sensitivity(model, data, **kwargs)
    assert fast.layers == whole.layers
    torch.testing.assert_close(torch.tensor(fast.weight), torch.tensor(whole.weight), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(fast.activation), torch.tensor(whole.activation), rtol=1e-5, atol=1e-7)
    assert all(w[0] > 0 for w in fast.weight)  # 2-bit weights change every layer's output
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_suffix_reruns_only_the_nodes_after_the_layer(monkeypatch):
    model = _warm(InplaceResidual())
    batches = [torch.randn(8, 1, 8, 8)]
    suffix = sens_mod._Suffix(model, batches)
    assert suffix.cache is not None
    ran = []
    original = torch.fx.Interpreter.run_node

    def counting(self, n):
        ran.append(n.name)
        return original(self, n)

    monkeypatch.setattr(torch.fx.Interpreter, "run_node", counting)
    suffix.runner("b")(0, batches[0])
    assert "stem" not in ran and "a" not in ran and "b" in ran and "fc" in ran
