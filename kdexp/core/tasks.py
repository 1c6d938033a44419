"""The task a run solves: the shape of its logits, what a target is, and how it is scored.

Chosen by ``task=`` (``auto``: the data set's own task). One code path serves all of them:

- ``classification``: inputs ``(B, ...)`` → logits ``(B, C)``, one target per sample.
- ``sequence_classification``: token ids ``(B, L)``, right-padded with the data's pad id →
  logits ``(B, C)``, one target per sequence. Models build their attention mask from the
  pad id, so padding never changes a prediction.
- ``causal_lm``: token ids ``(B, L)`` → logits ``(B, L, V)``, the next token as the target at
  every position. Padding and prompt positions have the target ``UNLABELLED`` (-100), so
  every loss and every metric skips them (the loss mask is the target).

A data module declares the tasks it can frame its data as (``supported_tasks``, the first
is its default); a run that asks for another is refused before anything is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdexp.core.errors import ConfigError

AUTO = "auto"
# The target of a transfer-set input or a padding/prompt position: no label, only the teacher's outputs
# (F.cross_entropy's default ignore_index, so an objective that forgot to handle it never reads it as a class).
UNLABELLED = -100


@dataclass(frozen=True)
class Task:
    name: str
    per_position: bool  # logits (B, L, V) with a target per position, not (B, C)
    token_inputs: bool  # inputs are token ids (int64)

    def logits_shape(self, batch: int, input_shape: Sequence[int], num_classes: int) -> tuple[int, ...]:
        """The logits a model must return for a batch of ``batch`` inputs."""
        if self.per_position:
            return (batch, *[int(d) for d in input_shape], num_classes)
        return (batch, num_classes)


TASKS: dict[str, Task] = {
    "classification": Task("classification", per_position=False, token_inputs=False),
    "sequence_classification": Task("sequence_classification", per_position=False, token_inputs=True),
    "causal_lm": Task("causal_lm", per_position=True, token_inputs=True),
}


def choose_task(requested: str | None, supported: Sequence[str], data_name: str) -> Task:
    """The task a data set is framed as: ``requested``, or the data set's default for ``auto``."""
    name = supported[0] if requested in (None, AUTO) else str(requested)
    if name not in TASKS:
        raise ConfigError(f"task={name} is not a task; choose one of {', '.join([AUTO, *TASKS])}.")
    if name not in supported:
        raise ConfigError(f"task={name}, but data={data_name} provides {' or '.join(supported)}: choose "
                          f"task={supported[0]} (or task=auto), or data that can be framed as {name}.")
    return TASKS[name]


def task_of(cfg: Any) -> Task:
    """The task of a composed run config (``task`` and the data class's ``supported_tasks``)."""
    from hydra.utils import get_class

    data = cfg.data
    requested = cfg.get("task", AUTO)  # never data.task: that is ${kdexp.task:}, resolved from this
    try:
        supported = tuple(getattr(get_class(str(data._target_)), "supported_tasks", ("classification",)))
    except Exception:  # a data class that cannot be imported is reported where it is instantiated
        supported = tuple(TASKS)
    choices = cfg.get("choices") or {}
    return choose_task(requested, supported, str(choices.get("data", data.get("_target_"))))
