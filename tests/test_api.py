"""The Python API: a grid driven from Python alone, read back and tabulated, against the commands.

One module-scoped grid on digits (Hinton KD, T 2/4 × seeds 1/2 through ``api.sweep``, and the
CE-only student for both seeds through ``api.train``). Its table must be what ``kdexp report``
prints on the same records, and its numbers the means of the record files, read here with
``json`` alone. ``api.compose`` must give what ``python -m kdexp.train ... --cfg job`` prints,
and what the sweep's runs recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from conftest import ROOT, run_cli
from kdexp import api
from kdexp.core.errors import ConfigError, KdexpError
from kdexp.core.records import RECORD_NAME, read_record

SEEDS, TEMPERATURES = (1, 2), (2, 4)
COMMON = {"experiment": "digits_smoke", "student.width": 32, "kd.alpha": 0.5, "trainer.max_epochs": 3,
          "teacher.max_epochs": 2, "logger": "csv"}
GRID = {"name": "api_grid", "method": "grid", "parameters": {
    **{key: {"value": value} for key, value in COMMON.items()},
    "kd.temperature": {"values": list(TEMPERATURES)}, "seed": {"values": list(SEEDS)}}}
CE_ONLY = [f"{key}={value}" for key, value in COMMON.items() if not key.startswith("kd.")] + ["kd=none"]


def offline_env(base: Path) -> dict[str, str]:
    return {"KDEXP_CACHE_DIR": str(base / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": str(base), "WANDB_CACHE_DIR": str(base / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(base / "wandb-config")}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid, run from ``base`` (the working directory a notebook would have): 4 KD runs by
    ``api.sweep`` (a multirun in a child process), 2 CE-only runs by ``api.train`` (in this one)."""
    base = tmp_path_factory.mktemp("api")
    (base / "grid.yaml").write_text(yaml.safe_dump(GRID))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)
        for key, value in offline_env(base).items():
            patch.setenv(key, value)
        result = api.sweep(base / "grid.yaml", dir=base / "grid")
        ce = [api.train([*CE_ONLY, f"seed={seed}"], output_dir=base / "grid" / f"ce-seed{seed}") for seed in SEEDS]
    return base, result, ce


def record_files(folder: Path) -> list[dict]:
    """Every run record below ``folder``, read with json alone."""
    return [json.loads(path.read_text()) for path in sorted(folder.rglob(RECORD_NAME))]


def test_the_grid_runs_from_python_as_the_commands_run_it(grid):
    base, result, ce = grid
    assert result.code == 0 and result.ok and result.dir == base / "grid" and len(result.points) == 4
    records = record_files(base / "grid")
    assert len(records) == 6 and {r["status"] for r in records} == {"finished"}
    assert sorted(r["job_type"] for r in records) == ["baseline"] * 2 + ["distill"] * 4
    for seed, record in zip(SEEDS, ce):  # in-process runs record what `kdexp train` records
        assert record == read_record(base / "grid" / f"ce-seed{seed}")
        assert record["overrides"] == [*CE_ONLY, f"seed={seed}"] and record["choices"]["kd"] == "none"
        assert record["choices"]["data"] == "digits" and not any(k.startswith("hydra/") for k in record["choices"])
        assert (base / "grid" / f"ce-seed{seed}" / "train.log").read_text().count(" finished: test/acc ") == 1


def test_compose_gives_the_config_the_sweep_runs_recorded(grid, monkeypatch):
    """The same overrides composed in this process give each recorded config, the run's own
    folder aside (and if_finished, which is skip inside a sweep and error for one run)."""
    base, _, _ = grid
    monkeypatch.setenv("KDEXP_CACHE_DIR", str(base / "cache"))
    for record in record_files(base / "grid"):
        cfg = OmegaConf.to_container(api.compose(record["overrides"], root_dir=base), resolve=True)
        recorded = dict(record["config"])
        assert cfg["paths"]["cache_dir"] == str(base / "cache") and cfg["paths"]["root_dir"] == str(base)
        for config in (cfg, recorded):
            config["paths"].pop("output_dir"), config.pop("if_finished")
        assert cfg == recorded


def test_compose_gives_the_config_kdexp_train_prints(tmp_path):
    overrides = ["experiment=digits_smoke", "kd=dkd", "kd.beta=4", "student.width=48", "seed=7"]
    printed = run_cli([*overrides, "--cfg", "job"], tmp_path / "cache")
    assert printed.returncode == 0, printed.stderr[-2000:]
    command = yaml.safe_load(printed.stdout)
    cfg = api.compose(overrides, output_dir=tmp_path / "run", root_dir=tmp_path)
    composed = OmegaConf.to_container(cfg, resolve=False)
    assert composed.pop("choices") == {
        "experiment": "digits_smoke", "data": "digits", "teacher": "cnn2d", "student": "mlp", "kd": "dkd",
        "schedule": "none", "optimizer": "adam", "scheduler": "none", "trainer": "cpu", "logger": "wandb",
        "callbacks": "default", "paths": "default", "hydra": "default"}
    assert composed.pop("overrides") == overrides
    assert (composed.pop("task"), command.pop("task")) == ("classification", "auto")  # the record states the task
    assert composed.pop("paths")["output_dir"] == str(tmp_path / "run") and command.pop("paths")
    assert composed == command


def test_load_records_gives_one_row_per_run_as_the_record_files_say(grid):
    base, _, _ = grid
    runs = api.load_records(base / "grid")
    assert len(runs) == 6 and runs.attrs["notes"] == []
    assert runs["kind"].value_counts().to_dict() == {"distill": 4, "baseline": 2}
    for _, row in runs.iterrows():
        record = json.loads((Path(row["run"]) / RECORD_NAME).read_text())
        assert row["record"]["output_dir"] == record["output_dir"] and row["status"] == record["status"]
        assert row["test/acc"] == record["metrics"]["test/acc"] and row["seed"] == record["config"]["seed"]
        assert row["choices.kd"] == record["choices"]["kd"] and row["student.width"] == 32
        assert row["teacher_hash"] == record["teacher"]["hash"]
    distill = runs[runs["kind"] == "distill"]
    assert sorted(distill["kd.temperature"]) == [2, 2, 4, 4]


REPORTS = [
    ([], {}),
    (["--rows", "student.width", "--cols", "kd.temperature", "--paired"],
     {"rows": ["student.width"], "cols": "kd.temperature", "mode": "paired"}),
    (["--metric", "val/acc_best", "--where", "kd.temperature=4", "--delta"],
     {"metric": "val/acc_best", "where": {"kd.temperature": 4}, "mode": "delta"}),
]


@pytest.mark.parametrize("options, kwargs", REPORTS, ids=["default", "paired", "where-delta"])
def test_the_table_is_the_one_kdexp_report_prints(grid, options, kwargs):
    base, _, _ = grid
    table = api.ablation_table(api.load_records(base / "grid"), **kwargs)
    printed = run_cli(["report", str(base / "grid"), "--no-wandb", *options], base / "cache", module="kdexp.cli")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert table.markdown == printed.stdout and str(table) == printed.stdout
    assert all(f"note: {note}" in printed.stderr for note in table.notes)
    assert "CE only" in table.markdown and "teacher" in table.markdown


def test_the_table_numbers_are_the_means_of_the_record_files(grid):
    base, _, _ = grid
    records = record_files(base / "grid")
    table = api.ablation_table(api.load_records(base / "grid"))
    cells = table.frame
    assert list(cells["row_type"]) == ["teacher", "baseline", "distill", "distill"]
    for temperature in TEMPERATURES:
        accs = [r["metrics"]["test/acc"] for r in records if r["config"]["kd"].get("temperature") == temperature
                and r["job_type"] == "distill"]
        cell = cells[(cells["row_type"] == "distill") & (cells["kd.temperature"] == temperature)].iloc[0]
        assert len(accs) == cell["n"] == 2
        assert cell["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert cell["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        assert f"| 32 | {temperature} | {100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f} (n=2) |" \
            in table.markdown
    ce_accs = [r["metrics"]["test/acc"] for r in records if r["job_type"] == "baseline"]
    ce = cells[cells["row_type"] == "baseline"].iloc[0]
    assert ce["mean"] == pytest.approx(np.mean(ce_accs), abs=1e-12) and ce["n"] == 2
    teacher = cells[cells["row_type"] == "teacher"].iloc[0]
    assert teacher["mean"] == pytest.approx(records[0]["metrics"]["teacher/test_acc"], abs=1e-12)
    # a filtered frame, a list of records and a folder give the same table
    runs = api.load_records(base / "grid")
    assert api.ablation_table(list(runs["record"])).markdown == table.markdown
    assert api.ablation_table(base / "grid").markdown == table.markdown
    only_t4 = api.ablation_table(runs[runs["kd.temperature"].ne(2)]).frame
    assert list(only_t4["row_type"]) == ["teacher", "baseline", "distill"]


def test_sweep_checks_its_arguments_and_lists_without_running(grid, capsys, monkeypatch):
    base, _, _ = grid
    monkeypatch.chdir(base)
    for kwargs, message in (({"jobs": 0}, "--jobs must be >= 1"), ({"pack": 1}, "--pack must be >= 2"),
                            ({"pack": 4, "wandb": True}, "does not combine with --wandb"),
                            ({"launcher": "cloud"}, "--launcher must be one of local, slurm")):
        with pytest.raises(KdexpError, match=message):
            api.sweep(base / "grid.yaml", dir=base / "grid", **kwargs)
    with pytest.raises(TypeError, match="list of strings"):
        api.sweep(base / "grid.yaml", "seed=3")
    result = api.sweep(base / "grid.yaml", ["kd.temperature=2,4,8"], dir=base / "grid", dry_run=True)
    listing = capsys.readouterr().out
    assert result.code == 0 and len(result.points) == 6
    assert listing.count("skip (finished)") == 4 and listing.count(" run ") == 2 and listing.endswith(
        f"6 runs in {base / 'grid'}\n")
    assert record_files(base / "grid").__len__() == 6  # nothing ran


def test_bad_input_raises_what_the_command_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="Could not find 'kd/hintn'"):
        api.compose(["kd=hintn"])
    with pytest.raises(TypeError, match="list of strings"):
        api.compose("kd=none")
    with pytest.raises(ConfigError, match=r"kd.temperature=-1 is out of range"):
        api.train([*CE_ONLY[:-1], "kd.temperature=-1"], output_dir=tmp_path / "bad")
    assert read_record(tmp_path / "bad")["status"] == "failed"  # as `kdexp train` leaves it
    with pytest.raises(TypeError, match="'record' column"):
        api.ablation_table(api.load_records(tmp_path / "bad")[["run", "status"]])


def test_import_kdexp_is_light_and_kdexp_report_never_imports_torch(grid):
    base, _, _ = grid
    code = (
        "import sys, kdexp, kdexp.core.records\n"
        "heavy = ('torch', 'pytorch_lightning', 'pandas', 'hydra')\n"
        "light = [m for m in heavy if m in sys.modules]\n"
        "assert kdexp.compose is __import__('kdexp.api').api.compose and kdexp.train_run.__name__ == 'train'\n"
        "from kdexp.report.cli import main\n"
        f"code = main([{str(base / 'grid')!r}, '--no-wandb'])\n"
        "print(light, code, [m for m in ('torch', 'pytorch_lightning') if m in sys.modules], sorted(kdexp.__all__))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **offline_env(base)}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "[] 0 [] ['__version__', 'ablation_table', 'compose', 'load_records', 'sweep', 'train_run']")
