"""A run started by a W&B sweep agent (``wandb agent``): its parameters, and the W&B run it owns.

The agent starts each run as ``${env} ${interpreter} ${program} ... ${args_no_hyphens}`` and
tells it, through the environment, which W&B run to log into (``WANDB_RUN_ID``), of which sweep
(``WANDB_SWEEP_ID``), with which parameters (a YAML file at ``WANDB_SWEEP_PARAM_PATH``).
Two things follow for kdexp:

- The agent writes each parameter as Python's ``str`` of its value (``chain=[64, 32]``,
  ``flag=True``, ``x=None``), where ``kdexp sweep`` writes Hydra's (``chain=[64,32]``,
  ``flag=true``, ``x=null``; :func:`~kdexp.core.sweep_file.hydra_value`). Hydra names a run's
  folder and records its overrides from that text, so :func:`agent_overrides` rewrites the
  agent's arguments into ``kdexp sweep``'s: the same point lands in the same folder, with the
  same overrides, whoever ran it (and ``None`` means null, as in the sweep file).
- Only the student run is the agent's. A teacher or chain stage trained first in the same process
  is a run of its own; :func:`outside_agent_run` hides the agent's variables from it (W&B reads
  them once, when its session starts), or it would take the agent's run id and sweep.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kdexp.core.sweep_file import hydra_value

SWEEP_ID_ENV = "WANDB_SWEEP_ID"
RUN_ID_ENV = "WANDB_RUN_ID"
PARAM_PATH_ENV = "WANDB_SWEEP_PARAM_PATH"
# What the agent sets for the run it starts (it sets WANDB_ENTITY / WANDB_PROJECT too: a teacher may keep those).
AGENT_RUN_ENV = (SWEEP_ID_ENV, RUN_ID_ENV, PARAM_PATH_ENV)


def under_agent() -> bool:
    """Whether this process is a run a W&B sweep agent started."""
    return bool(os.environ.get(SWEEP_ID_ENV))


def agent_parameters() -> dict[str, Any]:
    """The parameters the agent gave this run (``{key: value}``), read from its file; empty outside an agent
    or when the file cannot be read (the arguments are then taken as they are)."""
    path = os.environ.get(PARAM_PATH_ENV)
    if not under_agent() or not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    # The file is wandb's config format: {key: {"value": v}} (and a wandb_version entry).
    return {str(k): v["value"] for k, v in loaded.items() if isinstance(v, dict) and "value" in v}


def agent_overrides(argv: list[str], parameters: dict[str, Any] | None = None) -> list[str]:
    """``argv`` with each argument the agent wrote for a parameter (``key=<str of value>``) rewritten as
    ``kdexp sweep`` writes it (``key=<hydra_value>``); every other argument unchanged."""
    parameters = agent_parameters() if parameters is None else parameters
    out = []
    for arg in argv:
        key, sep, text = arg.partition("=")
        if sep and key in parameters and text == str(parameters[key]):
            arg = f"{key}={hydra_value(parameters[key])}"
        out.append(arg)
    return out


@contextmanager
def outside_agent_run() -> Iterator[None]:
    """Within the block, W&B runs are not the agent's: its variables are hidden from W&B and restored after.

    W&B reads them when its session starts, so the session is ended (no run open) on the way in and on
    the way out: the block's runs start a session without them, and the student's run after the block
    one with them. Outside an agent this does nothing.
    """
    hidden = {key: os.environ.pop(key) for key in AGENT_RUN_ENV if key in os.environ}
    if not hidden:
        yield
        return
    _end_wandb_session()
    try:
        yield
    finally:
        _end_wandb_session()
        os.environ.update(hidden)


def _end_wandb_session() -> None:
    wandb = sys.modules.get("wandb")  # not imported: no session to end
    if wandb is not None and wandb.run is None:
        wandb.teardown()
