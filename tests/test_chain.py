"""Distillation chains: teacher → assistants → student, lineage, stage reuse, the chain report."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config, load_record, run_cli
from kdexp.errors import ConfigError
from kdexp.models import MLP
from kdexp.report.chain import chain_table, render_chain
from kdexp.teacher import load_teacher_weights, weights_hash
from kdexp.train import run
from kdexp.validation import validate_config

FAST = ["experiment=digits_smoke", "teacher.max_epochs=3", "trainer.max_epochs=2", "student.width=16", "logger=none"]


def stage_records(cache: Path) -> dict[str, dict]:
    return {p.parent.name: load_record(p.parent) for p in sorted((cache / "stages").glob("*/run_record.json"))}


def best_hash(record: dict, width: int) -> str:
    model = load_teacher_weights(MLP([1, 8, 8], 10, width=width), record["checkpoints"]["best"], 10)
    return weights_hash(model)


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    """A three-stage chain through the real CLI, run twice, then with stage 2's width changed."""
    base = tmp_path_factory.mktemp("chain")
    cache = base / "cache"
    first = run_cli([*FAST, "chain=[48,32]", f"hydra.run.dir={base / 'first'}"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    stages_after_first = stage_records(cache)
    again = run_cli([*FAST, "chain=[48,32]", "seed=1", f"hydra.run.dir={base / 'again'}"], cache)
    assert again.returncode == 0, again.stderr[-3000:]
    stages_after_again = stage_records(cache)
    changed = run_cli([*FAST, "chain=[48,24]", f"hydra.run.dir={base / 'changed'}"], cache)
    assert changed.returncode == 0, changed.stderr[-3000:]
    return base, cache, stages_after_first, stages_after_again, stage_records(cache), again


def test_each_stage_is_taught_by_the_previous_stages_best_checkpoint(chain_runs):
    base, _, stages, _, _, _ = chain_runs
    by_width = {r["config"]["student"]["width"]: r for r in stages.values()}
    assert sorted(by_width) == [32, 48] and all(r["status"] == "finished" for r in by_width.values())
    s48, s32, final = by_width[48], by_width[32], load_record(base / "first")
    assert s48["job_type"] == "distill" and s48["stage"] == 1 and s32["stage"] == 2 and final["stage"] == 3
    # The teacher of each stage is, by weights hash, the best checkpoint of the stage before it.
    assert s32["teacher"]["hash"] == best_hash(s48, 48) == s32["lineage"][1]["hash"]
    assert final["teacher"]["hash"] == best_hash(s32, 32) == final["lineage"][2]["hash"]
    assert s48["teacher"]["hash"] == final["lineage"][0]["hash"]  # the root teacher
    # Lineage is complete and ordered, root first, in every record.
    assert [e["stage"] for e in final["lineage"]] == [0, 1, 2]
    assert [(e["arch"], e["width"]) for e in final["lineage"]] == [("cnn2d", 32), ("mlp", 48), ("mlp", 32)]
    assert final["lineage"][:2] == s32["lineage"] and s32["lineage"][:1] == s48["lineage"]
    assert final["lineage"][1]["test_acc"] == pytest.approx(s48["metrics"]["test/acc"], abs=1e-6)
    assert final["route"] == "via 48→32"


def test_a_second_invocation_reuses_every_finished_stage(chain_runs):
    _, _, first, again, _, again_proc = chain_runs
    assert {k: r["finished_at"] for k, r in again.items()} == {k: r["finished_at"] for k, r in first.items()}
    assert "Training chain stage" not in again_proc.stderr


def test_changing_stage_2_retrains_stage_2_and_what_follows_only(chain_runs):
    base, _, first, _, after, _ = chain_runs
    new = {k: r for k, r in after.items() if k not in first}
    assert [r["config"]["student"]["width"] for r in new.values()] == [24]  # stage 1 (48) was reused
    for key, record in first.items():
        assert after[key]["finished_at"] == record["finished_at"]
    changed = load_record(base / "changed")
    assert changed["route"] == "via 48→24" and changed["lineage"][1] == load_record(base / "first")["lineage"][1]


def test_the_chain_report_equals_the_records_by_hand(tmp_path):
    records = []
    for name, extra in (("d1", ["chain=[]", "seed=1"]), ("d2", ["chain=[]", "seed=2"]),
                        ("c1", ["chain=[32]", "seed=1"]), ("c2", ["chain=[32]", "seed=2"]),
                        ("ce1", ["kd=none", "seed=1"])):
        records.append(run(compose_config([*FAST, *extra, f"paths.output_dir={tmp_path / name}"], tmp_path)))
    acc = {r["output_dir"].rsplit("/", 1)[-1]: r["metrics"]["test/acc"] for r in records}
    cells, gains = chain_table(records)
    cell = cells.set_index(["width", "route"])
    assert cell.loc[(16, "direct"), "mean"] == pytest.approx((acc["d1"] + acc["d2"]) / 2)
    assert cell.loc[(16, "via 32"), "mean"] == pytest.approx((acc["c1"] + acc["c2"]) / 2)
    assert cell.loc[(16, "CE only"), "n"] == 1
    gain = gains.set_index(["width", "route"]).loc[(16, "via 32")]
    assert gain.paired_mean == pytest.approx(((acc["c1"] - acc["d1"]) + (acc["c2"] - acc["d2"])) / 2)
    assert gain.paired_n == 2
    text = render_chain(records)
    assert "| 16 |" in text and "via 32 − direct (paired)" in text and f"{100 * gain.paired_mean:+.2f}" in text


@pytest.mark.parametrize("chain, message", [
    ("chain=[0]", "width must be >= 1"),
    ("chain=[nosuch@16]", "no student option 'nosuch'"),
    ("chain=[mlp@wide]", "after @ must be a whole width"),
    ("chain=[cnn1d@8]", r"student=cnn1d does not fit.*chain\[0\]"),
])
def test_a_bad_chain_is_refused_before_anything_trains(tmp_path, chain, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config([*FAST, chain], tmp_path))
    assert not (tmp_path / "cache").exists()


def test_a_chain_for_a_ce_only_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="uses no teacher"):
        validate_config(compose_config([*FAST, "kd=none", "chain=[32]"], tmp_path))
