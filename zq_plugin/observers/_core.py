"""What the torch.ao and torchao observer families share: buffers, forward, caching, statistics.

A concrete observer is ``class X(<statistic mixin>, <family base>)``: the statistic mixin names
its options and maps a :class:`Histogram` to a clipping range (``stats.py``); the family base
(``ao.py`` or ``pt2e.py``) is :class:`RangeObserverMixin` over torch.ao's or torchao's
``UniformQuantizationObserverBase``, which supplies ``_calculate_qparams``. Nothing here
imports torch.ao or torchao.

Buffers (all in the state dict):

* ``min_val``, ``max_val``: ``[C]`` float32 exact extremes (``C = 1`` per-tensor; per-channel
  observers start with ``C = 0`` and take the size of the first tensor they see);
* ``histogram``: ``[C, bins]`` int64 counts, ``exponent``: ``[C]`` int64 grid exponents (see
  :mod:`zq_plugin.observers.histogram`).

``_load_from_state_dict`` resizes them first, so ``load_state_dict`` and torch's
``load_observer_state_dict`` restore a per-channel observer of any size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from zq_plugin.errors import ConfigError, ModelError
from zq_plugin.observers import stats
from zq_plugin.observers.histogram import DEFAULT_BINS, E_MIN, Histogram, check_bins, observe
from zq_plugin.qparams import EPS

PER_TENSOR_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_SCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)
SYMMETRIC_SCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_BASE_KEYS = ("dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "factory_kwargs", "eps", "is_dynamic")


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # torch's widest quantized container (qint32 / int32)


def check_quant_range(quant_min: object, quant_max: object) -> None:
    """Raise :class:`ConfigError` unless both are None, or int32s with ``quant_min <= 0 <= quant_max > quant_min``.

    Every range inside int32 is accepted, 2 to 2^32 levels, as by torch's observers (whose
    ``calculate_qparams`` fails on a bound outside int32: zero points are int32 tensors).
    """
    if quant_min is None and quant_max is None:
        return
    if quant_min is None or quant_max is None:
        raise ConfigError(
            f"quant_min={quant_min!r}, quant_max={quant_max!r}: pass both or neither "
            "(e.g. quant_min=0, quant_max=15 for 4-bit unsigned)."
        )
    if isinstance(quant_min, bool) or not isinstance(quant_min, int):
        raise ConfigError(f"quant_min={quant_min!r} must be an integer (e.g. 0 for 4-bit unsigned).")
    if isinstance(quant_max, bool) or not isinstance(quant_max, int):
        raise ConfigError(f"quant_max={quant_max!r} must be an integer (e.g. 15 for 4-bit unsigned).")
    if quant_min >= quant_max or not quant_min <= 0 <= quant_max:
        raise ConfigError(
            f"quant_min={quant_min}, quant_max={quant_max} is not a valid range: need quant_min <= 0 <= quant_max "
            "and quant_min < quant_max (4-bit: 0..15 unsigned, -8..7 or -7..7 signed); "
            "zq_plugin.qparams.quant_range(bits, signed) builds one."
        )
    if quant_min < INT32_MIN or quant_max > INT32_MAX:
        raise ConfigError(
            f"quant_min={quant_min}, quant_max={quant_max} does not fit in int32 [{INT32_MIN}, {INT32_MAX}], "
            "the widest quantized type (torch's observers fail on it too: their zero points are int32); "
            "use e.g. dtype=torch.qint32 without quant_min/quant_max for 32 bits."
        )


class Statistic:
    """Base of the statistic mixins: ``options`` are the keyword arguments and their defaults."""

    options: ClassVar[dict[str, Any]] = {}
    per_channel_options: ClassVar[dict[str, Any]] = {}  # defaults that differ for the per-channel class
    stat_options: dict[str, Any]

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Validate option values (raise :class:`ConfigError`); return them normalised."""
        return values

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """The clipping range ``(lo [C], hi [C])`` of ``hist``."""
        raise NotImplementedError


class MSEStatistic(Statistic):
    """Lp-error clipping search (:func:`zq_plugin.observers.stats.lp_range`); ``p=2`` is MSE, ``2.4`` BRECQ's."""

    options: ClassVar[dict[str, Any]] = {"p": 2.0, "coarse": 64, "fine": 32, "bins": DEFAULT_BINS}

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Check ``p``, the grid sizes and ``bins``."""
        values["p"] = stats.check_p(values["p"])
        stats._check_grid(values["coarse"], values["fine"])
        return values

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """Minimise the Lp error over clipping ratios."""
        o = self.stat_options
        eps = float(getattr(self, "eps", torch.tensor([EPS]))[0])
        keep_min = bool(getattr(self, "keep_min", False))
        return stats.lp_range(
            hist, quant_min, quant_max, symmetric, p=o["p"], coarse=o["coarse"], fine=o["fine"], eps=eps,
            keep_min=keep_min,
        )  # fmt: skip


class PercentileStatistic(Statistic):
    """Percentile of the pooled data (:func:`zq_plugin.observers.stats.percentile_range`)."""

    options: ClassVar[dict[str, Any]] = {"percentile": 99.99, "bins": DEFAULT_BINS}

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Check that the percentile lies in (0, 100]."""
        values["percentile"] = stats.check_percentile(values["percentile"])
        return values

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """The percentile range."""
        return stats.percentile_range(hist, quant_min, quant_max, symmetric, percentile=self.stat_options["percentile"])


class ACIQStatistic(Statistic):
    """Analytical clipping for a Laplace or Gaussian fit (:func:`zq_plugin.observers.stats.aciq_range`)."""

    options: ClassVar[dict[str, Any]] = {"distribution": "laplace", "bins": DEFAULT_BINS}

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Check the distribution name."""
        if values["distribution"] not in stats.DISTRIBUTIONS:
            raise ConfigError(
                f"distribution={values['distribution']!r} is not supported: use one of {stats.DISTRIBUTIONS}."
            )
        return values

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """The ACIQ range for the real number of levels."""
        return stats.aciq_range(hist, quant_min, quant_max, symmetric, distribution=self.stat_options["distribution"])


class EntropyStatistic(Statistic):
    """KL (TensorRT) search with ``quant_max - quant_min + 1`` target levels (``stats.entropy_range``)."""

    options: ClassVar[dict[str, Any]] = {"min_bins_per_level": 1.0, "coarse": 64, "fine": 32, "bins": 8192}
    per_channel_options: ClassVar[dict[str, Any]] = {"bins": 2048}  # one search per channel

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Check the grid sizes and the minimum resolution."""
        stats._check_grid(values["coarse"], values["fine"])
        m = values["min_bins_per_level"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not m > 0:
            raise ConfigError(f"min_bins_per_level={m!r} must be a positive number (default 1.0).")
        return values

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """Minimise KL(P || Q) over clipping ratios."""
        o = self.stat_options
        eps = float(getattr(self, "eps", torch.tensor([EPS]))[0])
        return stats.entropy_range(
            hist,
            quant_min,
            quant_max,
            symmetric,
            min_bins_per_level=o["min_bins_per_level"],
            coarse=o["coarse"],
            fine=o["fine"],
            eps=eps,
        )


class RangeObserverMixin:
    """Observer behaviour on top of a ``UniformQuantizationObserverBase`` (torch.ao's or torchao's).

    Subclasses set ``per_channel`` and mix in one :class:`Statistic`.
    """

    per_channel: ClassVar[bool] = False
    search_calls: int  # how many times the statistic ran (cache misses); see calculate_qparams
    _keep_min: bool = False

    @property
    def keep_min(self) -> bool:
        """Never clip the low end: the range starts at the observed minimum (default False).

        For the outputs of Hardswish, SiLU, GELU and Mish, whose small negative lobe carries more
        than its squared error says: a search that shrinks both ends together clips it to zero
        (zero point 0) at 4 bits. Measured on a MobileNetV3-style net (docs/reconstruction.md):
        zeroing that lobe in the float model drops top-1 from 89.61 to 10.02.
        ``zq_plugin.quantize_fx`` sets it on those outputs' observers. Setting it drops the cached
        qparams.
        """
        return self._keep_min

    @keep_min.setter
    def keep_min(self, value: bool) -> None:
        obs: Any = self
        obs._keep_min = bool(value)
        obs._qparams_cache = None

    def _zq_init(self, base_init: Any, kwargs: dict[str, Any]) -> None:
        obs: Any = self
        cls = type(self)
        options = dict(getattr(cls, "options", {}))
        ch_axis = kwargs.pop("ch_axis", 0 if cls.per_channel else None)
        unknown = [k for k in kwargs if k not in _BASE_KEYS and k not in options]
        if unknown:
            raise ConfigError(
                f"{cls.__name__} got unknown argument(s) {unknown}; it accepts {sorted(options)} "
                f"and the torch observer arguments {[*_BASE_KEYS, 'ch_axis']}."
            )
        for key in list(options):
            if key in kwargs:
                options[key] = kwargs.pop(key)
        resolution = check_bins(options["bins"])
        options = cls.check_options(options)  # type: ignore[attr-defined]
        schemes = PER_CHANNEL_SCHEMES if cls.per_channel else PER_TENSOR_SCHEMES
        qscheme = kwargs.get("qscheme")
        if qscheme is None:
            kwargs["qscheme"] = schemes[0]
        elif qscheme == torch.per_channel_affine_float_qparams:
            raise ConfigError(
                f"{cls.__name__} does not support qscheme=torch.per_channel_affine_float_qparams (float zero "
                "points, torch's scheme for embedding weights): use torch.ao.quantization.PerChannelMinMaxObserver"
                "(qscheme=torch.per_channel_affine_float_qparams) for it "
                "(torchao.quantization.pt2e.PerChannelMinMaxObserver in PT2E; torch's "
                f"float_qparams_weight_only_qconfig does so), or qscheme in {list(schemes)} here."
            )
        elif qscheme not in schemes:
            other = "PerChannel" + cls.__name__ if not cls.per_channel else cls.__name__.replace("PerChannel", "")
            raise ConfigError(
                f"{cls.__name__} does not support qscheme={qscheme}: use one of {list(schemes)}, "
                f"or {other} for {qscheme}."
            )
        check_quant_range(kwargs.get("quant_min"), kwargs.get("quant_max"))
        if cls.per_channel and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
            raise ConfigError(f"ch_axis={ch_axis!r} must be an integer (the channel dimension, 0 for weights).")
        kwargs.setdefault("eps", EPS)
        try:
            base_init(self, **kwargs)
        except (AssertionError, ValueError, TypeError) as err:
            raise ConfigError(f"{cls.__name__}({kwargs}) was rejected by the observer base: {err}") from err
        obs.ch_axis = ch_axis if cls.per_channel else None
        obs.stat_options = options
        obs.bins = options["bins"]  # as requested (torch's attribute); the grid has histogram_bins >= bins
        obs.histogram_bins = resolution
        obs.search_calls = 0
        obs._qparams_cache = None
        channels = 0 if cls.per_channel else 1
        factory = kwargs.get("factory_kwargs") or {}
        device = factory.get("device")
        obs.register_buffer("min_val", torch.full((channels,), float("inf"), device=device))
        obs.register_buffer("max_val", torch.full((channels,), float("-inf"), device=device))
        obs.register_buffer("histogram", torch.zeros(channels, resolution, dtype=torch.int64, device=device))
        obs.register_buffer("exponent", torch.full((channels,), E_MIN, dtype=torch.int64, device=device))

    @property
    def symmetric(self) -> bool:
        """True for a symmetric qscheme."""
        return getattr(self, "qscheme") in SYMMETRIC_SCHEMES  # noqa: B009

    def _histogram(self) -> Histogram:
        obs: Any = self
        return Histogram(counts=obs.histogram, exponent=obs.exponent, min_val=obs.min_val, max_val=obs.max_val)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Add ``x_orig`` to the statistics and return it unchanged; an empty tensor is ignored.

        ``+inf``/``-inf`` values are left out with a warning, as torch's HistogramObserver does (a
        quantizer clamps them to the range found for the rest; attention masks hold ``-inf``).

        Raises:
            ConfigError: ``x_orig`` holds NaN (the statistics are left as they were).
        """
        obs: Any = self
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(obs.min_val.dtype)
        empty = obs.histogram.shape[0] == 0
        hist = observe(None if empty else self._histogram(), x, obs.ch_axis, obs.histogram_bins)
        if empty:
            for name in _BUFFERS:
                getattr(obs, name).resize_(getattr(hist, _FIELD[name]).shape)
        obs.min_val.copy_(hist.min_val)
        obs.max_val.copy_(hist.max_val)
        obs.histogram.copy_(hist.counts)
        obs.exponent.copy_(hist.exponent)
        obs._qparams_cache = None
        return x_orig

    def clip_range(self, hist: Histogram, quant_min: int, quant_max: int, symmetric: bool) -> stats.Range:
        """Provided by the statistic mixin."""
        raise NotImplementedError

    def calculate_range(self) -> stats.Range:
        """The clipping range ``(lo, hi)`` the statistic picks for the data seen so far (``[C]`` each)."""
        obs: Any = self
        if obs.histogram.shape[0] == 0:
            return obs.min_val.clone(), obs.max_val.clone()
        lo, hi = self.clip_range(self._histogram(), int(obs.quant_min), int(obs.quant_max), self.symmetric)
        if self.keep_min:
            lo = torch.minimum(lo, obs.min_val)
        return lo, hi

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the searched range, in torch's shapes (``[1]`` per-tensor, ``[C]`` per-channel).

        The search runs once per new data: repeated calls without a forward in between return
        the cached answer. An observer that has seen nothing returns torch's default
        (``scale=[1.]``, ``zero_point=[0]``) with torch's warning.
        """
        obs: Any = self
        if obs._qparams_cache is None:
            if obs.histogram.shape[0] > 0 and not bool((obs.min_val > obs.max_val).all()):
                obs.search_calls += 1
            lo, hi = self.calculate_range()
            empty = lo > hi
            if bool(empty.any()) and not bool(empty.all()):  # a channel that held only +-inf: range [0, 0]
                lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
            if not self.per_channel:
                lo, hi = lo.reshape(()), hi.reshape(())
            obs._qparams_cache = self._finite_qparams(lo, hi)
        scale, zero_point = obs._qparams_cache
        return scale.clone(), zero_point.clone()

    def _finite_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's ``_calculate_qparams(lo, hi)``, finite for every finite range.

        torch computes ``(hi - lo) / (quant_max - quant_min)`` in float32, which overflows when the
        range is wider than float32's largest number (``[finfo.min, finfo.max]``: torch's
        MinMaxObserver answers ``scale=inf``). Such a range is computed on ``(lo / 2, hi / 2)`` and its
        scale doubled: the same numbers, as halving and doubling are exact (the ``eps`` floor does not
        matter at that size).

        Raises:
            ConfigError: the range needs a step beyond float32's largest number (only a 2-level grid
                can, on data wider than ``finfo.max``).
        """
        obs: Any = self
        scale, zero_point = obs._calculate_qparams(lo, hi)
        wide = ~torch.isfinite(scale) & torch.isfinite(lo) & torch.isfinite(hi)
        if bool(wide.any()):
            half_scale, half_zp = obs._calculate_qparams(lo * 0.5, hi * 0.5)
            scale = torch.where(wide, half_scale * 2.0, scale)
            zero_point = torch.where(wide, half_zp, zero_point)
            if not bool(torch.isfinite(scale).all()):
                raise ConfigError(
                    f"{type(self).__name__}: the range [{float(lo.min())}, {float(hi.max())}] on "
                    f"{obs.quant_max - obs.quant_min + 1} levels needs a step beyond float32's largest number; "
                    "use more levels (quant_max - quant_min >= 2) or keep such values out of the observed tensor."
                )
        return scale, zero_point

    def reset_min_max_vals(self) -> None:
        """Forget all statistics (torch's name for it)."""
        obs: Any = self
        channels = 0 if self.per_channel else 1
        obs.min_val.resize_(channels).fill_(float("inf"))
        obs.max_val.resize_(channels).fill_(float("-inf"))
        obs.histogram.resize_(channels, obs.histogram_bins).zero_()
        obs.exponent.resize_(channels).fill_(E_MIN)
        obs._qparams_cache = None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        obs: Any = self
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                getattr(obs, name).resize_(state_dict[key].shape)
        obs._qparams_cache = None
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __prepare_scriptable__(self) -> Any:
        """Refuse ``torch.jit.script`` with a named error (called by torch before it compiles anything).

        Raises:
            ModelError: always; the statistics (an exact histogram and a range search) are Python code.
        """
        raise ModelError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: its statistics (an exact streaming "
            "histogram and a range search) run in Python. Calibrate first, then script the converted model "
            "(convert_fx / convert_pt2e replace observers by fixed quantize ops), or use torch.export; to script a "
            "model that still observes, use torch's own observers (e.g. MinMaxObserver)."
        )

    def extra_repr(self) -> str:
        """Bits, scheme, channels and statistic options."""
        obs: Any = self
        opts = ", ".join(f"{k}={v}" for k, v in obs.stat_options.items())
        axis = f", ch_axis={obs.ch_axis}" if self.per_channel else ""
        return (
            f"quant_min={obs.quant_min}, quant_max={obs.quant_max}, qscheme={obs.qscheme}{axis}, "
            f"channels={obs.histogram.shape[0]}, {opts}"
        )


_FIELD = {"min_val": "min_val", "max_val": "max_val", "histogram": "counts", "exponent": "exponent"}
_BUFFERS = tuple(_FIELD)
