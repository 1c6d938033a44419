"""Seed statistics for KD-vs-baseline comparisons: Welch's standard error and paired t."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def welch_se(std_a: pd.Series, n_a: pd.Series, std_b: pd.Series, n_b: pd.Series) -> pd.Series:
    """Standard error of a difference of two independent means, √(s_a²/n_a + s_b²/n_b)."""
    return np.sqrt(std_a**2 / n_a + std_b**2 / n_b)


def paired_summary(differences: pd.DataFrame, by: list[str], column: str = "diff") -> pd.DataFrame:
    """Per group of ``by`` (at least one column): mean, std (ddof=1), n, paired t, two-sided p and 95 % CI.

    ``differences`` holds one seed-wise difference (KD − baseline, same seed) per row;
    the t statistic equals ``scipy.stats.ttest_rel`` on the two paired samples.
    """
    grouped = differences.groupby(by, dropna=False, sort=False)[column]
    out = grouped.agg(paired_mean="mean", paired_std="std", paired_n="count").reset_index()
    se = out["paired_std"] / np.sqrt(out["paired_n"])
    dof = (out["paired_n"] - 1).where(out["paired_n"] > 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["paired_t"] = out["paired_mean"] / se
    out["paired_p"] = 2 * stats.t.sf(out["paired_t"].abs(), dof)
    half = stats.t.ppf(0.975, dof) * se
    out["paired_ci_low"] = out["paired_mean"] - half
    out["paired_ci_high"] = out["paired_mean"] + half
    return out
