"""Hardswish outputs at 4 bits: a MobileNetV3-style net before and after ``keep_min`` (issue 15).

A MobileNetV3-style model (Hardswish, squeeze-excitation with Hardsigmoid, inverted residuals;
not in the zoo) is trained here on Fashion-MNIST (2 epochs, Adam with one-cycle, seed 0; about 4
minutes on 2 cores; cached as ``zq_out/mbv3_style.pt``). On the 10,000 test images it reports:

* the float model, and the float model with the negative lobe of every Hardswish zeroed (what a
  4-bit grid with zero point 0 does to it);
* the clamping FX simulation with the MSE observers on 256 real training images at W8A4 and
  W4A4 (first/last layer 8-bit), with the Hardswish-output observers searching both ends of the
  range (``keep_min`` off, the old behaviour) and keeping the minimum (on, the default);
* the best recipe, ``zq_plugin.quantize`` (ZeroQ data, MSE observers, Genie-M), at W4A4 and W3A3,
  without the valid input box (the model has no ``input_range``: the warning a user sees), or
  with ``input_range`` given (``--input-range``).

Run: ``.venv/bin/python benchmarks/negative_lobe.py`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import zq_plugin
from zq_plugin import datasets
from zq_plugin.backends import fx
from zq_plugin.demo import real_subset
from zq_plugin.evaluation import accuracy
from zq_plugin.observers import ao
from zq_plugin.zoo import INPUT_RANGE

CHECKPOINT = Path("zq_out/mbv3_style.pt")


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(8, channels // 4)
        self.reduce, self.expand = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [*conv_bn(cin, hidden), nn.Hardswish()]
        layers += [*conv_bn(hidden, hidden, 3, stride, hidden), nn.Hardswish()]
        layers += [SqueezeExcite(hidden)] if se else []
        layers += conv_bn(hidden, cout)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 1, False),
            InvertedResidual(16, 48, 24, 2, False),
            InvertedResidual(24, 64, 24, 1, True),
            InvertedResidual(24, 64, 32, 2, True),
            InvertedResidual(32, 64, 32, 1, True),
            InvertedResidual(32, 64, 48, 1, True),
        )
        self.head = nn.Sequential(*conv_bn(48, 64), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


def trained_model(epochs: int = 2) -> nn.Module:
    model = MobileNetV3Style()
    if CHECKPOINT.is_file():
        model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    x, y = datasets.load_fashion_mnist("train")
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    steps = epochs * ((len(x) + 127) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CHECKPOINT)
    return model.eval()


class LobeZeroed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x).clamp_min(0.0)


def lobe_zeroed(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    for module in list(clone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Hardswish):
                setattr(module, child_name, LobeZeroed())
    return clone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-range", action="store_true", help="give the recipe the valid input box")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    t = time.perf_counter()
    model = trained_model()
    print(f"trained/loaded in {time.perf_counter() - t:.0f} s")
    x_test, y_test = datasets.load_fashion_mnist("test")
    real = real_subset(256)
    print(f"| model | top-1 |\n|---|---|\n| float | {accuracy(model, x_test, y_test):.2f} |")
    print(f"| float, Hardswish negative lobe zeroed | {accuracy(lobe_zeroed(model), x_test, y_test):.2f} |")
    print("\n| real data, MSE observers | keep_min off | keep_min on |\n|---|---|---|")
    keep = fx.keep_negative_lobes
    for w_bits, a_bits in ((8, 4), (4, 4), (3, 3)):
        cells = []
        for on in (False, True):
            fx.keep_negative_lobes = keep if on else (lambda prepared: [])
            try:
                sim = fx.quantize_fx(
                    model, real, w_bits=w_bits, a_bits=a_bits,
                    act_observer=ao.MSEObserver, weight_observer=ao.PerChannelMSEObserver,
                )  # fmt: skip
            finally:
                fx.keep_negative_lobes = keep
            cells.append(f"{accuracy(sim, x_test, y_test):.2f}")
        print(f"| W{w_bits}A{a_bits} | {' | '.join(cells)} |", flush=True)
    box = INPUT_RANGE if args.input_range else None
    print(f"\n| best recipe (zq_plugin.quantize, ZeroQ data, input_range={box}) | top-1 | seconds |\n|---|---|---|")
    for w_bits, a_bits in ((4, 4), (3, 3)):
        t = time.perf_counter()
        sim = zq_plugin.quantize(
            model, w_bits=w_bits, a_bits=a_bits, input_shape=(1, 28, 28), input_range=box, progress=False
        )
        seconds = time.perf_counter() - t
        print(f"| W{w_bits}A{a_bits} | {accuracy(sim, x_test, y_test):.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
