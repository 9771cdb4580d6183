"""Architectures of the model zoo: small Fashion-MNIST CNNs that behave like their big cousins.

Every model takes *normalized* images ``(x - MEAN) / STD`` of shape ``[N, 1, 28, 28]`` and
returns logits ``[N, 10]``. Each carries ``input_range``, the image of pixel values
``[0, 1]`` under that normalization, which synthesis uses as its valid-input box.

Example:
    >>> import torch
    >>> from zq_plugin.zoo.models import ResNetS
    >>> ResNetS()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from zq_plugin.datasets import MEAN, STD  # Fashion-MNIST's training-set pixel statistics (pixels in [0, 1])

INPUT_RANGE = ((0.0 - MEAN) / STD, (1.0 - MEAN) / STD)  # about (-0.810, 2.023)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class _ZooNet(nn.Module):
    """Base class: records the valid input box of the normalized image."""

    input_range: tuple[float, float] = INPUT_RANGE


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.shortcut: nn.Module = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, cin, H, W]`` -> ``[N, cout, H / stride, W / stride]``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetS(_ZooNet):
    """ResNet-style net: stem at 28 px, three basic blocks (28 -> 14 -> 7 -> 7 px), avg-pool, linear."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn(1, w1, 3), nn.ReLU())
        self.layer1 = BasicBlock(w1, w2, 2)
        self.layer2 = BasicBlock(w2, w3, 2)
        self.layer3 = BasicBlock(w3, w3, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``."""
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # [N, w3, 7, 7]
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *_conv_bn(hidden, cout, 1)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, cin, H, W]`` -> ``[N, cout, H / stride, W / stride]``."""
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2S(_ZooNet):
    """MobileNetV2-style net: inverted residuals with depthwise convs, ReLU6 and BatchNorm."""

    # (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper's table.
    # The first depthwise conv already has stride 2 (28 -> 14 px): depthwise convs are slow on
    # CPU, and this keeps a fake-quantized pass over the 10k test images at seconds on 2 cores.
    SETTINGS: tuple[tuple[int, int, int, int], ...] = ((1, 16, 1, 2), (4, 24, 2, 2), (4, 32, 3, 1), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, last_channels: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3), nn.ReLU6()]
        cin = 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [*_conv_bn(cin, last_channels, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``."""
        x = self.features(x)  # [N, last_channels, 4, 4]
        return self.classifier(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * gate(expand(relu(reduce(avgpool(x)))))``, the gate a module.

    Hu et al., CVPR 2018; MobileNetV3 (Howard et al., ICCV 2019) gates with ``Hardsigmoid``,
    EfficientNet (Tan and Le, ICML 2019) with ``Sigmoid``. The reduction keeps a quarter of the
    channels (at least 8).
    """

    def __init__(self, channels: int, gate: type[nn.Module]) -> None:
        super().__init__()
        hidden = max(8, channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]``, each channel scaled by its gate in ``[0, 1]``."""
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """MobileNetV3 / EfficientNet block: 1x1 expand, kxk depthwise, optional SE, 1x1 linear project.

    The activation follows the expand and the depthwise conv; the residual is added when the
    shapes match. The expand is skipped when ``hidden == cin``.
    """

    def __init__(
        self,
        cin: int,
        hidden: int,
        cout: int,
        *,
        kernel: int,
        stride: int,
        act: type[nn.Module],
        gate: type[nn.Module] | None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [*_conv_bn(cin, hidden, 1), act()]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), act()]
        if gate is not None:
            layers.append(SqueezeExcite(hidden, gate))
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, cin, H, W]`` -> ``[N, cout, H / stride, W / stride]``."""
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV3S(_ZooNet):
    """MobileNetV3/EfficientNet-style net: Hardswish and SiLU, SE gates (Hardsigmoid, Sigmoid), 5x5 depthwise.

    The first blocks follow MobileNetV3-Small (ReLU, then Hardswish with Hardsigmoid-gated SE),
    the last two EfficientNet's MBConv (SiLU, Sigmoid-gated SE); the head is MobileNetV3's 1x1
    conv + Hardswish, pool, linear + Hardswish, linear. The activations with a negative lobe
    (Hardswish, SiLU) and the gates are what makes low-bit quantization of this family hard.
    """

    # (hidden, out channels, kernel, stride, activation, SE gate)
    SETTINGS: tuple[tuple[int, int, int, int, type[nn.Module], type[nn.Module] | None], ...] = (
        (16, 16, 3, 2, nn.ReLU, nn.Hardsigmoid),  # 28 -> 14 px
        (64, 24, 3, 2, nn.ReLU, None),  # 14 -> 7 px
        (72, 24, 3, 1, nn.ReLU, None),
        (96, 40, 5, 1, nn.Hardswish, nn.Hardsigmoid),
        (120, 40, 5, 1, nn.Hardswish, nn.Hardsigmoid),
        (120, 48, 5, 1, nn.SiLU, nn.Sigmoid),
        (144, 48, 5, 1, nn.SiLU, nn.Sigmoid),
    )

    def __init__(self, num_classes: int = 10, last_channels: int = 192, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(1, 16, 3), nn.Hardswish()]
        cin = 16
        for width, cout, kernel, stride, act, gate in self.SETTINGS:
            layers.append(MBConv(cin, width, cout, kernel=kernel, stride=stride, act=act, gate=gate))
            cin = cout
        layers += [*_conv_bn(cin, last_channels, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_channels, hidden), nn.Hardswish(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``."""
        x = self.features(x)  # [N, last_channels, 7, 7]
        return self.classifier(torch.flatten(self.pool(x), 1))


class PlainCNN(_ZooNet):
    """A VGG-style net with no normalization layer at all (for BN-free synthesis)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[N, 1, 28, 28]`` -> logits ``[N, num_classes]``."""
        return self.classifier(self.features(x))  # features: [N, 64, 7, 7]
