"""Seeding every generator a run draws from, without importing Lightning."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from kdexp.core.errors import ConfigError


def seed_everything(seed: int) -> int:
    """Seed Python's, NumPy's and torch's generators (CPU and every GPU) with ``seed``, as Lightning's
    ``seed_everything`` does, and leave it in ``PL_GLOBAL_SEED``, from which Lightning's DDP
    processes re-seed themselves. Here so that code that builds models without Lightning (packed
    sweeps' workers) seeds them exactly as a single run does."""
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} is out of range: NumPy accepts seeds from 0 to {2**32 - 1}.")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = "0"
    return seed


def apply_num_threads(num_threads: int | None) -> None:
    """Pin torch's CPU threads (null keeps torch's default of one per core)."""
    if num_threads is None:
        return
    if int(num_threads) < 1:
        raise ConfigError(f"num_threads must be >= 1 or null, got {num_threads}.")
    torch.set_num_threads(int(num_threads))
