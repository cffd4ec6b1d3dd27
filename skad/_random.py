"""Randomness from ``random_state`` only: seeds drawn from it, torch seeded locally.

Every detector turns its ``random_state`` into an int with :func:`seed_from`
and seeds torch inside :func:`torch_seed`, which forks torch's generators so
that the global ones are untouched, as scikit-learn estimators leave numpy's.
"""

import contextlib

import numpy as np
import torch

__all__ = ["seed_from", "torch_seed"]


def seed_from(random_state):
    """An int seed drawn from ``random_state`` (None, int or numpy Generator/RandomState)."""
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if random_state is None:
        return int(np.random.default_rng().integers(2**31 - 1))
    return int(random_state)


@contextlib.contextmanager
def torch_seed(seed):
    """Seed torch inside the block only: global generators are restored after.

    Module initialisation and dropout use torch's global generator; forking it
    keeps ``random_state`` local, as scikit-learn estimators do.
    """
    # every CUDA device is forked where there is one: torch.manual_seed also seeds CUDA
    # (lazily, when it starts), and only a fork restores that; dropout on the GPU then
    # draws from the seeded, forked generator too
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)
