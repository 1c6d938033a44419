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
EPOCH = "epoch"                      # per-epoch x-axis Lightning logs beside every epoch metric
METRIC_TITLES = {
    TEST_ACC: "test accuracy at the best-val checkpoint",
    TEST_ACC_LAST: "test accuracy at the last epoch",
    VAL_ACC_BEST: "best validation accuracy",
    VAL_ACC: "validation accuracy at the last epoch",
    "test/agreement": "test agreement with the teacher (same argmax)",
    "test/ece": "test expected calibration error",
    "test/nll": "test negative log-likelihood (nats per token) at the best-val checkpoint",
    "test/bpb": "test bits per byte (per token) at the best-val checkpoint",
    "test/ppl": "test perplexity at the best-val checkpoint",
}


def teacher_metric(metric: str) -> str:
    """The name a student's record gives its teacher's figure for ``metric``: ``test/bpb`` →
    ``teacher/test_bpb`` (``teacher/test_acc`` for ``test/acc``)."""
    return "teacher/" + metric.replace("/", "_")

# -- what a run's record and W&B config hold beside its metrics -------------------------------
SEED = "seed"                        # config key (and record field) of the run's seed
GROUP = "group"                      # config key of the W&B group setting (null: "<data>-<teacher>")
CHOICES = "choices"                  # record field / W&B config key: the option chosen per config group
STATUS = "status"                    # record field: running | finished | failed | interrupted
TEACHER_HASH = "teacher_hash"        # W&B config key of the teacher's weights hash (record: teacher.hash)
DATA_FINGERPRINT = "data_fingerprint"  # record field and W&B config key of the data's fingerprint
NO_KD = "none"                       # the kd option of the CE-only student baseline (kd=none)

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

    Values are compared by their :func:`canonical_json` text, so a config read back from
    a record equals the live one (``8`` == ``8.0``).
    """
    return {k: canonical_json(v, k.rsplit(".", 1)[-1]) for k, v in flatten_config(config).items()
            if not is_bookkeeping(k)}


# -- one spelling per setting -------------------------------------------------------------
# Lightning settings whose int counts batches and whose float is a fraction of them
# (limit_train_batches=1 is one batch, 1.0 is all of them): their int and float differ.
COUNT_OR_FRACTION_KEYS = frozenset({"limit_train_batches", "limit_val_batches", "limit_test_batches",
                                    "limit_predict_batches", "val_check_interval", "overfit_batches"})


def canonical(value: Any, key: str = "") -> Any:
    """``value`` with equal settings written differently made equal, for cache keys and comparisons.

    A float equal to a whole number becomes that int (``4.0`` → ``4``): ``kd.temperature=4`` typed on a
    command line or in a sweep file is the YAML default ``4.0``. Tuples become lists and mapping keys
    strings (:func:`canonical_json` sorts them). Kept apart on purpose: a bool from an int (``true`` is
    not ``1``: kdexp tests flags with ``is True``, e.g. ``kd.cache_teacher``), a string from a number,
    and the int and float of a :data:`COUNT_OR_FRACTION_KEYS` setting (``key`` names the setting).
    """
    if isinstance(value, Mapping):
        return {str(k): canonical(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v, key) for v in value]
    if isinstance(value, float) and value.is_integer() and key not in COUNT_OR_FRACTION_KEYS:
        return int(value)  # exact: is_integer() means no fraction to lose
    return value


def canonical_json(value: Any, key: str = "") -> str:
    """The JSON text of :func:`canonical` ``value``, keys sorted: what config hashes are taken of."""
    return json.dumps(canonical(value, key), sort_keys=True, default=str)
