"""The one registry of synthesis methods, keyed by name.

A method is a frozen keyword-only config dataclass plus a function that makes one batch::

    make_batch(model, config, ctx) -> Tensor[n, C, H, W]

where ``ctx`` (:class:`BatchContext`) carries the batch size, input shape, valid input box and
a seeded generator. Registering is one decorator::

    @register("noise", NoiseConfig)
    def make_noise(model, config, ctx): ...
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zq_plugin.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BatchContext:
    """What a method needs to make one batch (built by :func:`zq_plugin.synthesize`)."""

    batch_size: int
    input_shape: tuple[int, ...]
    input_range: tuple[float, float] | None
    generator: torch.Generator
    progress: bool = False
    desc: str = ""
    loss_log: list[float] | None = None  # when a list, optimizing methods append each step's loss
    offset: int = 0  # index of the batch's first sample in the whole set (class-balanced methods)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))  # the model's
    dtype: torch.dtype = torch.float32  # the model's floating dtype
    seed: int = 0  # the whole call's seed (batch seeds are drawn into ``generator``)
    # one dict per synthesize() call, the same object in every batch's context: a method that
    # trains something once per call (AdaDFQ's generator) keeps it here
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def work_dtype(self) -> torch.dtype:
        """The dtype of the optimized tensors: the model's, float32 for float16/bfloat16 models."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` moved to the model's device in :attr:`work_dtype`.

        Random draws are made on the CPU from :attr:`generator`, so images do not depend on the device.
        """
        return x.to(device=self.device, dtype=self.work_dtype)

    def feed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the model's dtype, as the model's forward takes it (differentiable cast)."""
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def clamp_(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` in place onto the valid input box (no-op without one)."""
        if self.input_range is not None:
            x.clamp_(*self.input_range)
        return x


# a batch of images, or (images, labels) for class-targeted methods
MakeBatch = Callable[[nn.Module, Any, BatchContext], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A registered synthesis method."""

    name: str
    config_cls: type
    make_batch: MakeBatch
    needs_batchnorm: bool

    def config(self, options: dict[str, Any]) -> Any:
        """Build the method's config from keyword options, rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no option(s) {unknown}; its options are {sorted(known)}.")
        hints = typing.get_type_hints(self.config_cls)
        for name, value in options.items():
            hint = hints.get(name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if (hint is int and not (numeric and float(value).is_integer())) or (hint is float and not numeric):
                kind = "an int" if hint is int else "a number"
                raise ConfigError(f"option {name}={value!r} of method {self.name!r} must be {kind}.")
            if hint is int:
                options = {**options, name: int(value)}
        try:
            return self.config_cls(**options)
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"bad options for method {self.name!r}: {exc}") from exc


METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type, *, needs_batchnorm: bool = False) -> Callable[[MakeBatch], MakeBatch]:
    """Decorator: add a batch-making function to :data:`METHODS` under ``name``."""

    def wrap(fn: MakeBatch) -> MakeBatch:
        METHODS[name] = Method(name, config_cls, fn, needs_batchnorm)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """Look up a method by name; an unknown name raises :class:`ConfigError` listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown synthesis method {name!r}; known methods: {sorted(METHODS)}.")
    return METHODS[name]
