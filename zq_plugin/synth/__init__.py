"""Data-free calibration data: BN-statistics hooks, losses, and one module per method.

Importing this package registers every built-in method in :data:`METHODS`.
"""

from zq_plugin.synth import adadfq, dsg, genie, noise, retro, zeroq  # noqa: F401  (registers the methods)
from zq_plugin.synth.adadfq import AdaDFQConfig, GDFQConfig
from zq_plugin.synth.api import synthesize
from zq_plugin.synth.dsg import DSGConfig
from zq_plugin.synth.genie import GenieConfig
from zq_plugin.synth.noise import NoiseConfig
from zq_plugin.synth.registry import METHODS, get_method, register
from zq_plugin.synth.retro import RetroConfig
from zq_plugin.synth.zeroq import ZeroQConfig

__all__ = [
    "METHODS",
    "AdaDFQConfig",
    "DSGConfig",
    "GDFQConfig",
    "GenieConfig",
    "NoiseConfig",
    "RetroConfig",
    "ZeroQConfig",
    "get_method",
    "register",
    "synthesize",
]
