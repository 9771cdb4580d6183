"""Model zoo: small CNNs trained on Fashion-MNIST, shipped with the package.

| name            | architecture                                              | has BN |
|-----------------|-----------------------------------------------------------|--------|
| ``resnet_s``      | ResNet-style: stem + 3 basic blocks, residual adds, ReLU  | yes    |
| ``mobilenetv2_s`` | MobileNetV2-style: inverted residuals, depthwise, ReLU6   | yes    |
| ``mobilenetv3_s`` | MobileNetV3/EfficientNet-style: Hardswish, SiLU, SE gates | yes    |
| ``plain_cnn``     | VGG-style conv/ReLU/max-pool, no normalization at all     | no     |

Test accuracies are in ``checkpoints/metrics.json`` and docs/zoo.md; the seeded script that
trained them is :mod:`zq_plugin.zoo.train`. Models take normalized images (see
:mod:`zq_plugin.datasets`) and carry ``input_range``, the valid input box.

Example:
    >>> from zq_plugin import zoo
    >>> model = zoo.load("resnet_s")
    >>> model.training
    False
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zq_plugin.errors import ConfigError, ZQError
from zq_plugin.zoo.models import INPUT_RANGE, MEAN, STD, MobileNetV2S, MobileNetV3S, PlainCNN, ResNetS

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet_s": ResNetS,
    "mobilenetv2_s": MobileNetV2S,
    "mobilenetv3_s": MobileNetV3S,
    "plain_cnn": PlainCNN,
}
INPUT_SHAPE = (1, 28, 28)

__all__ = [
    "ARCHITECTURES",
    "INPUT_RANGE",
    "INPUT_SHAPE",
    "MEAN",
    "STD",
    "available",
    "has_batchnorm",
    "load",
    "metrics",
]


def available() -> list[str]:
    """Names of the zoo's models."""
    return list(ARCHITECTURES)


def _check_name(name: str) -> type[nn.Module]:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown zoo model {name!r}; known models: {available()}.")
    return ARCHITECTURES[name]


def load(name: str, *, pretrained: bool = True) -> nn.Module:
    """The zoo model ``name`` in eval mode, with its trained weights (``weights_only`` load).

    Args:
        name: one of :func:`available`.
        pretrained: load the shipped checkpoint (else random initialization).

    The model declares its input, ``model.input_shape == INPUT_SHAPE`` (one image, ``(1, 28, 28)``),
    so :func:`zq_plugin.synthesize` needs no ``input_shape``.
    """
    model = _check_name(name)()
    if pretrained:
        path = CHECKPOINT_DIR / f"{name}.pt"
        if not path.is_file():
            raise ZQError(
                f"checkpoint {path.name} is missing from the package; retrain it: python -m zq_plugin.zoo.train {name}"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.input_shape = INPUT_SHAPE  # type: ignore[assignment]  # synthesize() reads it
    return model.eval()


def has_batchnorm(name: str) -> bool:
    """Whether zoo model ``name`` has BatchNorm layers (BN-statistics methods need them)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _check_name(name)().modules())


def metrics() -> dict[str, Any]:
    """Recorded training metrics (test top-1 %, parameters, epochs) per model."""
    path = CHECKPOINT_DIR / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
