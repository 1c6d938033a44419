"""kdexp's seeding leaves every generator as Lightning's seed_everything leaves it."""

import os
import random

import numpy as np
import pytest
import torch
from pytorch_lightning import seed_everything as lightning_seed_everything

from kdexp.core.errors import ConfigError
from kdexp.run.seeding import seed_everything


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1])
def test_seed_everything_draws_what_lightnings_draws(seed, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    lightning_seed_everything(seed, verbose=False)
    theirs, their_env = draws(), os.environ["PL_GLOBAL_SEED"]
    random.seed(seed + 1), np.random.seed(seed // 2), torch.manual_seed(seed + 2)  # something else in between
    seed_everything(seed)
    assert draws() == theirs and os.environ["PL_GLOBAL_SEED"] == their_env == str(seed)


def test_a_seed_numpy_cannot_take_is_a_config_error():
    with pytest.raises(ConfigError, match="out of range"):
        seed_everything(-1)
