"""Accuracy measurement shared by the demo, the CLI and the tests."""

from __future__ import annotations

import torch
from torch import nn

from zq_plugin._utils import eval_mode


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    """Top-1 accuracy in percent; runs in eval/inference mode and restores the model's modes.

    The default batch of 250 keeps activations small enough for the allocator to reuse memory;
    batches of 1000 spent more time in page faults than in compute on the zoo models.

    Example:
        >>> import torch
        >>> accuracy(torch.nn.Identity(), torch.eye(3), torch.tensor([0, 1, 0]))
        66.66666666666667
    """
    correct = 0
    with eval_mode(model), torch.inference_mode():
        for i in range(0, len(images), batch_size):
            pred = model(images[i : i + batch_size]).argmax(1)
            correct += int((pred == labels[i : i + batch_size]).sum())
    return 100.0 * correct / len(images)
