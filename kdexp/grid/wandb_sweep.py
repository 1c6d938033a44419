"""A sweep file as a W&B sweep: checked as W&B's server checks it, created there, run by ``wandb agent``.

``kdexp sweep FILE --wandb`` sends the file (command-line overrides folded into its parameters) to
the W&B server, which then hands runs to ``wandb agent`` processes on any number of machines.
Each agent starts a run with the file's ``command``::

    ${env} ${interpreter} ${program} hydra.run.dir=outputs/sweeps/<name>/${hydra.job.override_dirname} ${args_no_hyphens}

that is ``/usr/bin/env python kdexp/train.py hydra.run.dir=... key=value ...``: the run lands in the
folder ``kdexp sweep`` gives the same point (named by its overrides, under ``outputs/sweeps/<name>/``),
with the same overrides (:mod:`kdexp.core.agent`), skipping a point already finished there and
resuming a killed one. Before anything is composed or sent, the file is checked here: against the
keys W&B's sweep-config schema allows (:func:`schema_violations`; the tests hold it to W&B's own
``sweeps.schema_violations_from_proposed_config``) and for a command that starts kdexp runs
correctly (:func:`agent_problems`); then whether a W&B server can be reached at all.
"""

from __future__ import annotations

import logging
import numbers
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kdexp.core import tracking
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.sweep_file import SweepSpec, hydra_value, parse_overrides, read_yaml
from kdexp.grid.compose import ComposeAhead, GridPoint
from kdexp.grid.sweep import check_points, grid

# What W&B's sweep-config schema allows (the ``sweeps`` package's schema.json; the tests compare).
TOP_LEVEL_KEYS = ("apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
                  "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
                  "early_terminate", "parameters")
METHODS = ("grid", "random", "bayes", "custom")
METRIC_KEYS = ("name", "goal", "target", "impute", "impute_while_running")
GOALS = ("minimize", "maximize")
PARAMETER_KEYS = ("value", "values", "distribution", "probabilities", "min", "max", "q", "mu", "sigma", "a", "b",
                  "parameters")
DISTRIBUTIONS = ("constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform", "q_uniform",
                 "log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                 "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")
PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")  # W&B's pattern: a config path, no +, ~ or /

RUN_DIR_KEY = "hydra.run.dir="
POINT_FOLDER = "${hydra.job.override_dirname}"  # Hydra's name for a point's folder, as in a multirun
# The agent's argument macros other than ${args_no_hyphens}: they write --key=value, or JSON, which Hydra refuses.
WRONG_ARG_MACROS = ("${args}", "${args_no_boolean_flags}", "${args_no_equals}", "${args_json}", "${args_json_file}",
                    "${args_append_hydra}", "${args_override_hydra}")


def run_dir_argument(name: str) -> str:
    """The command argument that puts an agent's run where ``kdexp sweep`` puts the same point."""
    return f"{RUN_DIR_KEY}outputs/sweeps/{name}/{POINT_FOLDER}"


def default_command(name: str) -> list[str]:
    """The ``command`` of every shipped sweep file."""
    return ["${env}", "${interpreter}", "${program}", run_dir_argument(name), "${args_no_hyphens}"]


# -- checks ------------------------------------------------------------------------------
def schema_violations(config: Any) -> list[str]:
    """What W&B's server would reject in a sweep config, one line each (empty: accepted).

    A subset of W&B's own schema check, without its dependencies (its ``sweeps`` package pins
    numpy below 2): the keys, methods, metric, parameter forms and names it allows.
    """
    if not isinstance(config, dict):
        return [f"a sweep config is a mapping (method, metric, parameters, command), not a {type(config).__name__}"]
    out = [f"unknown key '{key}': W&B's sweep config allows {', '.join(TOP_LEVEL_KEYS)}"
           for key in config if key not in TOP_LEVEL_KEYS]
    if config.get("method") not in METHODS:
        out.append(f"method must be one of {', '.join(METHODS[:3])}; got {config.get('method')!r}")
    for key in ("name", "description", "program"):
        if key in config and not isinstance(config[key], str):
            out.append(f"{key} must be a string; got {config[key]!r}")
    cap = config.get("run_cap")
    if "run_cap" in config and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        out.append(f"run_cap must be a positive integer; got {cap!r}")
    if "command" in config and not isinstance(config["command"], list):
        out.append(f"command must be a list (one entry per argument); got {config['command']!r}")
    out += _metric_violations(config.get("metric")) if "metric" in config else []
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        out.append("parameters must be a non-empty mapping of config paths to value / values / min and max")
    else:
        for name, spec in params.items():
            out += _parameter_violations(str(name), spec)
    return out


def _metric_violations(metric: Any) -> list[str]:
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        return [f"metric must be a mapping with a name (e.g. {{name: val/acc_best, goal: maximize}}); got {metric!r}"]
    out = [f"metric: unknown key '{key}' (allowed: {', '.join(METRIC_KEYS)})" for key in metric if key not in METRIC_KEYS]
    if "goal" in metric and metric["goal"] not in GOALS:
        out.append(f"metric.goal must be maximize or minimize; got {metric['goal']!r}")
    return out


def _parameter_violations(name: str, spec: Any) -> list[str]:
    where = f"parameter '{name}'"
    if not PARAMETER_NAME.match(name):
        return [f"{where}: W&B parameter names are config paths (letters, digits, _ . -, not starting with a digit); "
                "a Hydra override such as +key, ~key or group/option cannot be a W&B sweep parameter"]
    if not isinstance(spec, dict):
        return [f"{where} must be a mapping such as {{value: 1}}, {{values: [1, 2]}} or {{min: 0.1, max: 1.0}}; "
                f"got {spec!r}"]
    out = [f"{where}: unknown key '{key}' (allowed: {', '.join(PARAMETER_KEYS)})"
           for key in spec if key not in PARAMETER_KEYS]
    if not ({"value", "values", "min", "max", "distribution", "parameters"} & set(spec)):
        out.append(f"{where} needs value, values, min and max, or a distribution")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        out.append(f"{where}: values must be a non-empty list; got {spec['values']!r}")
    if "distribution" in spec and spec["distribution"] not in DISTRIBUTIONS:
        out.append(f"{where}: unknown distribution {spec['distribution']!r} (W&B has {', '.join(DISTRIBUTIONS)})")
    if ("min" in spec) != ("max" in spec):
        out.append(f"{where}: min and max go together")
    elif "min" in spec:
        low, high = spec["min"], spec["max"]
        numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (low, high))
        if not numeric:
            out.append(f"{where}: min and max must be numbers; got {low!r} and {high!r}")
        elif low > high:
            out.append(f"{where}: min ({low}) is above max ({high})")
    return out


def agent_problems(config: dict[str, Any], name: str) -> list[str]:
    """Why ``wandb agent`` would not start kdexp runs from ``config`` as ``kdexp sweep`` runs them (empty: it would).

    ``name``: the sweep's name, which names its folder ``outputs/sweeps/<name>``.
    """
    fix = f"use the command of the shipped files: [{', '.join(default_command(name))}]"
    command = config.get("command")
    if not isinstance(command, list):
        return [f"no command: W&B's default passes --key=value, which kdexp/train.py (Hydra) refuses; {fix}"]
    items = [str(item) for item in command]
    out = []
    if "${args_no_hyphens}" not in items:
        out.append(f"the command does not pass ${{args_no_hyphens}} (key=value, Hydra's form); {fix}")
    wrong = [item for item in items if item in WRONG_ARG_MACROS]
    if wrong:
        out.append(f"the command passes {', '.join(wrong)}, which writes arguments Hydra refuses; "
                   "use ${args_no_hyphens}")
    if "-m" in items:
        out.append("the command has -m: the agent runs `${interpreter} ${program}`, so the program is a file "
                   "(program: kdexp/train.py), never a module")
    run_dirs = [item for item in items if item.startswith(RUN_DIR_KEY)]
    if not run_dirs or not run_dirs[-1].endswith("/" + POINT_FOLDER):
        out.append(f"the command has no {RUN_DIR_KEY}.../{POINT_FOLDER}: each agent run would get a new dated "
                   "folder under outputs/runs/, so finished points would run again and `kdexp sweep` would not find "
                   f"them; add {run_dir_argument(name)} before ${{args_no_hyphens}}")
    if "${program}" in items and not isinstance(config.get("program"), str):
        out.append("the command runs ${program}, but the file has no program: add program: kdexp/train.py")
    return out


def run_folder(config: dict[str, Any]) -> str | None:
    """The folder the command puts its runs under (``outputs/sweeps/<name>``), as written in it."""
    run_dirs = [str(item) for item in config.get("command") or [] if str(item).startswith(RUN_DIR_KEY)]
    return run_dirs[-1][len(RUN_DIR_KEY):].removesuffix("/" + POINT_FOLDER) if run_dirs else None


def check_for_wandb(config: dict[str, Any], name: str, source: str) -> None:
    """Raise one :class:`ConfigError` listing what W&B or its agents would make of ``config`` (from ``source``)."""
    problems = schema_violations(config)
    problems += agent_problems(config, name) if not problems else []
    if problems:
        raise ConfigError(f"{source} cannot become a W&B sweep; nothing was sent:\n"
                          + "\n".join(f"  {line}" for line in problems))


# -- the config sent ------------------------------------------------------------------------
def sweep_value(text: str) -> Any:
    """A command-line override value as the sweep config holds it: a number, list, bool or null when it
    reads back to exactly the same text (so the agent's run has the same override), else the text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if not isinstance(value, (dict, str)) and hydra_value(value) == text else text


def wandb_sweep_config(spec: SweepSpec, overrides: list[str]) -> dict[str, Any]:
    """The sweep file as sent to W&B, with command-line overrides folded in as fixed values or lists."""
    config = {k: v for k, v in spec.raw.items() if k != "description"}
    params = dict(config.get("parameters") or {})
    for key, values in parse_overrides(overrides).items():
        typed = [sweep_value(v) for v in values]
        params[key] = {"values": typed} if len(typed) > 1 else {"value": typed[0]}
    config["parameters"] = params
    return config


def agent_command(config: dict[str, Any], parameters: dict[str, Any], interpreter: str = "python") -> list[str]:
    """The command line ``wandb agent`` starts for a run with ``parameters`` (its expansion of the macros)."""
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": [interpreter], "${program}": [str(config.get("program"))],
              "${args_no_hyphens}": [f"{key}={value}" for key, value in parameters.items()]}
    return [part for item in config.get("command") or [] for part in macros.get(str(item), [str(item)])]


# -- the server ----------------------------------------------------------------------------
@contextmanager
def _tracking_quiet() -> Iterator[None]:
    """Hide tracking's "logging offline instead" warning: here nothing logs, the sweep is refused."""
    logger = logging.getLogger(tracking.__name__)
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def require_wandb_server(source: str) -> None:
    """Refuse, at once and with what to do, when W&B would not be online (no credentials, ``WANDB_MODE``, no
    answer within 2 s): ``wandb.sweep`` would otherwise wait ~90 s for a server that is not there."""
    with _tracking_quiet():
        mode, reason = tracking.resolve_wandb_mode("auto")
    if mode == "online":
        return
    raise KdexpError(
        f"--wandb needs the W&B server, but W&B is {mode} ({reason}). To create the sweep, run `wandb login` "
        "(or set WANDB_API_KEY) on a machine that reaches the server, with WANDB_MODE unset. Without a server, "
        f"run the same sweep here: kdexp sweep {source} (W&B logs offline; `wandb sync` uploads the runs later)."
    )


def create_wandb_sweep(config: dict[str, Any], project: str, entity: str | None) -> str:
    """Create the sweep on the W&B server and return ``entity/project/id``."""
    import wandb  # lazily: W&B's import costs ~0.5 s

    try:
        sweep_id = wandb.sweep(sweep=config, project=project, entity=entity)
        entity = entity or wandb.Api().default_entity
    except Exception as err:  # noqa: BLE001 - W&B raises several types; each means the server refused
        raise KdexpError(f"W&B did not create the sweep ({type(err).__name__}: {err}). Check `wandb login`, "
                         "--entity and --project.") from err
    return f"{entity}/{project}/{sweep_id}"


def agent_instructions(path: str, config: dict[str, Any], runs: str) -> str:
    """What to run on each machine that joins the sweep ``path`` (``entity/project/id``)."""
    lines = [f"Created W&B sweep {path} ({runs}).",
             "On every machine that should join, from the root of a kdexp checkout where `make setup` was run:"]
    venv = Path(sys.prefix)
    if venv != Path(sys.base_prefix):  # a virtualenv: the agent starts runs with the `python` first on PATH
        shown = venv.relative_to(Path.cwd()) if venv.is_relative_to(Path.cwd()) else venv
        lines.append(f"  source {shown}/bin/activate")
    lines.append(f"  wandb agent {path}")
    lines.append(f"Each run lands in {run_folder(config)}/<its overrides>/ on the machine that runs it (where "
                 "`kdexp sweep` puts the same point); a point finished there is skipped, a killed one resumed.")
    return "\n".join(lines)


# -- kdexp sweep FILE --wandb ----------------------------------------------------------------
def refuse_options(*, dir: Any = None, jobs: int = 1, launcher: str = "local", force: bool = False,
                   sample_seed: int = 0, sampler: str = "tpe", startup_trials: int | None = None) -> None:
    """Refuse the ``kdexp sweep`` options that mean nothing once W&B's agents run the sweep."""
    why = {
        "--dir": (dir is not None, "an agent's run lands where the file's command puts it (its hydra.run.dir=...), "
                                   "on the machine that runs it; edit that argument to choose another folder"),
        "--jobs": (jobs != 1, "each `wandb agent` runs one run at a time; start several agents (on one machine or "
                              "many) to run more at once"),
        "--launcher slurm": (launcher != "local", "submit `wandb agent ENTITY/PROJECT/ID` as SLURM jobs instead "
                                                  "(see docs/clusters.md)"),
        "--force": (force, "agents skip points already finished in their folder; run `kdexp sweep FILE --force` "
                           "locally to run those again"),
        "--sample-seed": (sample_seed != 0, "W&B's server draws the points of method: random itself"),
        "--sampler": (sampler != "tpe", "W&B's server chooses the runs of method: bayes with its own search"),
        "--startup-trials": (startup_trials is not None, "W&B's server chooses the runs of method: bayes with its "
                                                         "own search"),
    }
    given = [f"{option} does not combine with --wandb: {reason}." for option, (on, reason) in why.items() if on]
    if given:
        raise KdexpError(" ".join(given))


def load_for_wandb(path: str | Path) -> SweepSpec:
    """A sweep file read for W&B: any of W&B's methods and parameter forms (checked by :func:`check_for_wandb`),
    with the explicit ``value``/``values`` parameters as axes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}. The shipped ones are in sweeps/ (see sweeps/README.md).")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping (method, metric, parameters, command), "
                          f"not a {type(raw).__name__}.")
    params = raw.get("parameters") if isinstance(raw.get("parameters"), dict) else {}
    axes = {str(key): list(spec["values"]) if "values" in spec else [spec["value"]] for key, spec in params.items()
            if isinstance(spec, dict) and ("value" in spec or isinstance(spec.get("values"), list))}
    return SweepSpec(name=str(raw.get("name") or path.stem), raw=raw, axes=axes)


def points_to_check(spec: SweepSpec, config: dict[str, Any], overrides: list[str]) -> list[GridPoint]:
    """Every point W&B can hand out when all parameters are explicit values (grid, or random and bayes over
    a grid); none when some parameter is a range (each run is then checked when it starts)."""
    if set(spec.axes) != {str(key) for key in spec.raw.get("parameters") or {}}:
        return []
    return grid(SweepSpec(spec.name, {**spec.raw, "method": "grid"}, spec.axes), overrides)


def runs_in_words(config: dict[str, Any], points: list[GridPoint]) -> str:
    method, cap = config.get("method"), config.get("run_cap")
    if method == "grid" and points:
        return f"{len(points)} run{'s' * (len(points) > 1)} in the grid"
    return f"method {method}, " + (f"at most {cap} runs" if cap else "runs until the sweep is stopped")


def sweep_on_wandb(file: str | Path, overrides: list[str], project: str, entity: str | None,
                   dry_run: bool = False, run_cap: int | None = None) -> tuple[list[GridPoint], Path]:
    """``kdexp sweep FILE --wandb``: check the file and the server, check every point that can be listed, create
    the sweep and print how agents join it (``dry_run``: print the config that would be sent instead).
    ``run_cap``: replaces the file's. Returns the points checked and the folder the agents' runs land in
    (under this working folder)."""
    spec = load_for_wandb(file)
    config = wandb_sweep_config(spec, overrides)
    if run_cap is not None:
        config["run_cap"] = run_cap
    check_for_wandb(config, spec.name, str(file))
    if not dry_run:
        require_wandb_server(str(file))  # before anything is composed: seconds, never W&B's 90 s wait
    points = points_to_check(spec, config, overrides)
    if points:
        ahead = ComposeAhead(points)
        try:
            check_points(points, ahead)  # every point composes and validates, or nothing is sent
        finally:
            ahead.close()
    if dry_run:
        sample = {key: spec["values"][0] if "values" in spec else spec["value"]
                  for key, spec in config["parameters"].items()} if points else {}
        print(yaml.safe_dump(config, sort_keys=False).rstrip())
        if sample:
            print(f"# {runs_in_words(config, points)}; an agent starts the first as:\n#   "
                  + shlex.join(agent_command(config, sample)))
        else:
            print(f"# {runs_in_words(config, points)}; W&B's server chooses each run's values in the ranges")
        return points, Path(str(run_folder(config))).resolve()
    path = create_wandb_sweep(config, project, entity)
    print(agent_instructions(path, config, runs_in_words(config, points)))
    return points, Path(str(run_folder(config))).resolve()
