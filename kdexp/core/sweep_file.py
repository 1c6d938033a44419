"""A sweep file (W&B sweep format) read and checked: its name, method and parameter axes.

Only parsing lives here, so that both ``grid/`` (which runs sweeps) and ``report/`` (which
builds tables and dashboards for them) can read a sweep file without importing each other.
``method: grid`` and ``random`` run explicit ``value``/``values``; ``method: bayes`` may also give
ranges (``min``/``max`` with W&B's ``distribution`` names), which :mod:`kdexp.grid.space` turns into
a search space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdexp.core.errors import ConfigError


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    name: str
    raw: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)  # key → values, in file order
    ranges: dict[str, dict[str, Any]] = field(default_factory=dict)  # method: bayes: key → its distribution

    @property
    def method(self) -> str:
        return str(self.raw.get("method", "grid"))


def hydra_value(value: Any) -> str:
    """How a value is written in a Hydra override (and in ``${args_no_hyphens}``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):  # chain: [64, 32] → chain=[64,32] (one argument, no spaces)
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


LOCAL_METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")


def read_yaml(path: Path) -> Any:
    """The YAML in ``path``, or one paragraph naming the line and column that does not parse."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}" + (f" ({context})" if context else "")
                          + ". Compare with a shipped file in sweeps/.") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Parse and check a sweep file: explicit ``value``/``values`` for grid and random; ranges for bayes too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}. The shipped ones are in sweeps/ (see sweeps/README.md).")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (method, metric, parameters, command), "
                          f"not a {type(raw).__name__}.")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: a sweep file needs a 'parameters' mapping of config paths to value/values.")
    method = str(raw.get("method", "grid"))
    if method not in LOCAL_METHODS:
        raise ConfigError(f"{path}: method must be grid, random or bayes; got '{method}'.")
    axes: dict[str, list[Any]] = {}
    ranges: dict[str, dict[str, Any]] = {}
    for key, spec in params.items():
        if method == "bayes" and isinstance(spec, dict) and not ({"value", "values"} & set(spec)):
            ranges[str(key)] = spec  # a distribution: checked against W&B's grammar by kdexp.grid.space
            continue
        if not isinstance(spec, dict) or not ({"value", "values"} & set(spec)):
            raise ConfigError(
                f"{path}: parameter '{key}' has no 'value' or 'values' ({spec}). Local grid and random sweeps run "
                "explicit values; distributions (min/max) only work as W&B sweeps (kdexp sweep --wandb) or in a "
                "local search (method: bayes)."
            )
        values = spec["values"] if "values" in spec else [spec["value"]]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: parameter '{key}': 'values' must be a non-empty list.")
        axes[str(key)] = values
    if method in ("random", "bayes"):
        cap = raw.get("run_cap")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            what = "sample from the grid" if method == "random" else "try"
            raise ConfigError(f"{path}: method: {method} needs run_cap (a positive integer: how many runs to "
                              f"{what}); got {cap!r}.")
    if method == "bayes":
        metric = raw.get("metric")
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
            raise ConfigError(f"{path}: method: bayes needs metric: {{name: ..., goal: maximize|minimize}}, the "
                              f"recorded metric each run is judged by (e.g. val/acc_best); got {metric!r}.")
        if metric.get("goal") not in GOALS:
            raise ConfigError(f"{path}: metric.goal must be maximize or minimize for method: bayes; got "
                              f"{metric.get('goal')!r} (W&B would assume minimize: say which you mean).")
    return SweepSpec(name=str(raw.get("name") or path.stem), raw=raw, axes=axes, ranges=ranges)


def parse_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """``key=v1,v2`` command-line overrides as key → values (they replace the file's axis)."""
    parsed: dict[str, list[str]] = {}
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise ConfigError(f"expected a Hydra override key=value, got '{item}'.")
        key, value = item.split("=", 1)
        parsed[key] = value.split(",") if value and "[" not in value else [value]
    return parsed


def sweep_axes(spec: SweepSpec, overrides: list[str] | None = None) -> dict[str, list[str]]:
    """The sweep's axes as Hydra override values, with command-line overrides replacing the file's."""
    axes = {k: [hydra_value(v) for v in vs] for k, vs in spec.axes.items()}
    axes.update(parse_overrides(overrides or []))
    return axes
