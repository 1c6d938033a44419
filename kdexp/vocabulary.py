"""Names that training, sweeps and reports share, kept in one place.

Metric names are ``stage/name``; the same string is logged to W&B, stored in run
records, monitored by checkpoints and read by reports, so each is written once here.

Bookkeeping keys are config settings that do not change what a run computes
(where files go, how W&B is reached, what to do with a finished folder). Reports
ignore them when deciding which runs may share a table cell, and a killed run is
resumed only into a run whose config agrees on everything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# -- metrics --------------------------------------------------------------------------
TEST_ACC = "test/acc"                # at the best-val checkpoint: the figure tables report
TEST_ACC_LAST = "test/acc_last"      # at the last epoch
VAL_ACC = "val/acc"                  # per epoch; what best.ckpt monitors
VAL_ACC_BEST = "val/acc_best"        # what selects settings (never a test metric)
TEACHER_TEST_ACC = "teacher/test_acc"
METRIC_TITLES = {
    TEST_ACC: "test accuracy at the best-val checkpoint",
    TEST_ACC_LAST: "test accuracy at the last epoch",
    VAL_ACC_BEST: "best validation accuracy",
    VAL_ACC: "validation accuracy at the last epoch",
    "test/agreement": "test agreement with the teacher (same argmax)",
    "test/ece": "test expected calibration error",
}

# Where a run folder keeps earlier runs it replaced (never deleted; never in a report).
ARCHIVE_DIR = "archive"

# -- bookkeeping ------------------------------------------------------------------------
# Settings that do not change what a run computes.
BOOKKEEPING_KEYS = frozenset({
    "overrides", "group", "tags", "if_finished", "resume", "output_dir", "verbose",
    "trainer.enable_progress_bar", "trainer.enable_model_summary",
    # where the teacher's outputs come from: results agree within float tolerance (see README)
    "kd.cache_teacher", "teacher.predictions",
    # choices whose effect is fully visible in the config itself (or is bookkeeping)
    "choices.logger", "choices.hydra", "choices.paths", "choices.callbacks", "choices.experiment", "choices.debug",
})
BOOKKEEPING_GROUPS = ("paths", "logger", "callbacks", "hydra")
# Folders derived from paths.* (data.cache_dir is ${paths.cache_dir}/data): differ between checkouts.
PATH_SUFFIXES = ("cache_dir", "data_dir", "root_dir", "log_dir", "output_dir", "save_dir")


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"kd.temperature": 8.0, ...}`` (an empty dict stays a leaf)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def is_bookkeeping(key: str) -> bool:
    """A dotted config path that does not change what a run computes."""
    if key in BOOKKEEPING_KEYS or key.endswith(PATH_SUFFIXES):
        return True
    return any(key == g or key.startswith(f"{g}.") for g in BOOKKEEPING_GROUPS)


def run_identity(config: Mapping[str, Any]) -> dict[str, str]:
    """What makes two runs the same computation: the flattened config minus bookkeeping.

    Values are compared by their JSON text with ints and floats unified, so a config
    read back from a record equals the live one (``8`` == ``8.0``).
    """
    def canonical(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        return json.dumps(value, sort_keys=True, default=str)

    return {k: canonical(v) for k, v in flatten_config(config).items() if not is_bookkeeping(k)}
