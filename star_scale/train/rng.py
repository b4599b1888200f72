"""The process's random streams (torch, numpy, Python, CUDA) as checkpointable state."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Every RNG as tensors, lists and numbers: the trainer state loads with weights_only=True."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                             "pos": int(np_state["state"]["pos"])}},
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():  # this rank's device only: another job may see another device count
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # older checkpoints hold every visible device's state: take the first
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def fresh_rng_state(*key: int) -> dict:
    """The streams a process seeded from ``key`` would have: for a data-parallel rank that did not exist
    in the checkpoint's layout. The current streams are left as they are."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    saved = rng_state()
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return rng_state()
    finally:
        set_rng_state(saved)
