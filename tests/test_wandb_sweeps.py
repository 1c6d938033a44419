"""W&B sweeps that W&B understands: every shipped sweep file passes W&B's own sweep-config check, and
``wandb agent`` (its own code, run here) starts kdexp runs exactly as ``kdexp sweep`` runs them.

W&B's sweep engine (the ``sweeps`` package) pins numpy below 2, which would break this project's
pandas: it is installed for the test only, into a temporary folder (``pip install --no-deps
--target``), and imported in a child process with that folder on ``PYTHONPATH``. Default run ~45 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, load_record, run_cli

from kdexp import api
from kdexp.core.agent import agent_overrides
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.sweep_file import hydra_value
from kdexp.grid.sweep import grid, load_sweep
from kdexp.grid.wandb_sweep import (
    agent_instructions,
    agent_problems,
    default_command,
    load_for_wandb,
    schema_violations,
    wandb_sweep_config,
)
from kdexp.report.wandb_runs import records_from_wandb_runs

SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
SMOKE = ROOT / "sweeps" / "smoke.yaml"
# One point of the smoke grid, through two chain stages (a list parameter) so that the agent's run
# trains a teacher and two assistants in its own process first: ~12 s on digits.
POINT = ["kd.temperature=2", "kd.alpha=0.5", "student.width=16", "seed=1", "trainer.max_epochs=2", "chain=[32,24]"]
# Overrides typical of `kdexp sweep FILE ... --wandb`, folded into the config sent.
TYPICAL_OVERRIDES = ["seed=1,2", "trainer.max_epochs=5"]


# -- W&B's own schema check ------------------------------------------------------------------
@pytest.fixture(scope="module")
def wandb_engine(tmp_path_factory) -> dict[str, str]:
    """The environment in which W&B's sweep engine imports: ``sweeps`` (no dependencies) and the two of its
    imports this project's .venv lacks (jsonschema, jsonref), each in a folder of its own. numpy, scipy,
    scikit-learn, pydantic and PyYAML come from the .venv (numpy 2: pip's --no-deps ignores the pin)."""
    base = tmp_path_factory.mktemp("wandb-sweeps-engine")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target"]
    for target, packages in ((base / "engine", ["--no-deps", "sweeps"]), (base / "deps", ["jsonschema", "jsonref"])):
        proc = subprocess.run([*pip, str(target), *packages], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"pip could not install {packages} from the registry:\n{proc.stderr[-2000:]}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(base / "engine"), str(base / "deps")])
    return env


WANDB_CHECK = """
import json, sys, warnings
warnings.simplefilter("ignore")  # the engine's pydantic models use v1 option names
import numpy, sweeps
from sweeps import schema_violations_from_proposed_config
configs = json.load(sys.stdin)
print(json.dumps({"sweeps": sweeps.__version__, "numpy": numpy.__version__,
                  "violations": {name: schema_violations_from_proposed_config(c) for name, c in configs.items()}}))
"""


def wandb_violations(env: dict[str, str], configs: dict[str, dict]) -> dict:
    """W&B's ``schema_violations_from_proposed_config`` of each config, run in a child with the engine importable."""
    proc = subprocess.run([sys.executable, "-c", WANDB_CHECK], input=json.dumps(configs), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_shipped_sweep_file_passes_wandbs_own_schema_check(wandb_engine):
    """The raw file, the config `kdexp sweep FILE --wandb` sends, and the one it sends with typical overrides."""
    configs = {}
    for path in SWEEP_FILES:
        spec = load_for_wandb(path)
        configs[f"{path.name} (file)"] = spec.raw
        configs[f"{path.name} (sent)"] = wandb_sweep_config(spec, [])
        configs[f"{path.name} (sent, {' '.join(TYPICAL_OVERRIDES)})"] = wandb_sweep_config(spec, TYPICAL_OVERRIDES)
    result = wandb_violations(wandb_engine, configs)
    assert result["numpy"].split(".")[0] == "2"  # the engine's check ran on this project's numpy, pin or not
    assert result["violations"] == {name: [] for name in configs}
    for name, config in configs.items():  # kdexp's own check agrees, and each command starts kdexp runs right
        assert schema_violations(config) == [], name
        assert agent_problems(config, load_for_wandb(ROOT / "sweeps" / name.split(" ")[0]).name) == [], name
    assert len(SWEEP_FILES) >= 10


BROKEN = {
    "unknown top-level key": {"method": "grid", "parameters": {"seed": {"values": [1]}}, "workers": 2},
    "unknown method": {"method": "hyperband", "parameters": {"seed": {"values": [1]}}},
    "no method": {"parameters": {"seed": {"values": [1]}}},
    "bad goal": {"method": "bayes", "metric": {"name": "val/acc", "goal": "up"}, "parameters": {"a": {"values": [1]}}},
    "metric without a name": {"method": "grid", "metric": {"goal": "maximize"}, "parameters": {"a": {"value": 1}}},
    "parameter without values": {"method": "grid", "parameters": {"kd.alpha": {"choices": [0.5]}}},
    "values not a list": {"method": "grid", "parameters": {"kd.alpha": {"values": 0.5}}},
    "min above max": {"method": "random", "parameters": {"kd.alpha": {"min": 0.9, "max": 0.1}}},
    "unknown distribution": {"method": "random", "parameters": {"kd.alpha": {"distribution": "zipf", "min": 0,
                                                                             "max": 1}}},
    "Hydra append as a name": {"method": "grid", "parameters": {"+trainer.foo": {"value": 1}}},
    "run_cap zero": {"method": "random", "run_cap": 0, "parameters": {"seed": {"values": [1, 2]}}},
}
VALID_BAYES = {"method": "bayes", "run_cap": 12, "metric": {"name": "val/acc_best", "goal": "maximize"},
               "parameters": {"kd.temperature": {"min": 1.0, "max": 16.0, "distribution": "log_uniform_values"},
                              "kd.alpha": {"min": 0.1, "max": 0.95}, "student.width": {"values": [16, 32, 64]},
                              "seed": {"value": 1}}}


def test_kdexps_own_check_agrees_with_wandbs(wandb_engine):
    """kdexp checks a file without W&B's engine, before anything is composed: on each broken config both
    object, and both accept a bayes search over ranges (run_cap, min/max, a distribution)."""
    result = wandb_violations(wandb_engine, {**BROKEN, "valid bayes": VALID_BAYES})["violations"]
    assert result.pop("valid bayes") == [] and schema_violations(VALID_BAYES) == []
    assert all(result[name] for name in BROKEN), {name: v for name, v in result.items() if not v}
    assert all(schema_violations(config) for config in BROKEN.values()), \
        {name: schema_violations(config) for name, config in BROKEN.items() if not schema_violations(config)}


# -- the agent's arguments, as kdexp sweep writes them ------------------------------------
def test_agent_arguments_become_kdexp_sweeps_overrides():
    """wandb's agent writes str(value): `chain=[64, 32]`, `x=None`, `flag=True`; kdexp reads the agent's
    parameter file and writes them as `kdexp sweep` does (Hydra: null means null, not the text None)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"chain": [64, 32], "data.transfer_set": None, "trainer.deterministic": True, "kd.alpha": 0.5,
              "kd": "hinton", "lr": "0.10", "empty": []}
    written = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
    assert "chain=[64, 32]" in written and "data.transfer_set=None" in written
    argv = ["hydra.run.dir=outputs/sweeps/x/${hydra.job.override_dirname}", *written, "verbose=true"]
    assert agent_overrides(argv, params) == [argv[0], *[f"{k}={hydra_value(v)}" for k, v in params.items()],
                                             "verbose=true"]
    assert agent_overrides(argv, {}) == argv  # outside an agent: untouched


def test_override_values_keep_their_text_in_the_config_sent():
    """A command-line override folded into the W&B config reads back as the same Hydra text."""
    config = wandb_sweep_config(load_sweep(SMOKE), ["seed=1,2", "kd.alpha=0.10", "chain=[64,32]", "x=null"])
    params = config["parameters"]
    assert params["seed"] == {"values": [1, 2]} and params["chain"] == {"value": [64, 32]}
    assert params["kd.alpha"] == {"value": "0.10"} and params["x"] == {"value": None}


# -- the agent's command line, run ------------------------------------------------------
AGENT_DRIVER = """
import json, os, sys
from wandb import wandb_agent

config, run_id, params, out = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
started = []


class Recorded(wandb_agent.AgentProcess):  # the agent's own process, with the command it was given kept
    def __init__(self, *args, command=None, **kwargs):
        started.append(command)
        super().__init__(*args, command=command, **kwargs)


wandb_agent.AgentProcess = Recorded
os.environ["WANDB_SWEEP_ID"] = "kdexp-test-sweep"  # as Agent.run() sets it
agent = wandb_agent.Agent(api=None, queue=None, sweep_id="kdexp-test-sweep")
agent._sweep_command = config["command"]  # as Agent.run() takes it from the sweep's config
agent._command_run({"run_id": run_id, "program": config["program"],
                    "args": {key: {"value": value} for key, value in params.items()}})
code = agent._run_processes[run_id]._popen.wait()
with open(out, "w") as f:
    json.dump({"command": started[0], "returncode": code}, f)
"""


def first_grid_run(config: dict) -> dict:
    """The parameters of the first run a W&B grid search hands out (each parameter's first value)."""
    return {key: spec["values"][0] if "values" in spec else spec["value"] for key, spec in config["parameters"].items()}


def start_agent_run(checkout: Path, config: dict, run_id: str, cache: Path) -> tuple[dict, str]:
    """Start one run as ``wandb agent`` does (its ``Agent._command_run``: expansion of the command, parameter
    file, environment), from the checkout's root, with ``.venv/bin`` first on PATH; returns what it ran."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDEXP_", "WANDB_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "KDEXP_CACHE_DIR": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "WANDB_DIR": str(checkout)})
    out = checkout / f"agent-{run_id}.json"
    proc = subprocess.run([sys.executable, "-c", AGENT_DRIVER, json.dumps(config), run_id,
                           json.dumps(first_grid_run(config)), str(out)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def agent_runs(tmp_path_factory):
    """A checkout (kdexp/ and sweeps/ of this repository) in which the agent runs the smoke grid's POINT twice."""
    checkout = tmp_path_factory.mktemp("checkout")
    (checkout / "kdexp").symlink_to(ROOT / "kdexp")
    shutil.copytree(ROOT / "sweeps", checkout / "sweeps")
    config = wandb_sweep_config(load_sweep(SMOKE), POINT)
    first, first_out = start_agent_run(checkout, config, "agentrun1", checkout / "cache")
    folders = sorted((checkout / "outputs" / "sweeps" / "smoke").iterdir())
    record_bytes = (folders[0] / "run_record.json").read_bytes() if folders else b""
    second, second_out = start_agent_run(checkout, config, "agentrun2", checkout / "cache")
    return {"checkout": checkout, "config": config, "first": first, "second": second, "folders": folders,
            "record_bytes": record_bytes, "second_out": second_out, "first_out": first_out}


def test_the_agent_expands_the_command_into_a_kdexp_run(agent_runs):
    """The command the agent itself built: the file's program run by the `python` on PATH, the run folder,
    then one key=value argument per parameter (a list as one argument, as str() writes it)."""
    command, config = agent_runs["first"]["command"], agent_runs["config"]
    assert command[:4] == ["/usr/bin/env", "python", "kdexp/train.py", default_command("smoke")[3]]
    assert command[4:] == [f"{key}={value}" for key, value in first_grid_run(config).items()]
    assert "chain=[32, 24]" in command
    assert "-m" not in command
    assert agent_runs["first"]["returncode"] == 0, agent_runs["first_out"][-3000:]


def test_the_agents_run_lands_where_kdexp_sweep_puts_the_point(agent_runs):
    """Its record sits in the folder a `kdexp sweep` multirun gives the same point, with the same overrides;
    `kdexp sweep` then finds it finished there."""
    checkout, folders = agent_runs["checkout"], agent_runs["folders"]
    assert len(folders) == 1
    record = load_record(folders[0])
    assert record["status"] == "finished" and record["config"]["group"] == "smoke"
    (point,) = grid(load_sweep(SMOKE), POINT)
    assert tuple(sorted(record["overrides"])) == point and "chain=[32,24]" in point

    local = run_cli(["sweep", "sweeps/smoke.yaml", *POINT, "--dir", "outputs/local"], checkout / "cache",
                    module="kdexp.cli", cwd=checkout)
    assert local.returncode == 0, local.stderr[-3000:]
    (local_folder,) = [path.parent for path in (checkout / "outputs" / "local").glob("*/run_record.json")]
    assert local_folder.name == folders[0].name
    assert load_record(local_folder)["overrides"] == record["overrides"]

    dry = run_cli(["sweep", "sweeps/smoke.yaml", *POINT, "--dry-run"], checkout / "cache", module="kdexp.cli",
                  cwd=checkout)
    assert dry.returncode == 0 and "skip (finished)" in dry.stdout, dry.stdout + dry.stderr[-2000:]


def test_only_the_student_run_takes_the_agents_wandb_run(agent_runs):
    """The teacher and both chain stages, trained first in the agent's process, log W&B runs of their own;
    the student's run is the agent's (WANDB_RUN_ID)."""
    checkout = agent_runs["checkout"]
    record = load_record(agent_runs["folders"][0])
    assert record["wandb"]["id"] == "agentrun1"
    runs = {str(path.parent.parent.relative_to(checkout / "cache")): path.name.rsplit("-", 1)[1]
            for path in (checkout / "cache").glob("*/*/wandb/offline-run-*")}
    assert len(runs) == 3, runs  # teachers/<key>, stages/<key>, stages/<key>
    assert "agentrun1" not in runs.values() and "agentrun2" not in runs.values()
    assert [p.name.rsplit("-", 1)[1] for p in agent_runs["folders"][0].glob("wandb/offline-run-*")] == ["agentrun1"]


def test_the_agent_skips_a_finished_point_and_gives_w_and_b_its_result(agent_runs):
    """Started again for the same point (a W&B sweep resumed, or the point finished by `kdexp sweep`), the
    run skips: exit 0, its folder byte for byte as it was; the agent's new W&B run (in the agent's folder)
    holds the finished run's config and final metrics, so W&B's sweep has the point's result."""
    assert agent_runs["second"]["returncode"] == 0
    assert "already holds a finished run" in agent_runs["second_out"]
    folder = agent_runs["folders"][0]
    assert (folder / "run_record.json").read_bytes() == agent_runs["record_bytes"]
    assert [p.name.rsplit("-", 1)[1] for p in folder.glob("wandb/offline-run-*")] == ["agentrun1"]
    (second,) = agent_runs["checkout"].glob("wandb/offline-run-*-agentrun2")
    run = wandb_run(second)
    record = load_record(folder)
    assert run["state"] == "finished" and run["name"] == record["run_name"]
    assert {k: run["summary"][k] for k in record["metrics"]} == record["metrics"]
    assert run["config"]["kd.temperature"] == 2 and run["config"]["teacher_hash"] == record["teacher"]["hash"]


def wandb_run(folder: Path) -> dict:
    """A local offline W&B run read as W&B reads it (``wandb leet inspect``): config, summary, state."""
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                           str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_kdexp_reads_an_agents_wandb_run_back_as_a_record(agent_runs):
    """W&B locks each sweep parameter as the agent gave it, so the run's config holds `kd: hinton` (the
    choice) beside `kd.temperature: 2`: `kdexp report wandb:...` reads it as the local record's config."""
    folder = agent_runs["folders"][0]
    (path,) = folder.glob("wandb/offline-run-*-agentrun1")
    run = wandb_run(path)
    assert run["config"]["kd"] == "hinton"  # the sweep's value won over kdexp's kd settings
    (record,) = records_from_wandb_runs([SimpleNamespace(config=run["config"], summary=run["summary"],
                                                         state=run["state"], id=run["run_id"], name=run["name"],
                                                         group="smoke")])
    local = load_record(folder)
    assert record["choices"]["kd"] == "hinton" and record["status"] == "finished"
    for path in ("kd.temperature", "kd.alpha", "student.width", "seed", "chain"):
        node_wandb, node_local = record["config"], local["config"]
        for part in path.split("."):
            node_wandb, node_local = node_wandb[part], node_local[part]
        assert node_wandb == node_local, path
    assert record["metrics"]["val/acc_best"] == local["metrics"]["val/acc_best"]
    assert record["teacher"]["hash"] == local["teacher"]["hash"]


# -- kdexp sweep FILE --wandb -------------------------------------------------------------
@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """No W&B mode in the environment and no credentials (HOME without ~/.netrc)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_wandb_sweep_without_a_server_says_what_to_do_at_once(no_server, tmp_path):
    """No credentials: the CLI stops in seconds with `wandb login` or the local command, no traceback."""
    started = time.monotonic()
    proc = run_cli(["sweep", str(SMOKE), "--wandb"], tmp_path / "cache", module="kdexp.cli",
                   extra_env={"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--wandb needs the W&B server, but W&B is offline (no W&B credentials" in proc.stderr
    assert "wandb login" in proc.stderr and f"kdexp sweep {SMOKE}" in proc.stderr
    assert time.monotonic() - started < 30


def test_wandb_sweep_with_a_key_but_no_server_fails_within_seconds(no_server, monkeypatch):
    """A key, but nothing answers: refused after the 2 s connection check, never W&B's 90 s wait."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(KdexpError, match=r"W&B is offline \(W&B credentials found, but the server is unreachable\)"):
        api.sweep(SMOKE, wandb=True)
    assert time.monotonic() - started < 10


def test_wandb_sweep_checks_the_file_first_and_composes_nothing_without_a_server(no_server, tmp_path):
    """A command that would not start kdexp runs is refused before the server is asked; a grid point that
    cannot compose is not reached without a server (the server is checked before anything is composed)."""
    raw = yaml.safe_load(SMOKE.read_text())
    bad_command = tmp_path / "bad_command.yaml"
    bad_command.write_text(yaml.safe_dump({**raw, "command": ["${env}", "${interpreter}", "-m", "${program}",
                                                             "${args}"]}))
    with pytest.raises(ConfigError) as err:
        api.sweep(bad_command, wandb=True)
    text = str(err.value)
    assert "nothing was sent" in text and "-m" in text and "${args_no_hyphens}" in text
    assert "hydra.run.dir=outputs/sweeps/smoke/${hydra.job.override_dirname}" in text

    bad_point = tmp_path / "bad_point.yaml"
    bad_point.write_text(yaml.safe_dump({**raw, "parameters": {**raw["parameters"], "kd": {"value": "hintn"}}}))
    with pytest.raises(KdexpError, match="--wandb needs the W&B server"):
        api.sweep(bad_point, wandb=True)
    with pytest.raises(ConfigError, match="cannot start"):  # with --dry-run (no server needed) it is composed
        api.sweep(bad_point, wandb=True, dry_run=True)


def test_wandb_sweep_refuses_options_that_mean_nothing_there():
    with pytest.raises(KdexpError, match="--dir does not combine with --wandb: an agent's run lands where"):
        api.sweep(SMOKE, wandb=True, dir="elsewhere")
    with pytest.raises(KdexpError, match="--jobs does not combine with --wandb.*start several agents"):
        api.sweep(SMOKE, wandb=True, jobs=2)


def test_wandb_dry_run_prints_the_config_and_the_agents_first_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = api.sweep(SMOKE, ["seed=1"], wandb=True, dry_run=True)
    out = capsys.readouterr().out
    sent = yaml.safe_load(out)
    assert sent["parameters"]["seed"] == {"value": 1} and sent["command"] == default_command("smoke")
    assert "/usr/bin/env python kdexp/train.py 'hydra.run.dir=outputs/sweeps/smoke/${hydra.job.override_dirname}'" \
        in out
    assert len(result.points) == 8 and result.dir == ROOT / "outputs" / "sweeps" / "smoke"
    said = agent_instructions("team/kdexp/abc123", sent, "8 runs in the grid").splitlines()
    assert said[2:4] == ["  source .venv/bin/activate", "  wandb agent team/kdexp/abc123"]  # the .venv's python
    assert "outputs/sweeps/smoke/<its overrides>/" in said[4]
