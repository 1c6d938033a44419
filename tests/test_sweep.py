"""Sweeps through the real CLI: a Hydra multirun per sweep file, resume, failures, one teacher."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, load_record, path_with_fake_srun, records_in, run_cli
from kdexp.core.errors import ConfigError
from kdexp.grid.sweep import grid, load_sweep
from kdexp.grid.wandb_sweep import wandb_sweep_config

SMOKE = ROOT / "sweeps" / "smoke.yaml"
FAST = ["logger=csv"]  # W&B is exercised by the CLI tests; CSV keeps the grid quick


def sweep_cli(args: list[str], cache: Path, **kw):
    return run_cli(["sweep", *args], cache, module="kdexp.cli", **kw)


def wandb_grid(config: dict) -> set[tuple[str, ...]]:
    """How a W&B grid search expands ``parameters``, written out independently of kdexp."""
    params = config["parameters"]
    keys = list(params)
    values = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    return {tuple(sorted(f"{k}={v}" for k, v in zip(keys, combo))) for combo in itertools.product(*values)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke grid (16 runs) with two parallel workers and a fresh teacher cache; ``srun`` is on
    PATH, as on a SLURM login node."""
    base = tmp_path_factory.mktemp("sweep")
    proc = sweep_cli([str(SMOKE), *FAST, "--jobs", "2", "--dir", str(base / "smoke")], base / "cache",
                     extra_env={"PATH": path_with_fake_srun(base / "bin")})
    return base, proc


def test_a_parallel_sweep_console_shows_no_launcher_or_slurm_noise(smoke):
    """Neither joblib's Joblib.Parallel(...) settings line nor Lightning's srun hint (from the workers)."""
    _, proc = smoke
    out = proc.stdout + proc.stderr
    assert "finished: test/acc" in out  # the workers' lines do reach this console
    assert "Joblib.Parallel(" not in out and "`srun` command is available" not in out


def test_local_sweep_runs_the_whole_grid(smoke):
    base, proc = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16 runs — 16 finished, 0 skipped (already finished), 0 failed, 0 missing" in proc.stdout
    records = records_in(base / "smoke")
    assert len(records) == 16 and all(r["status"] == "finished" for r in records)
    assert {r["config"]["group"] for r in records} == {"smoke"}


def test_a_packed_sweep_is_invisible_in_its_records_and_its_report(smoke, tmp_path):
    """The smoke grid again with --pack 8: same runs, same folders, same numbers, the same report."""
    base, _ = smoke
    proc = sweep_cli([str(SMOKE), *FAST, "--pack", "8", "--jobs", "2", "--dir", str(base / "packed")], base / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--pack 8: 16 run(s) in 4 pack(s), 0 alone" in proc.stdout  # per width 8 points, split over 2 workers
    assert "16 runs — 16 finished, 0 skipped (already finished), 0 failed, 0 missing" in proc.stdout
    alone = {p.parent.name: load_record(p.parent) for p in (base / "smoke").glob("*/run_record.json")}
    packed = {p.parent.name: load_record(p.parent) for p in (base / "packed").glob("*/run_record.json")}
    assert set(packed) == set(alone) and len(packed) == 16  # the same folder names
    for name, record in packed.items():
        assert record["packed"]["size"] == 4 and record["run_name"] == alone[name]["run_name"]
        assert record["overrides"] == alone[name]["overrides"]
        for key, value in alone[name]["metrics"].items():
            tolerance = {"abs": 1e-9} if "acc" in key or "agreement" in key else {"rel": 2e-4, "abs": 1e-6}
            assert record["metrics"][key] == pytest.approx(value, **tolerance), (name, key)
    reports = []
    for folder in ("smoke", "packed"):
        out = run_cli(["report", str(base / folder), "--csv", str(tmp_path / f"{folder}.csv")], base / "cache",
                      module="kdexp.cli")
        assert out.returncode == 0, out.stderr[-2000:]
        reports.append((out.stdout, (tmp_path / f"{folder}.csv").read_text()))
    assert reports[0] == reports[1] and "± " in reports[0][0]
    again = sweep_cli([str(SMOKE), *FAST, "--pack", "8", "--dir", str(base / "packed")], base / "cache")
    assert "16 runs — 0 finished, 16 skipped (already finished)" in again.stdout  # nothing trained twice


def test_wandb_sweep_and_local_sweep_expand_to_the_same_runs(smoke):
    base, _ = smoke
    spec = load_sweep(SMOKE)
    ran = {tuple(sorted(r["overrides"])) for r in records_in(base / "smoke")}
    sent_to_wandb = wandb_grid(wandb_sweep_config(spec, FAST))
    assert ran == sent_to_wandb == set(grid(spec, FAST))
    assert len(ran) == 16
    assert yaml.safe_load(SMOKE.read_text())["command"][-1] == "${args_no_hyphens}"


def test_parallel_workers_train_the_teacher_once(smoke):
    base, proc = smoke
    sources = [r["teacher"]["source"] for r in records_in(base / "smoke")]
    assert sources.count("trained") == 1 and sources.count("cache") == 15
    assert len(list((base / "cache" / "teachers").iterdir())) == 1
    assert len({r["teacher"]["hash"] for r in records_in(base / "smoke")}) == 1


def test_rerun_skips_finished_runs_and_force_archives_then_reruns(smoke):
    base, _ = smoke
    folder = base / "smoke"
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/run_record.json")}
    dry = sweep_cli([str(SMOKE), *FAST, "--dir", str(folder), "--dry-run"], base / "cache")
    assert dry.stdout.count("skip (finished)") == 16
    again = sweep_cli([str(SMOKE), *FAST, "--dir", str(folder)], base / "cache")
    assert again.returncode == 0 and "0 finished, 16 skipped" in again.stdout
    assert "every run is already finished: nothing to run" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/run_record.json")} == before

    one_point = ["kd.temperature=2", "kd.alpha=0.5", "student.width=16", "seed=1"]
    forced = sweep_cli([str(SMOKE), *FAST, *one_point, "--dir", str(folder), "--force"], base / "cache")
    assert forced.returncode == 0 and "1 runs — 1 finished, 0 skipped" in forced.stdout
    changed = [p for p in folder.glob("*/run_record.json") if p.stat().st_mtime_ns != before[p]]
    assert len(changed) == 1
    archived = list(changed[0].parent.glob("archive/*/run_record.json"))
    assert len(archived) == 1 and load_record(archived[0].parent)["status"] == "finished"
    assert list(changed[0].parent.glob("archive/*/checkpoints/best.ckpt"))


def test_a_run_that_fails_fails_alone_and_the_grid_finishes(smoke, tmp_path):
    """A NaN in one grid point: recorded as failed, the other point finishes."""
    base, _ = smoke
    proc = sweep_cli([str(SMOKE), *FAST, "kd._target_=kdexp_test_plugins.ExplodingKD", "+kd.explode_after=3,100000",
                      "kd.temperature=2", "kd.alpha=0.5", "student.width=16", "seed=1",
                      "--dir", str(tmp_path / "bad")], base / "cache")
    assert proc.returncode == 1
    assert "2 runs — 1 finished, 0 skipped (already finished), 1 failed" in proc.stdout
    assert "NonFiniteLossError: training loss became nan at global step 3" in proc.stdout
    statuses = sorted((r["config"]["kd"]["explode_after"], r["status"]) for r in records_in(tmp_path / "bad"))
    assert statuses == [(3, "failed"), (100000, "finished")]


def test_every_grid_point_is_checked_before_anything_runs(tmp_path):
    proc = sweep_cli([str(SMOKE), *FAST, "kd=none,hinton,hintn", "kd.temperature=-1,2", "--dir", str(tmp_path / "s")],
                     tmp_path / "cache")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot start; nothing was run" in proc.stderr
    assert "kd.temperature=-1 is out of range" in proc.stderr and "Could not find 'kd/hintn'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("text, fragment", [
    ("method: grid\nparameters:\n  seed: {values: [1, 2]\n", "not valid YAML at line 4, column 1"),
    ("method: bayes\nparameters:\n  seed: {values: [1, 2]}\n", "method: bayes needs run_cap"),
    ("method: random\nparameters:\n  seed: {values: [1, 2]}\n", "method: random needs run_cap"),
    ("method: hyperband\nparameters:\n  seed: {values: [1, 2]}\n", "method must be grid, random or bayes"),
    ("- a list\n", "a sweep file is a mapping"),
])
def test_sweep_file_problems_are_one_paragraph(tmp_path, text, fragment):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("(", "\\(")):
        load_sweep(path)
    proc = sweep_cli([str(path), "--dry-run"], tmp_path / "cache")
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr


def test_random_method_samples_run_cap_points_reproducibly(tmp_path):
    path = tmp_path / "random.yaml"
    path.write_text(SMOKE.read_text().replace("method: grid", "method: random\nrun_cap: 5"))
    spec = load_sweep(path)
    first, again, other = grid(spec), grid(spec), grid(spec, sample_seed=1)
    assert len(first) == 5 == len(set(first)) and set(first) <= set(grid(load_sweep(SMOKE)))
    assert first == again and first != other


def test_wandb_sweep_needs_the_server(tmp_path):
    proc = sweep_cli([str(SMOKE), "--wandb"], tmp_path / "cache", extra_env={"WANDB_MODE": "offline"})
    assert proc.returncode == 2 and "--wandb needs the W&B server, but W&B is offline" in proc.stderr


def test_sweep_file_errors_are_explained(tmp_path):
    bad = tmp_path / "random.yaml"
    bad.write_text("method: random\nparameters:\n  kd.temperature: {min: 1, max: 10}\n")
    with pytest.raises(ConfigError, match="distributions .* only work as W&B sweeps"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")


def test_shipped_sweeps_parse_and_have_the_documented_size():
    sizes = {p.stem: len(grid(load_sweep(p))) for p in (ROOT / "sweeps").glob("*.yaml")
             if load_sweep(p).method != "bayes"}  # a search has no grid (tests/test_search.py)
    assert sizes == {"hinton_grid": 120, "ce_baseline": 20, "smoke": 16, "smoke_baseline": 4, "objectives_mnist1d": 27,
                     "linear_student": 12, "chain_mnist1d": 6, "transfer_mnist1d": 12, "lm_stdlib": 3,
                     "topics_stdlib": 6}


def test_a_parallel_sweep_run_equals_the_same_run_alone(smoke, tmp_path):
    """Runs pin torch to num_threads, so the worker count never changes a result."""
    base, _ = smoke
    in_sweep = records_in(base / "smoke")[0]
    proc = run_cli([*in_sweep["overrides"], f"hydra.run.dir={tmp_path / 'alone'}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = load_record(tmp_path / "alone")
    keys = ("test/acc", "test/acc_last", "train/loss", "val/acc_best", "test/agreement")
    assert {k: alone["metrics"][k] for k in keys} == {k: in_sweep["metrics"][k] for k in keys}


def test_report_of_a_real_sweep_matches_its_records(smoke, tmp_path):
    """Sweep → report through the CLI; every number checked against the records themselves."""
    import numpy as np
    import pandas as pd

    base, _ = smoke
    baseline = sweep_cli([str(ROOT / "sweeps" / "smoke_baseline.yaml"), *FAST, "--dir", str(base / "ce")],
                         base / "cache")
    assert baseline.returncode == 0, baseline.stderr[-2000:]
    out = tmp_path / "out"
    proc = run_cli(["report", str(base / "smoke"), str(base / "ce"), "--latex", str(out / "t.tex"),
                    "--csv", str(out / "cells.csv"), "--plots", str(out / "plots")], base / "cache",
                   module="kdexp.cli")
    assert proc.returncode == 0, proc.stderr[-2000:]

    # Independent computation from the run records.
    rows = []
    for folder in ("smoke", "ce"):
        for r in records_in(base / folder):
            kd = r["config"]["kd"]
            rows.append({"width": r["config"]["student"]["width"], "T": kd.get("temperature"),
                         "alpha": kd.get("alpha"), "acc": r["metrics"]["test/acc"], "job": r["job_type"]})
    runs = pd.DataFrame(rows)
    cells = pd.read_csv(out / "cells.csv")
    distill = cells[cells["row_type"] == "distill"]
    assert len(distill) == 8 and (distill["n"] == 2).all()
    for _, cell in distill.iterrows():
        accs = runs[(runs.job == "distill") & (runs.width == cell["student.width"]) & (runs["T"] == cell["kd.temperature"])
                    & (runs.alpha == cell["kd.alpha"])]["acc"].to_numpy()
        assert cell["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
        assert cell["std"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
        assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f} (n=2)" in proc.stdout
    ce = cells[cells["row_type"] == "baseline"]
    for _, cell in ce.iterrows():
        accs = runs[(runs.job == "baseline") & (runs.width == cell["student.width"])]["acc"].to_numpy()
        assert cell["mean"] == pytest.approx(np.mean(accs), abs=1e-12) and cell["n"] == 2
    assert len(ce) == 2 and "CE only" in proc.stdout and "teacher" in proc.stdout

    latex = (out / "t.tex").read_text()
    assert "\\begin{tabular}" in latex and "\\end{tabular}" in latex and "\\toprule" in latex
    first = distill.iloc[0]
    assert f"{100 * first['mean']:.2f}" in latex
    pngs = sorted((out / "plots").rglob("*.png"))
    assert len(pngs) == 3  # a T × α heatmap per width, accuracy vs width
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).ndim == 3


def test_hydra_settings_on_the_command_line_do_not_change_the_grid():
    spec = load_sweep(SMOKE)
    assert grid(spec, ["hydra.launcher.partition=gpu"]) == grid(spec)
    assert len(grid(spec, ["seed=1", "student.width=16,32,64"])) == 2 * 2 * 3


def test_an_unreadable_record_is_named_and_its_run_redone(smoke, tmp_path):
    import shutil

    base, _ = smoke
    folder = tmp_path / "smoke"
    shutil.copytree(base / "smoke", folder)
    broken = sorted(folder.glob("*/run_record.json"))[0]
    broken.write_text('{"status": "finish')  # cut short
    proc = sweep_cli([str(SMOKE), *FAST, "--dir", str(folder)], base / "cache")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert f"unreadable record {broken}" in proc.stdout
    assert "16 runs — 1 finished, 15 skipped" in proc.stdout
    assert load_record(broken.parent)["status"] == "finished"
    assert list(broken.parent.glob("archive/unreadable-*/run_record.json"))
