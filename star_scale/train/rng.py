"""The process's random streams (torch, numpy, Python, CUDA) as checkpointable state."""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
