"""The generator behind parameter initialisation and dropout, so that one seed gives one model."""
import contextlib

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed):
    """Seed parameter initialisation and dropout. The same seed then builds and trains the same model."""
    global _generator
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _generator = np.random.default_rng(int(seed))


def generator():
    """The process-wide generator seeded by manual_seed()."""
    return _generator


def get_state():
    """The generator's state as a JSON-serialisable dict, so a training checkpoint can resume dropout exactly."""
    return _generator.bit_generator.state


def set_state(state):
    """Restore a state returned by get_state(). A state of another bit generator is a ValueError."""
    global _generator
    if not isinstance(state, dict) or not isinstance(state.get("bit_generator"), str):
        raise ValueError(f"random state must be a dict naming its bit_generator, got {state!r}")
    name = state["bit_generator"]
    bit_generators = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "Philox": np.random.Philox,
                      "SFC64": np.random.SFC64, "MT19937": np.random.MT19937}
    if name not in bit_generators:
        raise ValueError(f"unknown bit generator {name!r} in random state")
    bit_generator = bit_generators[name]()
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"invalid {name} random state: {e}") from None
    _generator = np.random.Generator(bit_generator)



@contextlib.contextmanager
def using(generator):
    """Draw from `generator` (a numpy Generator) instead of the process-wide one inside the block; data-parallel
    training gives each shard of a batch its own dropout stream this way."""
    global _generator
    previous = _generator
    _generator = generator
    try:
        yield
    finally:
        _generator = previous
