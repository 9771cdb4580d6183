"""Moved to :mod:`zq_plugin.backends.fx.plan`; this module keeps the old import path working."""

from zq_plugin.backends.fx.plan import (
    GLOBAL,
    INPUT,
    activation_owners,
    input_observer_owners,
    own_input,
    set_input_bits,
    to_qconfig_mapping,
)

__all__ = [
    "GLOBAL",
    "INPUT",
    "activation_owners",
    "input_observer_owners",
    "own_input",
    "set_input_bits",
    "to_qconfig_mapping",
]
