"""`kdexp report`: records with known accuracies in, table numbers checked against numpy/scipy.

The records are written in the real layout (a sweep folder of job folders, each with
a run_record.json, plus a teacher record in a cache folder) with the same keys as a
run of kdexp.train writes. Grid: widths 128/512 × T 4/8 × α 0.5/0.9 × seeds 1–3 of
Hinton KD, CE-only baselines per width × seeds 1–3, one failed KD run (which even
carries a bogus test/acc of 0, to prove failures are never averaged) and one
missing cell (width 512, T 8, α 0.5).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kdexp.core.records import write_record
from kdexp.report import ReportError, ReportSpec, make_tables, records_from_wandb_runs
from kdexp.report.chain import render_chain
from kdexp.report.cli import main
from kdexp.report.formats import tidy_frame
from kdexp.report.sources import load_sources

WIDTHS, TEMPS, ALPHAS, SEEDS = (128, 512), (4.0, 8.0), (0.5, 0.9), (1, 2, 3)
MISSING = (512, 8.0, 0.5)
FAILED = (128, 4.0, 0.9, 4)  # width, T, alpha, seed
TEACHER_ACC, TEACHER_HASH, FINGERPRINT = 0.911, "cc05b1969e72a5d2", "abe0f5051f85e4c6"


def accuracy(width: int, seed: int, temperature: float | None = None, alpha: float | None = None) -> float:
    """Known, distinct values: a base per width, a KD gain per (T, α), and seed noise."""
    base = {128: 0.62, 512: 0.67}[width]
    noise = {1: 0.004, 2: -0.007, 3: 0.002, 4: 0.001, 5: -0.003}[seed] * (1 + width / 512)
    if temperature is None:
        return round(base + noise, 6)
    gain = 0.01 * temperature / 4 + (0.012 if alpha == 0.9 else 0.003) - 0.002 * (width == 512) * temperature / 4
    # so that KD − CE differs from seed to seed (a paired t needs a non-zero std)
    wobble = {1: 0.001, 2: 0.003, 3: -0.002, 4: 0.0, 5: 0.002}[seed] * (1 if alpha == 0.5 else -1)
    return round(base + gain + noise * (1.5 if temperature == 8 else 0.5) + wobble, 6)


def kd_values(width: int, temperature: float, alpha: float) -> np.ndarray:
    return np.array([accuracy(width, s, temperature, alpha) for s in SEEDS])


def ce_values(width: int) -> np.ndarray:
    return np.array([accuracy(width, s) for s in SEEDS])


def make_record(folder: Path, *, width: int, seed: int, temperature: float | None = None, alpha: float | None = None,
                status: str = "finished", max_epochs: int = 100, acc: float | None = None) -> dict:
    """A record shaped like the ones kdexp.run.engine writes (see outputs/*/run_record.json)."""
    kd_name = "none" if temperature is None else "hinton"
    kd = ({"_target_": "kdexp.objectives.CrossEntropyOnly", "label_smoothing": 0.0} if temperature is None
          else {"_target_": "kdexp.objectives.HintonKD", "temperature": temperature, "alpha": alpha})
    choices = {"callbacks": "default", "data": "mnist1d", "hydra": "default", "kd": kd_name, "logger": "wandb",
               "optimizer": "adam", "paths": "default", "scheduler": "none", "student": "mlp", "teacher": "cnn1d",
               "trainer": "cpu"}
    overrides = [f"kd={kd_name}", f"student.width={width}", f"seed={seed}", f"trainer.max_epochs={max_epochs}"]
    if temperature is not None:
        overrides += [f"kd.temperature={temperature}", f"kd.alpha={alpha}"]
    config = {
        "callbacks": {"model_checkpoint": {"_target_": "pytorch_lightning.callbacks.ModelCheckpoint",
                                           "monitor": "val/acc", "mode": "max", "save_last": True}},
        "choices": choices,
        "data": {"_target_": "kdexp.data.MNIST1DDataModule", "batch_size": 100, "cache_dir": f"{folder}/cache/data",
                 "eval_batch_size": 1000, "generator_seed": 42, "input_shape": [40], "num_classes": 10,
                 "shuffle_seed": seed, "split_seed": 0, "val_fraction": 0.1},
        "group": None, "if_finished": "error", "kd": kd,
        "logger": {"_partial_": True, "_target_": "kdexp.core.tracking.wandb_logger", "mode": "auto", "project": "kdexp"},
        "optimizer": {"_partial_": True, "_target_": "torch.optim.Adam", "lr": 0.003, "weight_decay": 0.0},
        "overrides": overrides,
        "paths": {"cache_dir": f"{folder}/cache", "output_dir": str(folder), "root_dir": str(folder.parent)},
        "scheduler": {}, "seed": seed,
        "student": {"_target_": "kdexp.models.MLP", "depth": 2, "in_shape": [40], "num_classes": 10, "width": width},
        "tags": [],
        "teacher": {"checkpoint": None, "max_epochs": 160, "seed": 0,
                    "model": {"_target_": "kdexp.models.CNN1D", "in_shape": [40], "num_classes": 10, "width": 25}},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "deterministic": True,
                    "enable_progress_bar": False, "enable_model_summary": False, "max_epochs": max_epochs},
    }
    value = accuracy(width, seed, temperature, alpha) if acc is None else acc
    record = {
        "schema": 1, "status": status, "config": config, "choices": choices, "overrides": overrides, "seed": seed,
        "job_type": "baseline" if temperature is None else "distill",
        "metrics": {"test/acc": value, "test/acc_last": value - 0.01, "val/acc_best": value + 0.005,
                    "test/agreement": value + 0.02, "test/ece": 0.2, "teacher/test_acc": TEACHER_ACC,
                    "val/acc_init": 0.1},
        "teacher": {"hash": TEACHER_HASH, "test_acc": TEACHER_ACC, "source": "cache"},
        "data_fingerprint": FINGERPRINT, "output_dir": str(folder), "run_name": folder.name,
        "started_at": "2026-11-23T09:00:00+0000", "wall_time_s": 1.0, "git_commit": "abc123", "versions": {},
    }
    if status == "failed":  # a run that failed in training: no job type yet, an error, partial metrics
        del record["job_type"]
        record["error"] = {"type": "NonFiniteLossError", "message": "loss became nan at step 12"}
    write_record(folder, record)
    return record


def write_grid(root: Path, *, max_epochs: int = 100) -> list[dict]:
    """The sweep: KD grid + baselines + one failed run + a teacher record; returns the student records."""
    records, job = [], 0

    def folder() -> Path:
        nonlocal job
        job += 1
        return root / str(job - 1)

    for width in WIDTHS:
        for temperature in TEMPS:
            for alpha in ALPHAS:
                if (width, temperature, alpha) == MISSING:
                    continue
                for seed in SEEDS:
                    records.append(make_record(folder(), width=width, seed=seed, temperature=temperature,
                                               alpha=alpha, max_epochs=max_epochs))
        for seed in SEEDS:
            records.append(make_record(folder(), width=width, seed=seed, max_epochs=max_epochs))
    width, temperature, alpha, seed = FAILED
    records.append(make_record(folder(), width=width, seed=seed, temperature=temperature, alpha=alpha,
                               status="failed", acc=0.0, max_epochs=max_epochs))
    write_record(root / "cache" / "teachers" / "63d2c94f", {  # the teacher cache's own record: not a student
        "job_type": "teacher", "status": "finished", "config": {"max_epochs": 160}, "choices": {},
        "metrics": {"test/acc": TEACHER_ACC}, "data_fingerprint": FINGERPRINT})
    return records


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "sweeps" / "hinton_grid"
    write_grid(root)
    return root


def run_report(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def md_rows(text: str) -> tuple[list[str], dict[tuple[str, ...], list[str]]]:
    """The first markdown table in ``text``: header, and rows keyed by their label cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    header, body = split[0], split[2:]
    n_labels = sum(1 for h in header if "=" not in h and "/" not in h)  # value columns: "kd.alpha=0.5" or "test/acc"
    return header, {tuple(row[:n_labels]): row[n_labels:] for row in body}


def fmt(values: np.ndarray, *, failed: int = 0) -> str:
    """What a raw cell must read, computed here from the written values."""
    mean, std = np.mean(values) * 100, np.std(values, ddof=1) * 100
    tag = f", +{failed} failed" if failed else ""
    return f"{mean:.2f} ± {std:.2f} (n={len(values)}{tag})"


def label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# -- the table ---------------------------------------------------------------------
def test_cells_are_mean_and_sample_std_over_seeds(sweep, capsys):
    code, out, _ = run_report([sweep], capsys)
    assert code == 0
    header, rows = md_rows(out)
    assert header == ["student.width", "kd.temperature", "kd.alpha=0.5", "kd.alpha=0.9"]
    for width in WIDTHS:
        for temperature in TEMPS:
            texts = rows[(str(width), label(temperature))]
            for alpha, text in zip(ALPHAS, texts):
                if (width, temperature, alpha) == MISSING:
                    assert text == "—"
                    continue
                failed = int((width, temperature, alpha) == FAILED[:3])
                assert text.strip("*") == fmt(kd_values(width, temperature, alpha), failed=failed)
    assert "test/acc" in out and "sample std" in out and "ddof=1" in out  # the legend says what ± and n are


def test_cell_statistics_match_numpy(sweep):
    records, _ = load_sources([str(sweep)])
    [table], _ = make_tables(records)
    kd = table.cells[table.cells["_kind"].eq("distill")]
    assert len(kd) == len(WIDTHS) * len(TEMPS) * len(ALPHAS)
    missing = kd[kd["n"].eq(0)]
    assert list(zip(missing["student.width"], missing["kd.temperature"], missing["kd.alpha"])) == [MISSING]
    assert missing["mean"].isna().all() and missing["n_failed"].eq(0).all()
    for _, cell in kd[kd["n"].gt(0)].iterrows():
        values = kd_values(int(cell["student.width"]), cell["kd.temperature"], cell["kd.alpha"])
        assert cell["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert cell["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert cell["n"] == 3
        is_failed_cell = (cell["student.width"], cell["kd.temperature"], cell["kd.alpha"]) == FAILED[:3]
        assert cell["n_failed"] == int(is_failed_cell)


def test_best_cell_of_each_row_is_bold(sweep, capsys):
    _, out, _ = run_report([sweep], capsys)
    _, rows = md_rows(out)
    for width in WIDTHS:
        for temperature in TEMPS:
            means = {a: kd_values(width, temperature, a).mean() for a in ALPHAS if (width, temperature, a) != MISSING}
            texts = dict(zip(ALPHAS, rows[(str(width), label(temperature))]))
            best = max(means, key=means.get)
            for alpha in means:
                bold = texts[alpha].startswith("**") and texts[alpha].endswith("**")
                assert bold == (alpha == best and len(means) > 1), (width, temperature, alpha, texts)


def test_reference_rows_ce_per_width_and_teacher(sweep, capsys):
    _, out, _ = run_report([sweep], capsys)
    _, rows = md_rows(out)
    for width in WIDTHS:
        ce = rows[(str(width), "CE only")]
        assert ce == [fmt(ce_values(width))] * len(ALPHAS)  # one value for the whole row, under every column
    teacher = rows[("teacher", "")]
    assert teacher == [f"{TEACHER_ACC * 100:.2f} (n=1)"] * len(ALPHAS)  # one teacher, counted once
    assert "repeats its one value in each column" in out
    order = list(rows)
    assert order[0] == ("teacher", "")
    assert order.index(("128", "CE only")) < order.index(("128", "4")) < order.index(("512", "CE only"))


def test_failed_runs_are_counted_and_never_averaged(sweep, capsys):
    _, out, _ = run_report([sweep], capsys)
    _, rows = md_rows(out)
    width, temperature, alpha, seed = FAILED
    text = rows[(str(width), label(temperature))][ALPHAS.index(alpha)]
    assert "+1 failed" in text and "(n=3" in text
    assert f"{kd_values(width, temperature, alpha).mean() * 100:.2f}" in text  # the bogus 0.0 is left out
    note = next(line for line in out.splitlines() if "failed" in line and line.startswith("- "))
    assert "1 run failed" in note and "NonFiniteLossError" in note and f"seed {seed}" in note
    assert f"student.width={width}, kd.temperature={label(temperature)}, kd.alpha={alpha}" in note


def kd_cells_with(sweep, flag: str, capsys, tmp_path) -> tuple[dict, pd.DataFrame]:
    """Run the report with ``flag`` and a CSV: (markdown rows, the KD cells of the CSV)."""
    csv = tmp_path / "cells.csv"
    code, out, _ = run_report([sweep, flag, "--csv", csv], capsys)
    assert code == 0
    _, rows = md_rows(out)
    frame = pd.read_csv(csv)
    return rows, frame[frame["row_type"].eq("distill")].dropna(subset=["mean"])


def test_delta_is_kd_minus_ce_of_the_same_width(sweep, capsys, tmp_path):
    rows, kd = kd_cells_with(sweep, "--delta", capsys, tmp_path)
    for _, cell in kd.iterrows():
        width = int(cell["student.width"])
        values, base = kd_values(width, cell["kd.temperature"], cell["kd.alpha"]), ce_values(width)
        delta = values.mean() - base.mean()
        se = np.sqrt(values.var(ddof=1) / 3 + base.var(ddof=1) / 3)
        assert cell["delta"] == pytest.approx(delta, abs=1e-12)
        assert cell["delta_se"] == pytest.approx(se, abs=1e-12)
        text = rows[(str(width), label(cell["kd.temperature"]))][ALPHAS.index(cell["kd.alpha"])].strip("*")
        assert text.startswith(f"{delta * 100:+.2f} ± {se * 100:.2f} (n=3 vs 3")
    assert rows[("128", "CE only")][0] == fmt(ce_values(128))  # the reference row stays raw


def test_paired_gain_matches_scipy_ttest_rel(sweep, capsys, tmp_path):
    rows, kd = kd_cells_with(sweep, "--paired", capsys, tmp_path)
    assert len(kd) == 7
    for _, cell in kd.iterrows():
        width = int(cell["student.width"])
        values, base = kd_values(width, cell["kd.temperature"], cell["kd.alpha"]), ce_values(width)
        diffs = values - base
        expected = stats.ttest_rel(values, base)
        low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
        assert cell["paired_n"] == 3
        assert cell["paired_mean"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert cell["paired_std"] == pytest.approx(diffs.std(ddof=1), abs=1e-12)
        assert cell["paired_t"] == pytest.approx(expected.statistic, rel=1e-9)
        assert cell["paired_p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert (cell["paired_ci_low"], cell["paired_ci_high"]) == pytest.approx((low, high), rel=1e-9)
        text = rows[(str(width), label(cell["kd.temperature"]))][ALPHAS.index(cell["kd.alpha"])].strip("*")
        assert text.startswith(f"{diffs.mean() * 100:+.2f} ± {diffs.std(ddof=1) * 100:.2f} (n=3, "
                               f"t={expected.statistic:.2f}, 95% CI [{low * 100:+.2f}, {high * 100:+.2f}]")


def test_paired_uses_only_seeds_present_in_both(tmp_path, capsys):
    root = tmp_path / "sweep"
    for job, seed in enumerate((1, 2, 3)):
        make_record(root / f"kd{job}", width=128, seed=seed, temperature=8.0, alpha=0.9)
    for job, seed in enumerate((2, 3, 5)):
        make_record(root / f"ce{job}", width=128, seed=seed)
    [table], _ = make_tables(load_sources([str(root)])[0], ReportSpec(mode="paired"))
    cell = table.cells[table.cells["_kind"].eq("distill")].iloc[0]
    kd = np.array([accuracy(128, s, 8.0, 0.9) for s in (2, 3)])
    ce = np.array([accuracy(128, s) for s in (2, 3)])
    assert cell["paired_n"] == 2 and cell["n"] == 3
    assert cell["paired_t"] == pytest.approx(stats.ttest_rel(kd, ce).statistic, rel=1e-9)


# -- what may be averaged ---------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epoch_budgets(tmp_path_factory, sweep) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(sweep, root / "long")
    write_grid(root / "short", max_epochs=5)
    # failed before the teacher was loaded: no teacher hash, no data fingerprint; belongs with the 5-epoch runs
    record = make_record(root / "short" / "early", width=512, seed=5, temperature=8.0, alpha=0.9, status="failed",
                         max_epochs=5)
    del record["teacher"], record["data_fingerprint"]
    write_record(root / "short" / "early", record)
    return root


def test_mixed_max_epochs_are_refused_naming_the_key(two_epoch_budgets, capsys):
    code, out, err = run_report([two_epoch_budgets], capsys)
    assert code == 2 and out == ""
    assert err.startswith("kdexp report: error:")
    assert "trainer.max_epochs: 100 (" in err and "5 (" in err
    assert "--split" in err and "--where trainer.max_epochs=" in err
    assert "shuffle_seed" not in err and "paths" not in err and "overrides" not in err  # bookkeeping is ignored


def test_split_gives_one_table_per_max_epochs(two_epoch_budgets, capsys):
    code, out, _ = run_report([two_epoch_budgets, "--split"], capsys)
    assert code == 0
    headings = [line for line in out.splitlines() if line.startswith("### ")]
    assert sorted(h.split(" · ")[0] for h in headings) == ["### trainer.max_epochs=100", "### trainer.max_epochs=5"]
    assert all(h.endswith(" · mean over seeds, higher is better") for h in headings)
    for section in out.split("### ")[1:]:
        _, rows = md_rows(section)
        assert rows[("128", "4")][0].strip("*") == fmt(kd_values(128, 4.0, 0.5))  # same values, not pooled (n=3)
        early_failure = int(section.startswith("trainer.max_epochs=5"))  # the run with an unknown teacher
        assert rows[("512", "8")][1].strip("*") == fmt(kd_values(512, 8.0, 0.9), failed=early_failure)


def test_choice_axis_does_not_average_over_its_settings(sweep, capsys):
    code, _, err = run_report([sweep, "--rows", "student.width", "--cols", "kd"], capsys)
    assert code == 2 and "kd.temperature among KD runs with the same kd: 4 (" in err and "kd.alpha" in err
    code, out, _ = run_report([sweep, "--rows", "student.width", "--cols", "kd", "--where", "kd.temperature=8",
                               "--where", "kd.alpha=0.9"], capsys)
    assert code == 0
    header, rows = md_rows(out)
    assert header == ["student.width", "kd=hinton", "kd=none"]
    kd, ce = kd_values(512, 8.0, 0.9), ce_values(512)
    assert kd.mean() > ce.mean()
    assert rows[("512",)] == [f"**{fmt(kd)}**", fmt(ce)]  # CE-only shares the row and competes for best


def test_where_filters_and_keeps_the_baseline(two_epoch_budgets, capsys):
    code, out, _ = run_report([two_epoch_budgets, "--where", "trainer.max_epochs=100", "--where", "kd.alpha=0.9",
                               "--where", "student.width=128"], capsys)
    assert code == 0
    header, rows = md_rows(out)
    assert header[2:] == ["kd.alpha=0.9"]
    assert set(rows) == {("teacher", ""), ("128", "CE only"), ("128", "4"), ("128", "8")}
    assert rows[("128", "CE only")][0] == fmt(ce_values(128))
    assert rows[("128", "8")][0] == fmt(kd_values(128, 8.0, 0.9))


def test_baselines_alone_make_a_table(tmp_path, capsys):
    for job, (width, seed) in enumerate((w, s) for w in WIDTHS for s in SEEDS):
        make_record(tmp_path / "ce" / str(job), width=width, seed=seed)
    code, out, err = run_report([tmp_path / "ce", "--paired"], capsys)
    assert code == 0 and "default axes kd.temperature, kd.alpha are in no record" in err
    header, rows = md_rows(out)
    assert header == ["student.width", "test/acc"]
    assert rows[("128 (CE only)",)] == [fmt(ce_values(128))] and rows[("512 (CE only)",)] == [fmt(ce_values(512))]


def test_duplicate_run_is_not_counted_twice(tmp_path, sweep, capsys):
    root = tmp_path / "outputs"
    shutil.copytree(sweep, root / "sweep")
    shutil.copytree(sweep / "0", root / "demo" / "0")  # the same run (settings and seed) found twice
    _, out, _ = run_report([root], capsys)
    _, rows = md_rows(out)
    assert rows[("128", "4")][0].strip("*") == fmt(kd_values(128, 4.0, 0.5))
    assert "1 duplicate run(s)" in out


# -- output formats ------------------------------------------------------------------
def test_latex_has_a_booktabs_tabular_with_the_numbers(sweep, capsys, tmp_path):
    path = tmp_path / "tex" / "table.tex"
    code, _, _ = run_report([sweep, "--latex", path], capsys)
    assert code == 0
    tex = path.read_text()
    assert r"\begin{tabular}{llrr}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    values = kd_values(128, 8.0, 0.9)
    best = f"{values.mean() * 100:.2f} $\\pm$ {values.std(ddof=1) * 100:.2f} (n=3)"
    assert "128 & 8 & " in tex and rf"\textbf{{{best}}}" in tex
    ce = ce_values(512)
    assert rf"\multicolumn{{2}}{{c}}{{{ce.mean() * 100:.2f} $\pm$ {ce.std(ddof=1) * 100:.2f} (n=3)}}" in tex
    assert "512 & 8 & --- &" in tex  # the missing cell


def test_csv_to_stdout_is_tidy_and_equals_the_records(sweep, capsys):
    code, out, err = run_report([sweep, "--csv", "-"], capsys)
    assert code == 0 and "| student.width" in err  # the markdown moves to stderr
    frame = pd.read_csv(pd.io.common.StringIO(out))
    assert {"row_type", "metric", "student.width", "kd.temperature", "kd.alpha", "mean", "std", "n", "n_failed",
            "best"} <= set(frame.columns)
    assert "delta" not in frame.columns and "paired_t" not in frame.columns
    assert frame["best"].dtype == bool
    kd = frame[frame["row_type"].eq("distill")]
    assert len(kd) == 8  # one line per cell, the missing one included (n=0)
    for _, cell in kd.iterrows():
        key = (int(cell["student.width"]), cell["kd.temperature"], cell["kd.alpha"])
        if key == MISSING:
            assert cell["n"] == 0 and np.isnan(cell["mean"])
            continue
        values = kd_values(*key)
        assert cell["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert cell["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        assert cell["n"] == 3 and cell["n_failed"] == int(key == FAILED[:3])
    ce = frame[frame["row_type"].eq("baseline")].set_index("student.width")
    assert ce.loc[512, "mean"] == pytest.approx(ce_values(512).mean(), abs=1e-12)
    assert np.isnan(ce.loc[512, "kd.alpha"])
    assert frame.loc[frame["row_type"].eq("teacher"), "mean"].tolist() == pytest.approx([TEACHER_ACC])


def test_other_metric_and_plots(sweep, capsys, tmp_path):
    out_dir = tmp_path / "figs"
    code, out, err = run_report([sweep, "--metric", "test/acc_last", "--plots", out_dir], capsys)
    assert code == 0
    _, rows = md_rows(out)
    assert rows[("512", "4")][1].strip("*") == fmt(kd_values(512, 4.0, 0.9) - 0.01)
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["heatmap_test_acc_last_width128.png", "heatmap_test_acc_last_width512.png",
                     "width_test_acc_last.png"]
    import matplotlib.image

    for name in names:
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        image = matplotlib.image.imread(out_dir / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert "not uploaded" in err and str(out_dir) in err  # W&B offline in tests: it says where the files are


def test_report_is_logged_to_wandb_when_online(sweep, capsys, tmp_path, monkeypatch):
    import sys

    from kdexp.report import publish

    logged, inits = {}, []

    class FakeRun:
        url = "https://wandb.example/run"

        def log(self, data):
            logged.update(data)

        def finish(self):
            logged["_finished"] = True

    fake = SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun(), Image=lambda p: ("image", p),
                           Table=lambda dataframe: ("table", dataframe), Html=lambda h: ("html", h),
                           Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(publish, "resolve_wandb_mode", lambda requested="auto": ("online", "test"))
    code, _, err = run_report([sweep, "--plots", tmp_path / "figs"], capsys)
    assert code == 0 and inits[0]["job_type"] == "report" and logged["_finished"]
    assert logged["report/width_test_acc"] == ("image", str(tmp_path / "figs" / "width_test_acc.png"))
    assert logged["report/table"][0] == "table" and len(logged["report/table"][1]) > 8
    assert "logged to W&B" in err


# -- W&B as a source ---------------------------------------------------------------
class WandbSummary:
    """Like the W&B API's summary object: dict() does not work on it, _json_dict does."""

    def __init__(self, values: dict) -> None:
        self._json_dict = values

    def __iter__(self):
        raise TypeError("not iterable")


def wandb_runs_from(records: list[dict]) -> list[SimpleNamespace]:
    """The W&B runs kdexp would have logged for ``records`` (config = resolved config + extras)."""
    runs = []
    for i, record in enumerate(records):
        config = copy.deepcopy(record["config"])
        if record["status"] == "finished":
            config.update(job_type=record["job_type"], teacher_hash=record["teacher"]["hash"],
                          teacher_test_acc=record["teacher"]["test_acc"], data_fingerprint=record["data_fingerprint"],
                          output_dir=record["output_dir"])
        summary = {**record["metrics"], "_step": 99, "_runtime": 3.2, "_wandb": {"runtime": 3}}
        runs.append(SimpleNamespace(config=config, summary=WandbSummary(summary) if i % 2 else summary,
                                    state="finished" if record["status"] == "finished" else "crashed",
                                    id=f"run{i}", name=record["run_name"], group="mnist1d-cnn1d"))
    return runs


def test_wandb_runs_become_records(tmp_path):
    records = write_grid(tmp_path / "grid")
    converted = records_from_wandb_runs(wandb_runs_from(records))
    assert [r["status"] for r in converted] == [r["status"] for r in records]
    failed = [r for r in converted if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"]["type"] == "W&B state crashed"
    first = converted[0]
    assert first["job_type"] == "distill" and first["seed"] == 1 and first["choices"]["kd"] == "hinton"
    assert first["metrics"]["test/acc"] == records[0]["metrics"]["test/acc"] and "_step" not in first["metrics"]
    assert first["teacher"]["hash"] == TEACHER_HASH and first["data_fingerprint"] == FINGERPRINT
    assert "job_type" not in first["config"] and first["config"]["kd"]["temperature"] == 4.0


@pytest.mark.parametrize("spec", [ReportSpec(), ReportSpec(mode="paired"),
                                  ReportSpec(rows=("student.width",), cols=("kd",), mode="delta",
                                             where=(("kd.temperature", "8"), ("kd.alpha", "0.9")))])
def test_wandb_path_gives_the_same_table_as_folders(tmp_path, spec):
    records = write_grid(tmp_path / "grid")
    from_folders, _ = make_tables(load_sources([str(tmp_path / "grid")])[0], spec)
    from_wandb, _ = make_tables(records_from_wandb_runs(wandb_runs_from(records)), spec)
    pd.testing.assert_frame_equal(tidy_frame(from_folders, delta=True, paired=True),
                                  tidy_frame(from_wandb, delta=True, paired=True))


def test_wandb_source_through_the_cli(sweep, tmp_path, capsys, monkeypatch):
    from kdexp.report import wandb_runs

    records = write_grid(tmp_path / "grid")
    calls = []
    monkeypatch.setattr(wandb_runs, "fetch_wandb_runs",
                        lambda path, filters: calls.append((path, filters)) or wandb_runs_from(records))
    code, out, _ = run_report(["wandb:team/kdexp", "--group", "mnist1d-cnn1d", "--filter", "kd.alpha=0.9",
                               "--filter", "state=finished"], capsys)
    assert code == 0
    assert calls == [("team/kdexp", {"group": "mnist1d-cnn1d", "config.kd.alpha": 0.9, "state": "finished"})]
    _, folder_out, _ = run_report([sweep], capsys)
    assert md_rows(out) == md_rows(folder_out)


# -- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--metric", "test/accuracy"], "metric 'test/accuracy' is not in any finished run's record"),
    (["--rows", "student.widht"], "Did you mean student.width"),
    (["--rows", "kd.temperature", "--cols", "teacher.model"],
     "group of settings, not one value; pick one of: teacher.model._target_"),
    (["--rows", "student.width", "--cols", "student.width"], "both a row and a column axis"),
    (["--where", "kd.alpha=0.7"], "no run matches --where kd.alpha=0.7"),
    (["--where", "alpha"], "must look like key=value"),
])
def test_bad_input_is_a_clear_error(sweep, capsys, args, message):
    code, out, err = run_report([sweep, *args], capsys)
    assert code == 2 and out == ""
    assert err.startswith("kdexp report: error:") and message in err


def test_no_records_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_report([tmp_path / "empty"], capsys)
    assert code == 2 and "no student run records found" in err
    with pytest.raises(ReportError, match="neither a folder"):
        load_sources([str(tmp_path / "nowhere")])


def test_help(capsys):
    code, out, _ = run_report(["--help"], capsys)
    assert code == 0 and out.startswith("usage: kdexp report") and "--paired" in out and "wandb:ENTITY/PROJECT" in out


def test_width_plot_picks_the_kd_setting_on_validation_not_test(tmp_path):
    """(T=4, α=0.5) has the better test accuracy, (T=8, α=0.9) the better validation accuracy."""
    from kdexp.report.plots import kd_setting_per_width
    from kdexp.report.runs import axis_values, metric_values, runs_frame

    records = []
    for temperature, alpha, test, val in ((4.0, 0.5, 0.70, 0.60), (8.0, 0.9, 0.65, 0.66)):
        for seed in SEEDS:
            record = make_record(tmp_path / f"{temperature}-{alpha}-{seed}", width=128, seed=seed,
                                 temperature=temperature, alpha=alpha, acc=test)
            record["metrics"]["val/acc_best"] = val
            records.append(record)
    runs = runs_frame(records)
    runs = runs.assign(_w=axis_values(runs, "student.width"), _t=axis_values(runs, "kd.temperature"),
                       _a=axis_values(runs, "kd.alpha"), _value=metric_values(runs, "test/acc"))
    chosen = kd_setting_per_width(runs)
    assert len(chosen) == 1
    assert (float(chosen["_t"].iloc[0]), float(chosen["_a"].iloc[0])) == (8.0, 0.9)
    assert chosen["mean"].iloc[0] == pytest.approx(0.65)


def test_archived_runs_are_left_out(tmp_path, capsys):
    """A rerun moves the old run to <run>/archive/<time>/: the table shows only the current one."""
    for job, (width, seed) in enumerate((w, s) for w in WIDTHS for s in SEEDS):
        make_record(tmp_path / "ce" / str(job), width=width, seed=seed)
    make_record(tmp_path / "ce" / "0" / "archive" / "2026-01-01T00-00-00", width=WIDTHS[0], seed=SEEDS[0], acc=0.01)
    code, out, err = run_report([tmp_path / "ce"], capsys)
    assert code == 0 and "1 archived run(s)" in err
    header, rows = md_rows(out)
    assert rows[(f"{WIDTHS[0]} (CE only)",)] == [fmt(ce_values(WIDTHS[0]))]


def test_default_axes_are_the_objectives_own_knobs(tmp_path, capsys):
    """A DKD sweep (knobs kd.beta, kd.temperature) gets width × β rows and T columns without flags."""
    from kdexp.core.records import write_record

    for job, (width, seed, beta) in enumerate((w, s, b) for w in WIDTHS for s in SEEDS for b in (1.0, 8.0)):
        folder = tmp_path / "dkd" / str(job)
        record = make_record(folder, width=width, seed=seed, temperature=4.0, alpha=1.0,
                             acc=0.6 + 0.01 * beta + 0.001 * seed)
        record["config"]["kd"] = {"_target_": "kdexp.objectives.dkd.DKD", "alpha": 1.0, "beta": beta,
                                  "temperature": 4.0, "ce_weight": 1.0, "warmup_epochs": 20}
        record["choices"]["kd"] = record["config"]["choices"]["kd"] = "dkd"
        record["objective"] = {"name": "dkd", "label": f"dkd-beta{beta:g}-T4", "target": "kdexp.objectives.dkd.DKD",
                               "knobs": ["kd.beta", "kd.temperature"]}
        write_record(folder, record)
    code, out, err = run_report([tmp_path / "dkd"], capsys)
    assert code == 0, err
    header, rows = md_rows(out)
    assert header == ["student.width", "kd.beta", "kd.temperature=4"]
    assert set(rows) - {("teacher", "")} == {(str(w), b) for w in WIDTHS for b in ("1", "8")}
    assert "kd=dkd" in out


def test_a_setting_set_to_null_is_a_column_of_its_own_not_an_absent_axis(tmp_path, capsys):
    """data.transfer_set: null (plain KD) vs generated: each KD cell stays in its column, and the CE-only
    run (which can have no transfer set) is the reference row of both columns, never a KD cell."""
    values = {}
    for seed in (1, 2):
        for setting, gain in ((None, 0.0), ("generated", 0.2)):
            folder = tmp_path / f"kd-{setting}-{seed}"
            record = make_record(folder, width=128, seed=seed, temperature=4.0, alpha=0.9,
                                 acc=0.6 + gain + 0.01 * seed)
            record["config"]["data"]["transfer_set"] = setting
            write_record(folder, record)
            values[(setting, seed)] = record["metrics"]["test/acc"]
        ce = make_record(tmp_path / f"ce-{seed}", width=128, seed=seed, acc=0.55 + 0.01 * seed)
        ce["config"]["data"]["transfer_set"] = None
        write_record(tmp_path / f"ce-{seed}", ce)
    code, out, _ = run_report([str(tmp_path), "--rows", "student.width", "--cols", "data.transfer_set"], capsys)
    assert code == 0
    header, rows = md_rows(out)
    assert header[1:] == ["data.transfer_set=generated", "data.transfer_set=null"]
    generated = 100 * np.mean([values[("generated", s)] for s in (1, 2)])
    plain = 100 * np.mean([values[(None, s)] for s in (1, 2)])
    assert rows[("128",)][0].startswith(f"**{generated:.2f}") and rows[("128",)][1].startswith(f"{plain:.2f}")
    assert rows[("128 (CE only)",)] == ["56.50 ± 0.71 (n=2)"] * 2  # spans the columns
    code, out, _ = run_report([str(tmp_path), "--rows", "student.width", "--cols", "data.transfer_set", "--paired"],
                              capsys)
    _, rows = md_rows(out)
    gain = 100 * np.mean([values[("generated", s)] - (0.55 + 0.01 * s) for s in (1, 2)])
    assert rows[("128",)][0].startswith(f"**+{gain:.2f}")  # paired with the CE-only run of the same seed


def test_a_json_file_without_a_records_fields_is_named_and_skipped(sweep, tmp_path, capsys):
    """It parses, but is no run record: it must not enter the table as a run with no settings."""
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    stray = root / "stray"
    stray.mkdir()
    (stray / "run_record.json").write_text('{"status": "finished"}')
    code, out, err = run_report([root], capsys)
    assert code == 0, err
    assert f"record without a run's config skipped: {stray / 'run_record.json'} (it holds only status)" in err
    _, expected, _ = run_report([sweep], capsys)
    assert md_rows(out) == md_rows(expected)


def write_language_model_runs(root: Path) -> dict[str, np.ndarray]:
    """Width-64 GPT students on text: CE only, and token KD that is *worse* in bits per byte
    (+0.14, lower is better), each with its teacher's own test bpb as a run records it."""
    values = {"ce": np.array([3.90, 3.95, 3.92]), "kd": np.array([4.04, 4.09, 4.06]), "teacher": 3.6148}
    for kind in ("ce", "kd"):
        for seed, bpb in zip(SEEDS, values[kind]):
            folder = root / f"{kind}{seed}"
            record = make_record(folder, width=64, seed=seed, temperature=None if kind == "ce" else 2.0, alpha=0.5,
                                 acc=0.4)
            record["metrics"].update({"test/bpb": bpb, "teacher/test_bpb": values["teacher"]})
            write_record(folder, record)
    return values


def test_a_lower_is_better_metric_states_its_direction_and_gets_the_teachers_row(tmp_path, capsys):
    values = write_language_model_runs(tmp_path)
    code, out, err = run_report([tmp_path, "--metric", "test/bpb", "--paired", "--rows", "student.width",
                                 "--cols", "kd.temperature"], capsys)
    assert code == 0, err
    heading = next(line for line in out.splitlines() if line.startswith("### "))
    assert "Δ bpb vs CE only" in heading and "lower is better" in heading
    assert "lower is better: a negative Δ means KD did better than CE only" in out
    _, rows = md_rows(out)
    worse = values["kd"] - values["ce"]
    assert rows[("64",)][0].startswith(f"{worse.mean():+.4f}")  # +0.14: read with the caption, KD is worse
    assert rows[("teacher",)] == [f"{values['teacher']:.4f} (n=1)"]  # the teacher's own bpb
    assert "teacher row: the teacher's test/bpb" in out
    _, raw, _ = run_report([tmp_path, "--metric", "test/bpb", "--rows", "student.width", "--cols", "kd"], capsys)
    _, rows = md_rows(raw)  # auto picks min for bpb: the CE-only cell is the best of the row
    assert rows[("64",)] == [fmt_raw(values["kd"]), f"**{fmt_raw(values['ce'])}**"]  # kd=hinton, kd=none
    chain = render_chain(load_sources([str(tmp_path)])[0], "test/bpb")
    assert "lower is better (a negative Δ: the route beat direct KD)" in chain


def fmt_raw(values: np.ndarray) -> str:
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f} (n={len(values)})"


def test_heatmap_cells_read_as_the_table_does(tmp_path, capsys):
    """64.25 % is 64.25 in both: one formatting function (not 64.2 from one decimal fewer)."""
    from kdexp.report.plots import heatmap_figures

    for seed in (1, 2):
        for temperature, alpha, acc in ((4.0, 0.5, 0.6425), (4.0, 0.9, 0.6375), (8.0, 0.5, 0.61), (8.0, 0.9, 0.6)):
            make_record(tmp_path / f"{temperature}-{alpha}-{seed}", width=128, seed=seed, temperature=temperature,
                        alpha=alpha, acc=acc)
    code, out, _ = run_report([tmp_path], capsys)
    _, rows = md_rows(out)
    assert rows[("128", "4")] == ["**64.25 ± 0.00 (n=2)**", "63.75 ± 0.00 (n=2)"]
    [table], _ = make_tables(load_sources([str(tmp_path)])[0])
    [(name, figure)] = heatmap_figures(table)
    labels = {text.get_text() for text in figure.axes[0].texts}
    assert name == "heatmap_test_acc_width128.png" and labels == {"64.25", "63.75", "61.00", "60.00"}
