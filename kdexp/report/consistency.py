"""Which runs may share a table: never average runs that differ off the table's axes.

Two runs belong in the same cell only if everything but the axes and the seed is
the same: the flattened config (minus bookkeeping such as paths and loggers), the
teacher's weights hash and the data fingerprint. A CE-only baseline is compared
with KD runs on everything except the KD objective's own settings.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from kdexp.core.vocabulary import BOOKKEEPING_GROUPS, BOOKKEEPING_KEYS, PATH_SUFFIXES
from kdexp.report.errors import ReportError
from kdexp.report.runs import is_choice_axis, is_kd_scoped, is_teacher_side
from kdexp.report.values import format_value, is_missing

# Bookkeeping that does not change what a run computes (kdexp.core.vocabulary), plus what a
# table averages over or compares by identity instead.
IGNORED_KEYS = BOOKKEEPING_KEYS | {
    "seed", "data.shuffle_seed",  # the seed is what we average over; shuffle_seed is ${seed}
    # where the teacher was loaded from: its identity is its weights hash, compared below
    "teacher.checkpoint",
}
IGNORED_GROUPS = BOOKKEEPING_GROUPS
IGNORED_SUFFIXES = PATH_SUFFIXES

# Identity of what a run learned from; None (a run that failed early) matches anything.
IDENTITY_KEYS = ("teacher_hash", "data_fingerprint")
_MISSING = "<not set>"
_UNKNOWN = None


@dataclass(frozen=True)
class Difference:
    """One setting that is not the same across the runs of a table."""

    key: str
    scope: str  # "all" runs, or only among "distill" or "baseline" runs (KD-objective settings)
    counts: dict[str, int]  # printed value → number of runs
    within: tuple[str, ...] = ()  # choice axes the key was compared within (e.g. kd, for kd.temperature)

    def describe(self) -> str:
        values = ", ".join(f"{value} ({n} run{'s' * (n != 1)})" for value, n in self.counts.items())
        where = {"all": "", "distill": " among KD runs", "baseline": " among CE-only runs"}[self.scope]
        same = f" with the same {', '.join(self.within)}" if self.within else ""
        return f"{self.key}{where}{same}: {values}"


def is_ignored(key: str, extra: Sequence[str] = ()) -> bool:
    """Bookkeeping keys, and keys the user declared irrelevant with ``--ignore``."""
    if key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES):
        return True
    return any(key == g or key.startswith(f"{g}.") for g in (*IGNORED_GROUPS, *extra))


def _covered_by_axis(key: str, axes: Sequence[str]) -> bool:
    """A key the table shows (a group's choice covers ``choices.<group>``, not the group's settings)."""
    for axis in axes:
        if key in (axis, f"choices.{axis}"):
            return True
        if key == "teacher_hash" and is_teacher_side(axis):
            return True
        if key == "data_fingerprint" and (axis == "data" or axis.startswith("data.")):
            return True
    return False


def _seed_derived(runs: pd.DataFrame) -> set[str]:
    """Keys that equal the run's seed in every run that has them (``${seed}`` interpolations)."""
    derived: dict[str, bool] = {}
    for config, seed in zip(runs["_config"], runs["_seed"]):
        for key, value in config.items():
            same = seed is not None and isinstance(value, float) and value == float(seed)
            derived[key] = derived.get(key, True) and same
    return {key for key, same in derived.items() if same}


def context_frame(runs: pd.DataFrame, axes: Sequence[str], ignore: Sequence[str] = ()) -> pd.DataFrame:
    """One column per compared key, holding each run's value as text (``<not set>`` when absent)."""
    derived = _seed_derived(runs)
    keys = sorted({k for config in runs["_config"] for k in config})
    keys = [k for k in keys if k not in derived and not is_ignored(k, ignore) and not _covered_by_axis(k, axes)]
    columns = {_name(key): runs["_config"].map(lambda c, key=key: _text(c[key]) if key in c else _MISSING)
               for key in keys if not (f"choices.{key}" in keys)}  # an empty group ({}) is told by its choice
    for key in IDENTITY_KEYS:
        if not is_ignored(key, ignore) and not _covered_by_axis(key, axes):
            columns[key] = runs[f"_{key}"].map(lambda v: _UNKNOWN if is_missing(v) else str(v))
    return pd.DataFrame(columns, index=runs.index)


def _name(key: str) -> str:
    """``choices.data`` → ``data``: the name --rows/--where use for a group's chosen option."""
    return key.removeprefix("choices.")


def _text(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def _display(text: str | None) -> str:
    if text is None or text == _MISSING:
        return _MISSING
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
    return format_value(tuple(value) if isinstance(value, list) else value)


def differences(runs: pd.DataFrame, axes: Sequence[str], ignore: Sequence[str] = ()) -> list[Difference]:
    """Every compared key with more than one value; KD settings only within KD and within CE-only runs."""
    return _differences(runs, axes, context_frame(runs, axes, ignore))


def _differences(runs: pd.DataFrame, axes: Sequence[str], context: pd.DataFrame) -> list[Difference]:
    """:func:`differences` over an already built :func:`context_frame`."""
    choice_axes = [a for a in axes if is_choice_axis(runs, a)]
    out = []
    for key in context.columns:
        scopes = (("distill", runs["_kind"].eq("distill")), ("baseline", runs["_kind"].eq("baseline"))) \
            if is_kd_scoped(key) else (("all", pd.Series(True, index=runs.index)),)
        # with a `kd` axis, kd.temperature may differ between hinton and none, but not among hinton runs
        within = [a for a in choice_axes if key.startswith(f"{a}.")]
        for scope, mask in scopes:
            values = context.loc[mask, key].dropna()  # unknown identity (failed early) matches anything
            if values.empty:
                continue
            partition = [runs.loc[values.index, a].astype(str) for a in within] or [pd.Series(0, index=values.index)]
            if values.groupby(partition).nunique().max() > 1:
                counts = Counter(_display(v) for v in values)
                out.append(Difference(key, scope, dict(sorted(counts.items())), tuple(within)))
    return out


def check_consistent(runs: pd.DataFrame, axes: Sequence[str], ignore: Sequence[str] = ()) -> None:
    """Refuse to average runs that differ in something off the table's axes."""
    found = differences(runs, axes, ignore)
    if not found:
        return
    shown = "\n".join(f"  - {d.describe()}" for d in found[:12])
    more = f"\n  … and {len(found) - 12} more" if len(found) > 12 else ""
    first = found[0]
    example = max(first.counts, key=first.counts.get)  # keep the bulk of the runs
    raise ReportError(
        "these runs differ in settings that are not on the table's axes, so averaging them over seeds would mix "
        f"different experiments:\n{shown}{more}\nFix it with one of: put the setting on an axis "
        f"(e.g. --rows {first.key},<your rows>), keep one value (--where {first.key}={example}), print one table "
        "per combination (--split), or declare the setting irrelevant (--ignore KEY)."
    )


def split_groups(runs: pd.DataFrame, axes: Sequence[str],
                 ignore: Sequence[str] = ()) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """One ``({key: value}, runs)`` per distinct combination of the differing settings.

    CE-only runs join every KD combination they are comparable with (KD settings do
    not apply to them); a run with an unknown teacher hash joins every group that
    matches its other settings.
    """
    context = context_frame(runs, axes, ignore)
    found = _differences(runs, axes, context)
    if not found:
        return [({}, runs)]
    shared = list(dict.fromkeys(d.key for d in found if d.scope == "all"))
    kd_keys = list(dict.fromkeys(d.key for d in found if d.scope == "distill"))
    ce_keys = list(dict.fromkeys(d.key for d in found if d.scope == "baseline"))
    is_kd, is_ce = runs["_kind"].eq("distill"), runs["_kind"].eq("baseline")
    groups = []
    for combo in _combinations(context, shared, pd.Series(True, index=runs.index)):
        inside = _selects(context, combo)
        kd_combos = _combinations(context, kd_keys, inside & is_kd) if kd_keys else [{}]
        ce_combos = _combinations(context, ce_keys, inside & is_ce) if ce_keys else [{}]
        for kd_combo, ce_combo in itertools.product(kd_combos or [{}], ce_combos or [{}]):
            mask = inside & ((is_kd & _selects(context, kd_combo)) | (is_ce & _selects(context, ce_combo)))
            if not mask.any():
                continue
            label = {k: _display(v) if v is not None else "?" for k, v in combo.items()}
            label.update({k: _display(v) for k, v in kd_combo.items()})
            label.update({f"CE-only {k}": _display(v) for k, v in ce_combo.items()})
            groups.append((label, runs[mask]))
    return _short_labels(groups)


# Keys that name a combination best, in order: the public knobs, then group choices.
_NAMING_ORDER = ("data", "teacher", "student", "kd", "trainer.max_epochs", "optimizer", "scheduler", "trainer")


def _short_labels(groups: list[tuple[dict[str, str], pd.DataFrame]]) -> list[tuple[dict[str, str], pd.DataFrame]]:
    """Name each group by as few keys as tell the groups apart (data=digits, not its 15 consequences)."""
    keys = list(dict.fromkeys(k for label, _ in groups for k in label))

    def rank(key: str) -> tuple:
        bare = key.removeprefix("CE-only ")
        order = _NAMING_ORDER.index(bare) if bare in _NAMING_ORDER else len(_NAMING_ORDER)
        return (bare in IDENTITY_KEYS, order, "." in bare, keys.index(key))

    chosen: list[str] = []
    distinct = 1
    for key in sorted(keys, key=rank):
        count = len({tuple(label.get(k) for k in (*chosen, key)) for label, _ in groups})
        if count > distinct:
            chosen.append(key)
            distinct = count
        if distinct == len(groups):
            break
    return [({k: label[k] for k in chosen if k in label}, frame) for label, frame in groups]


def _combinations(context: pd.DataFrame, keys: list[str], mask: pd.Series) -> list[dict[str, str | None]]:
    """Distinct value combinations of ``keys`` among ``mask`` runs.

    A partly unknown one (a run that failed before its teacher hash was known) is
    kept only when no fully known combination covers it.
    """
    rows = context.loc[mask, keys].drop_duplicates()
    combos = [{k: None if is_missing(row[k]) else row[k] for k in keys} for _, row in rows.iterrows()]
    full = [c for c in combos if all(v is not None for v in c.values())]
    partial = [c for c in combos if any(v is None for v in c.values())
               and not any(all(v is None or f[k] == v for k, v in c.items()) for f in full)]
    return full + partial


def _selects(context: pd.DataFrame, combo: dict[str, str | None]) -> pd.Series:
    mask = pd.Series(True, index=context.index)
    for key, value in combo.items():
        mask &= context[key].isna() | context[key].eq(value) if value is not None else context[key].isna()
    return mask
