"""Accuracy measurement shared by the demo, the CLI and the tests."""

from __future__ import annotations

import torch
from torch import nn

from zq_plugin._utils import OutputFn, eval_mode, input_placement, place, select_output


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 250,
    *,
    output_fn: OutputFn | None = None,
) -> float:
    """Top-1 accuracy in percent; runs in eval/inference mode and restores the model's modes.

    The logits are picked from the model's output by :func:`zq_plugin._utils.select_output`
    (first tensor of a tuple/list, a dict's ``"logits"``/``"out"`` entry; ``output_fn=``
    overrides). Batches are moved to the model's device and floating dtype (its first parameter or buffer).
    The default batch of 250 keeps activations small enough for the allocator to reuse memory;
    batches of 1000 spent more time in page faults than in compute on the zoo models.

    Raises:
        ModelError: the output holds no tensor, or ``output_fn`` returned something else.

    Example:
        >>> import torch
        >>> accuracy(torch.nn.Identity(), torch.eye(3), torch.tensor([0, 1, 0]))
        66.66666666666667
    """
    device, dtype = input_placement(model)
    correct = 0
    with eval_mode(model), torch.inference_mode():
        for i in range(0, len(images), batch_size):
            logits = select_output(model(place(images[i : i + batch_size], device, dtype)), output_fn)
            pred = logits.argmax(1).to(labels.device)
            correct += int((pred == labels[i : i + batch_size]).sum())
    return 100.0 * correct / len(images)
