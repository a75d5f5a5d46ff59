"""convengine: a compiled convolution engine for training and running small CNNs on CPUs."""
__version__ = "0.1.0"

from ._threads import get_num_threads, num_threads, set_num_threads
from ._random import manual_seed
from ._fpmode import get_flush_denormal, set_flush_denormal
from ._kernels import build_info
from .model import Sequential, load
from .trainer import Trainer

__all__ = ["__version__", "set_num_threads", "get_num_threads", "num_threads", "manual_seed", "set_flush_denormal",
           "get_flush_denormal", "build_info", "Sequential", "Trainer", "load"]
