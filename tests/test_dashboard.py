"""``kdexp dashboard``: the W&B view of a real sweep, checked against what its runs logged to W&B.

One small sweep runs once for the module (the smoke grid at seed 1, α 0.9: 2 T × 2 widths, W&B
offline) with its CE-only baseline (2 widths) in the same W&B group; the offline W&B runs are read
back from their files (tests/wandb_file.py), so each name the dashboard reads is checked against
what kdexp really logs. No test needs a W&B server: the workspace and report objects are built
in-process and never saved. Default-run time here: 35–46 s, of which the two sweeps take 28–38 s.
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest
from conftest import ROOT, records_in, run_cli
from wandb_file import read_run, records

from kdexp.core.errors import ConfigError
from kdexp.core.tracking import wandb_group
from kdexp.core.vocabulary import (
    CHOICES,
    DATA_FINGERPRINT,
    EPOCH,
    NO_KD,
    SEED,
    TEACHER_HASH,
    TEST_ACC,
    VAL_ACC,
    VAL_ACC_BEST,
    flatten_config,
    is_bookkeeping,
)
from kdexp.report import dashboard_cli
from kdexp.report.dashboard import (
    CURVES,
    PARALLEL,
    RUNS_TABLE,
    SCATTER,
    SPEC_FILE,
    config_field,
    dashboard_spec,
    spec_from_folder,
    spec_from_sweep_file,
)
from kdexp.report.dashboard_wandb import build_report, build_workspace
from kdexp.report.errors import ReportError

SMOKE = ROOT / "sweeps" / "smoke.yaml"
REDUCED = ["seed=1", "kd.alpha=0.9"]  # 2 T × 2 widths: T and width are swept, α and the seed are not


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The reduced smoke grid and its CE-only baseline, W&B offline, both in W&B group ``smoke``."""
    base = tmp_path_factory.mktemp("dashboard")
    for file, overrides, folder in ((SMOKE, REDUCED, "smoke"), (ROOT / "sweeps" / "smoke_baseline.yaml", ["seed=1"],
                                                                  "ce")):
        proc = run_cli(["sweep", str(file), *overrides, "--dir", str(base / "all" / folder)], base / "cache",
                       module="kdexp.cli")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "all"


def wandb_config(run_folder: Path) -> dict:
    """The config of the offline W&B run in ``run_folder``, as W&B received it (nested dicts)."""
    [path] = glob.glob(str(run_folder / "wandb" / "offline-run-*" / "*.wandb"))
    config: dict = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


def run_folders(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/run_record.json"))


def swept_in_records(folder: Path) -> set[str]:
    """Config paths (and group options) whose value differs between the folder's runs, seed and bookkeeping aside:
    what the dashboard must compare, worked out from the records alone."""
    flat = [{**flatten_config(r["config"]), **{k: v for k, v in r[CHOICES].items()}} for r in records_in(folder)]
    keys = set().union(*flat)
    varied = {k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}
    return {k for k in varied if k != SEED and not is_bookkeeping(k) and not k.startswith(("paths.", "choices."))
            and k not in ("output_dir",)}


# -- what the view holds ------------------------------------------------------------------------------
def test_the_view_of_a_sweep_file_holds_every_swept_axis_and_no_other(sweeps):
    spec = spec_from_sweep_file(SMOKE, REDUCED)
    assert [a.path for a in spec.axes] == ["kd.temperature", "student.width"]
    assert {a.path for a in spec.axes} == swept_in_records(sweeps / "smoke")  # what the runs really varied
    assert {a.path: a.values for a in spec.axes} == {"kd.temperature": (2, 8), "student.width": (16, 64)}
    assert spec.seeds == (1,) and spec.expected_runs == 4 == len(records_in(sweeps / "smoke"))
    columns = [c.key for c in spec.panel(PARALLEL)[0].columns]
    assert columns == ["kd.temperature", "student.width", VAL_ACC_BEST, TEST_ACC]  # no kd.alpha, no seed
    assert [p.x.key for p in spec.panel(SCATTER)] == ["kd.temperature", "student.width"]
    # without the overrides the file sweeps alpha and two seeds: alpha becomes an axis, the seed never does
    full = spec_from_sweep_file(SMOKE)
    assert [a.path for a in full.axes] == ["kd.temperature", "kd.alpha", "student.width"]
    assert full.seeds == (1, 2) and full.expected_runs == 16


def test_the_view_of_a_sweep_folder_equals_the_view_of_its_file(sweeps):
    from_file, from_folder = spec_from_sweep_file(SMOKE, REDUCED), spec_from_folder(sweeps / "smoke")
    assert from_folder.axes == from_file.axes
    assert from_folder.panels == from_file.panels
    assert (from_folder.groups, from_folder.seeds, from_folder.project) == (from_file.groups, from_file.seeds, "kdexp")
    assert from_folder.runs == {"finished": 4, "ce_only": 0}
    assert any("no CE-only run" in note for note in from_folder.notes)
    assert "| student.width | kd.temperature | kd.alpha=0.9 |" in from_folder.ablation_markdown  # kdexp report's table


def test_a_folder_with_kd_and_ce_only_runs_compares_the_objective_and_has_the_reference(sweeps):
    spec = spec_from_folder(sweeps)  # the smoke runs and their CE-only baseline
    assert {a.path: set(a.values) for a in spec.axes} == {"kd": {"hinton", NO_KD}, "kd.temperature": {2, 8},
                                                          "student.width": {16, 64}}
    assert config_field("kd").key == f"{CHOICES}.kd"  # a group's option, where the W&B config holds it
    assert spec.runs["ce_only"] == 2 and spec.expected_runs == 6
    (ref_field, ref_value), = [p.reference for p in spec.panel(CURVES)]
    seen = {}
    for folder in run_folders(sweeps / "smoke") + run_folders(sweeps / "ce"):
        value = wandb_config(folder)
        for part in ref_field.key.split("."):
            value = value[part]
        seen[folder.parent.name] = value
    assert set(seen.values()) == {"hinton", ref_value}  # the reference is exactly the baseline sweep's runs
    assert {k for k, v in seen.items() if v == ref_value} == {"ce"}


def test_metric_names_are_the_vocabulary_and_are_what_the_runs_logged(sweeps):
    spec = spec_from_folder(sweeps / "smoke")
    [curves] = spec.panel(CURVES)
    assert (curves.x.key, [f.key for f in curves.y]) == (EPOCH, [VAL_ACC])
    assert [p.y[0].key for p in spec.panel(SCATTER)] == [TEST_ACC, TEST_ACC]
    assert [c.key for c in spec.panel(PARALLEL)[0].columns][-2:] == [VAL_ACC_BEST, TEST_ACC]
    summaries = {f.key for p in spec.panels for f in (*p.columns, *p.y) if f.source == "summary"}
    history = {f.key for p in spec.panels for f in (p.x, *p.y) if f is not None and f.source == "history"}
    assert summaries == {VAL_ACC_BEST, TEST_ACC} and history == {EPOCH, VAL_ACC}
    for folder in run_folders(sweeps / "smoke"):
        logged = set().union(*(row.keys() for row in read_run(folder)["history"]))
        assert summaries | history <= logged, folder.name
        epochs = [row for row in read_run(folder)["history"] if VAL_ACC in row]
        assert epochs and all(EPOCH in row for row in epochs)  # every val/acc point has its epoch


def test_the_group_filter_is_the_group_the_runs_log(sweeps, tmp_path):
    spec = spec_from_sweep_file(SMOKE, REDUCED)
    logged = {read_run(f)["group"] for f in run_folders(sweeps / "smoke") + run_folders(sweeps / "ce")}
    assert spec.groups == ("smoke",) and logged == {"smoke"}
    assert {wandb_group(r["config"]["group"], r[CHOICES]) for r in records_in(sweeps / "smoke")} == {"smoke"}
    # without a group setting a run logs to "<data>-<teacher>": composed from the experiment's defaults
    no_group = tmp_path / "no_group.yaml"
    no_group.write_text(SMOKE.read_text().replace("  group: {value: smoke}\n", ""))
    assert spec_from_sweep_file(no_group).groups == ("digits-cnn2d",)
    assert spec_from_sweep_file(no_group, ["data=mnist1d,digits", "teacher=cnn1d"]).groups == (
        "mnist1d-cnn1d", "digits-cnn1d")


def test_the_runs_table_columns_are_the_runs_w_and_b_config_keys(sweeps):
    spec = spec_from_folder(sweeps / "smoke")
    [table] = spec.panel(RUNS_TABLE)
    config_keys = [c.key for c in table.columns if c.source == "config"]
    assert config_keys == ["kd.temperature", "student.width", SEED, TEACHER_HASH, DATA_FINGERPRINT]
    assert [c.key for c in table.columns if c.source == "run"] == ["displayName", "state"]
    for folder, record in zip(run_folders(sweeps / "smoke"), records_in(sweeps / "smoke")):
        config = wandb_config(folder)
        for key in config_keys:
            value = config
            for part in key.split("."):
                value = value[part]
            expected = {TEACHER_HASH: record["teacher"]["hash"], DATA_FINGERPRINT: record[DATA_FINGERPRINT]}.get(
                key, flatten_config(record["config"]).get(key))
            assert value == expected, (folder.name, key)


# -- the W&B objects ----------------------------------------------------------------------------------
def test_the_workspace_is_built_in_process_with_the_panels(sweeps):
    import wandb_workspaces.reports.v2 as wr

    spec = spec_from_folder(sweeps / "smoke")
    workspace = build_workspace(spec, "an-entity")
    kinds = {s.name: [type(p).__name__ for p in s.panels] for s in workspace.sections}
    assert kinds == {"sweep overview": ["ParallelCoordinatesPlot"],
                     f"{TEST_ACC} per swept setting": ["ScatterPlot", "ScatterPlot"],
                     "learning curves": ["LinePlot", "LinePlot"], "runs": ["RunComparer"]}
    view = workspace._to_model().model_dump(by_alias=True, exclude_none=True)  # what save() would send
    section = view["spec"]["section"]
    panels = [p for s in section["panelBankConfig"]["sections"] for p in s["panels"]]
    [parallel] = [p for p in panels if p["viewType"] == "Parallel Coordinates Plot"]
    assert [c["accessor"] for c in parallel["config"]["columns"]] == [
        "config:kd.value.temperature", "config:student.value.width", f"summary:{VAL_ACC_BEST}", f"summary:{TEST_ACC}"]
    assert [p["config"]["xAxis"] for p in panels if p["viewType"] == "Scatter Plot"] == [
        "config:kd.value.temperature", "config:student.value.width"]
    lines = [p["config"] for p in panels if p["viewType"] == "Run History Line Plot"]
    assert [(c["xAxis"], c["metrics"], c["groupBy"]) for c in lines] == [
        (EPOCH, [VAL_ACC], "student.value.width"), (EPOCH, [VAL_ACC], "choices.value.kd")]
    [runset] = section["runSets"]
    assert runset["filters"]["filters"][0] == {"key": {"section": "run", "name": "group"}, "op": "IN",
                                               "value": ["smoke"], "disabled": False}
    assert runset["filters"]["filters"][1]["value"] == ["teacher", "report"]
    assert runset["runFeed"]["columnOrder"] == [c.column for c in spec.panel(RUNS_TABLE)[0].columns]
    # the spec's column names are what the library itself writes for a config key
    assert wr.ParallelCoordinatesPlotColumn(metric=wr.Config("kd.temperature"))._to_model().accessor == \
        config_field("kd.temperature").column == "config:kd.value.temperature"


def test_the_report_groups_each_scatter_by_the_other_axes_and_keeps_the_ce_only_reference(sweeps):
    import wandb_workspaces.reports.v2 as wr

    report = build_report(spec_from_folder(sweeps / "smoke"), "an-entity")  # built, never saved
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert [[r.name for r in g.runsets] for g in grids] == [
        ["student.width=16", "student.width=64"],  # test/acc vs T, one run set per width
        ["kd.temperature=2", "kd.temperature=8"],  # test/acc vs width, one per T
        ["KD student.width=16", "CE only (kd=none) student.width=16", "KD student.width=64",
         "CE only (kd=none) student.width=64"]]
    assert "Config(\"choices.kd\") == 'none'" in grids[2].runsets[1].filters
    assert "Metric(\"Group\") in ['smoke']" in grids[2].runsets[1].filters
    assert any(isinstance(b, wr.MarkdownBlock) and "| student.width |" in b.text for b in report.blocks)


# -- the command ----------------------------------------------------------------------------------------
def test_offline_the_command_writes_the_spec_and_says_how_to_create_it(sweeps, capsys):
    folder = sweeps / "smoke"
    assert dashboard_cli.main([str(folder)]) == 0
    out = capsys.readouterr().out
    written = json.loads((folder / SPEC_FILE).read_text())
    assert written == json.loads(spec_from_folder(folder).to_json())
    assert written["groups"] == ["smoke"] and [a["path"] for a in written["axes"]] == ["kd.temperature",
                                                                                     "student.width"]
    assert written["panels"][0]["columns"][0]["column"] == "config:kd.value.temperature"
    assert "W&B is offline (WANDB_MODE=offline in the environment)" in out
    assert f"`kdexp dashboard {folder}` creates the workspace and report" in out


def test_a_key_without_a_reachable_server_never_blocks(sweeps, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    assert dashboard_cli.main([str(SMOKE), *REDUCED, "--out", str(tmp_path / "d.json"), "--project", "p"]) == 0
    assert time.monotonic() - start < 20
    assert json.loads((tmp_path / "d.json").read_text())["project"] == "p"
    assert "the server is unreachable" in capsys.readouterr().out


def test_the_command_is_wired_and_explains_itself(tmp_path):
    proc = run_cli(["dashboard", "--help"], tmp_path / "cache", module="kdexp.cli")
    assert proc.returncode == 0 and "val/acc per epoch grouped by student.width" in proc.stdout
    assert "wandb_dashboard.json" in proc.stdout
    assert "dashboard SWEEP" in run_cli(["--help"], tmp_path / "cache", module="kdexp.cli").stdout


@pytest.mark.parametrize("args, fragment", [
    (["sweeps/missing.yaml"], "neither a sweep file nor a sweep folder"),
    (["{empty}"], "no student run records (run_record.json) in"),
    (["{empty}", "seed=1"], "overrides (seed=1) apply to a sweep file"),
    ([str(SMOKE), "kd=hintn"], "the sweep's runs do not compose with"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, args, fragment):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    assert dashboard_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdexp dashboard: error: ") and fragment in err and "Traceback" not in err


def test_errors_are_the_kinds_callers_catch(tmp_path):
    with pytest.raises(ReportError, match="neither a sweep file nor a sweep folder"):
        dashboard_spec(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="do not compose with .*teacher=nope: In 'train': Could not find") as err:
        spec_from_sweep_file(SMOKE, ["teacher=nope"])
    assert "Config search path" not in str(err.value)  # Hydra's search path says nothing to the user
