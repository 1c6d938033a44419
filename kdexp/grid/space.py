"""A ``method: bayes`` sweep file's parameters (W&B's grammar) as an Optuna search space.

W&B's parameter forms and what a local search makes of them:

==========================================  ===============================================
sweep file                                  local search (Optuna distribution)
==========================================  ===============================================
``value: v``                                fixed: every trial gets ``key=v``
``values: [a, b, c]``                       categorical over a, b, c
``min: 1, max: 8`` (both integers)          ``int_uniform``: integers 1..8
``min: 0.1, max: 0.9`` (a float among them) ``uniform``: reals in [0.1, 0.9]
``distribution: int_uniform`` / ``uniform`` as named (``uniform`` with integers: reals)
``distribution: q_uniform`` (``q``)         the multiples of q in [min, max]; integers when q is one
``distribution: log_uniform_values``        reals in [min, max], log scale (min > 0)
``distribution: log_uniform``               reals in [e^min, e^max], log scale (W&B's exponents)
==========================================  ===============================================

W&B's other distributions (normal, log_normal, beta, inv_log_uniform, the quantized log forms,
``probabilities`` on values, nested ``parameters``) have no Optuna counterpart over a bounded range;
they are refused with a message naming the ones that work. W&B's server still takes them
(``kdexp sweep FILE --wandb``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kdexp.core.errors import ConfigError
from kdexp.core.sweep_file import SweepSpec, hydra_value, parse_overrides

# W&B distribution name → how a local search reads it (see the module docstring).
SUPPORTED = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values", "log_uniform")
UNSUPPORTED = {
    "normal": "unbounded", "q_normal": "unbounded", "log_normal": "unbounded", "q_log_normal": "unbounded",
    "beta": "no Optuna counterpart", "q_beta": "no Optuna counterpart",
    "inv_log_uniform": "no Optuna counterpart", "inv_log_uniform_values": "no Optuna counterpart",
    "q_log_uniform": "Optuna has no log scale with a step", "q_log_uniform_values": "Optuna has no log scale with a step",
    "categorical_w_probabilities": "Optuna draws categories without weights",
}
_RANGE_KEYS = {"min", "max", "distribution", "q"}


@dataclass
class SearchSpace:
    """What a search varies (``distributions``, in file order) and what every trial gets (``fixed``)."""

    distributions: dict[str, Any]  # key → optuna.distributions.BaseDistribution
    fixed: dict[str, str] = field(default_factory=dict)  # key → Hydra value
    described: dict[str, str] = field(default_factory=dict)  # key → "uniform [0.1, 0.9]"

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's Hydra overrides: the fixed ones, then its parameters."""
        return [f"{k}={v}" for k, v in self.fixed.items()] + [f"{k}={hydra_value(params[k])}"
                                                              for k in self.distributions]

    def corners(self) -> list[dict[str, Any]]:
        """Parameters that reach every end of the space: all lows, all highs, and each category once.
        Composing and validating these before a search starts catches a value no run would accept."""
        low = {k: _ends(d)[0] for k, d in self.distributions.items()}
        high = {k: _ends(d)[1] for k, d in self.distributions.items()}
        out = [low, high]
        for key, dist in self.distributions.items():
            out += [{**low, key: choice} for choice in getattr(dist, "choices", ())[1:]]
        unique = []
        for params in out:
            if params not in unique:
                unique.append(params)
        return unique

    def describe(self) -> str:
        return ", ".join(f"{k} {text}" for k, text in self.described.items())


def _ends(dist: Any) -> tuple[Any, Any]:
    if hasattr(dist, "choices"):
        return dist.choices[0], dist.choices[-1]
    return dist.low, dist.high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(value: Any) -> Any:
    """A categorical value as Optuna can hold it (None, bool, int, float, str): a list (``chain: [64, 32]``)
    becomes its Hydra override text, which the trial's command line receives either way."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else hydra_value(value)


def distribution(key: str, spec: Any) -> tuple[Any, str]:
    """One parameter of a ``method: bayes`` file (not a ``value``) as an Optuna distribution and its description."""
    from optuna.distributions import (  # optuna: searches only
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    where = f"parameter '{key}'"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: 1, max: 8}}; got {spec!r}.")
    name = spec.get("distribution")
    if "parameters" in spec:
        raise ConfigError(f"{where}: nested parameters are not supported by a local search; name each setting by its "
                          "dotted config path (e.g. kd.temperature) instead.")
    if "probabilities" in spec:
        name = "categorical_w_probabilities"
    if name in UNSUPPORTED:
        raise ConfigError(f"{where}: distribution {name} is not supported by a local search ({UNSUPPORTED[name]}). "
                          f"Use one of {', '.join(SUPPORTED)}, or run the file on W&B's server (kdexp sweep FILE "
                          "--wandb).")
    if name is not None and name not in SUPPORTED:
        raise ConfigError(f"{where}: unknown distribution '{name}'; W&B's names that a local search supports: "
                          f"{', '.join(SUPPORTED)}.")
    if "values" in spec:
        values = spec["values"]
        if name not in (None, "categorical") or set(spec) - {"values", "distribution"}:
            raise ConfigError(f"{where}: 'values' is a list of choices (categorical); it does not combine with "
                              f"{', '.join(sorted(set(spec) - {'values'}))}.")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: 'values' must be a non-empty list.")
        choices = tuple(_choice(v) for v in values)
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: 'values' lists a value twice ({values}).")
        return CategoricalDistribution(choices), f"categorical {list(values)}"
    extra = set(spec) - _RANGE_KEYS
    if extra or not {"min", "max"} <= set(spec):
        raise ConfigError(f"{where}: a range needs min and max (and optionally distribution, q); got {spec!r}"
                          + (f" (unknown: {', '.join(sorted(extra))})" if extra else "") + ".")
    low, high = spec["min"], spec["max"]
    if not (_number(low) and _number(high)):
        raise ConfigError(f"{where}: min and max must be numbers; got min={low!r}, max={high!r}.")
    if low >= high:
        raise ConfigError(f"{where}: min {low} is not less than max {high}.")
    both_int = isinstance(low, int) and isinstance(high, int)
    if name is None:  # W&B infers it from the types: integers → int_uniform, a float among them → uniform
        name = "int_uniform" if both_int else "uniform"
    if "q" in spec and name != "q_uniform":
        raise ConfigError(f"{where}: q (the step) belongs to distribution: q_uniform, not {name}.")
    if name == "int_uniform":
        if not both_int:
            raise ConfigError(f"{where}: int_uniform needs integer min and max; got min={low!r}, max={high!r} (write "
                              "distribution: uniform for reals).")
        return IntDistribution(low, high), f"int_uniform [{low}, {high}]"
    if name == "uniform":
        return FloatDistribution(float(low), float(high)), f"uniform [{low}, {high}]"
    if name == "log_uniform_values":
        if low <= 0:
            raise ConfigError(f"{where}: log_uniform_values needs min > 0; got {low}.")
        return FloatDistribution(float(low), float(high), log=True), f"log_uniform_values [{low}, {high}]"
    if name == "log_uniform":  # W&B's min and max are natural-log exponents here
        return (FloatDistribution(math.exp(low), math.exp(high), log=True),
                f"log_uniform [e^{low}, e^{high}] = [{math.exp(low):.4g}, {math.exp(high):.4g}]")
    q = spec.get("q", 1.0)  # q_uniform: W&B's default step is 1.0
    if not _number(q) or q <= 0:
        raise ConfigError(f"{where}: q must be a positive number; got {q!r}.")
    first, last = math.ceil(low / q), math.floor(high / q)
    if first > last:
        raise ConfigError(f"{where}: no multiple of q={q} lies in [{low}, {high}].")
    if isinstance(q, int):  # W&B returns integers when q is an integer
        return IntDistribution(first * q, last * q, step=q), f"q_uniform [{low}, {high}], step {q}"
    return (FloatDistribution(first * q, last * q, step=q), f"q_uniform [{low}, {high}], step {q}")


def search_space(spec: SweepSpec, overrides: list[str] | None = None) -> SearchSpace:
    """The space of ``spec`` (a ``method: bayes`` file), with command-line overrides applied:
    ``key=v`` fixes ``key`` for every trial, ``key=v1,v2`` makes it a choice between those values."""
    from optuna.distributions import CategoricalDistribution  # optuna: searches only

    fixed: dict[str, str] = {}
    dists: dict[str, Any] = {}
    described: dict[str, str] = {}
    problems: list[str] = []
    for key, param in spec.raw["parameters"].items():
        key = str(key)
        if isinstance(param, dict) and set(param) <= {"value", "distribution"} and "value" in param:
            if param.get("distribution", "constant") != "constant":
                problems.append(f"parameter '{key}': 'value' is a constant; it does not combine with "
                                f"distribution: {param['distribution']}.")
            fixed[key] = hydra_value(param["value"])
            continue
        try:
            dists[key], described[key] = distribution(key, param)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(f"{spec.name}: the search space cannot be built:\n  " + "\n  ".join(problems))
    for key, values in parse_overrides(overrides or []).items():
        dists.pop(key, None)
        described.pop(key, None)
        fixed.pop(key, None)
        if len(values) == 1:
            fixed[key] = values[0]
        else:
            dists[key], described[key] = CategoricalDistribution(tuple(values)), f"categorical {values} (command line)"
    hydra_keys = [k for k in dists if k.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if hydra_keys:
        raise ConfigError(f"{spec.name}: {', '.join(hydra_keys)} shape how runs are executed, not what they compute: "
                          "a search cannot vary them (give them one value).")
    if not dists:
        raise ConfigError(f"{spec.name}: nothing to search: every parameter has one value. Give some parameter "
                          "values: [...] or min/max, or use method: grid.")
    return SearchSpace(dists, fixed, described)
