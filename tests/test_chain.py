"""Distillation chains: teacher → assistants → student, lineage, stage reuse, the chain report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import compose_config, load_record, run_cli
from kdexp.core.errors import CheckpointError, ConfigError
from kdexp.models import MLP
from kdexp.teachers.provision import trained_teacher_key
from kdexp.teachers.stages import teacher_key
from kdexp.report.chain import chain_table, render_chain
from kdexp.teachers.provision import load_teacher_weights, weights_hash
from kdexp.train import run
from kdexp.run.validation import validate_config
from kdexp.core.vocabulary import canonical_json

FAST = ["experiment=digits_smoke", "teacher.max_epochs=3", "trainer.max_epochs=2", "student.width=16", "logger=none"]


def stage_records(cache: Path) -> dict[str, dict]:
    return {p.parent.name: load_record(p.parent) for p in sorted((cache / "stages").glob("*/run_record.json"))}


def best_hash(record: dict, width: int) -> str:
    model = load_teacher_weights(MLP([1, 8, 8], 10, width=width), record["checkpoints"]["best"], 10)
    return weights_hash(model)


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    """A three-stage chain through the real CLI; run again with the same settings written otherwise
    (``kd.temperature=4``, an int, where the first run had the YAML default 4.0); then with stage 2's
    width changed."""
    base = tmp_path_factory.mktemp("chain")
    cache = base / "cache"
    first = run_cli([*FAST, "chain=[48,32]", f"hydra.run.dir={base / 'first'}"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    stages_after_first = stage_records(cache)
    again = run_cli([*FAST, "chain=[48,32]", "seed=1", "kd.temperature=4", f"hydra.run.dir={base / 'again'}"],
                    cache)
    assert again.returncode == 0, again.stderr[-3000:]
    stages_after_again = stage_records(cache)
    changed = run_cli([*FAST, "chain=[48,24]", f"hydra.run.dir={base / 'changed'}"], cache)
    assert changed.returncode == 0, changed.stderr[-3000:]
    return base, cache, stages_after_first, stages_after_again, stage_records(cache), again, first


def test_each_stage_is_taught_by_the_previous_stages_best_checkpoint(chain_runs):
    base, _, stages, _, _, _, _ = chain_runs
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
    base, _, first, again, _, again_proc, _ = chain_runs
    # The second run typed kd.temperature=4 (an int); the stages were trained with the default 4.0.
    assert load_record(base / "again")["config"]["kd"]["temperature"] == 4
    assert type(first[next(iter(first))]["config"]["kd"]["temperature"]) is float
    assert {k: r["finished_at"] for k, r in again.items()} == {k: r["finished_at"] for k, r in first.items()}
    assert "Training chain stage" not in again_proc.stderr


def test_stages_are_trained_and_announced_in_order(chain_runs):
    *_, first_proc = chain_runs
    lines = [line for line in first_proc.stderr.splitlines() if "Training chain stage" in line]
    assert [line.split("Training chain stage ")[1][:1] for line in lines] == ["1", "2"], lines


def test_a_chain_run_is_named_for_its_route(chain_runs):
    base, _, stages, *_ = chain_runs
    assert load_record(base / "first")["run_name"] == "distill-mlp16-via48-32-hinton-T4-a0.9-s1"
    assert load_record(base / "changed")["run_name"] == "distill-mlp16-via48-24-hinton-T4-a0.9-s1"
    by_width = {r["config"]["student"]["width"]: r for r in stages.values()}
    assert by_width[48]["run_name"] == "distill-mlp48-hinton-T4-a0.9-s1"  # stage 1 is taught directly
    assert by_width[32]["run_name"] == "distill-mlp32-via48-hinton-T4-a0.9-s1"


def test_changing_stage_2_retrains_stage_2_and_what_follows_only(chain_runs):
    base, _, first, _, after, _, _ = chain_runs
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
    names = {r["output_dir"].rsplit("/", 1)[-1]: r["run_name"] for r in records}
    assert names["d1"] == "distill-mlp16-hinton-T4-a0.9-s1"  # the direct run's name is as it always was
    assert names["c1"] == "distill-mlp16-via32-hinton-T4-a0.9-s1" != names["d1"]
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


# -- one stage for one setting, however it is written -------------------------------------
def test_equal_settings_written_differently_share_one_stage_key(tmp_path):
    def key(*extra: str) -> str:  # the key of the chain's last stage, as get_assistant computes it
        return teacher_key(compose_config([*FAST, "chain=[48]", *extra], tmp_path))

    default = key()
    assert key("kd.temperature=4") == key("kd.temperature=4.0") == default  # int from a sweep file vs YAML 4.0
    assert key("kd.alpha=0.9") == default
    assert key("kd.temperature=4.5") != default and key("kd.alpha=1") != default  # other values stay other
    # Lightning's limit_*_batches: an int counts batches, a float is a fraction: never merged.
    assert key("+trainer.limit_train_batches=1") != key("+trainer.limit_train_batches=1.0")


def test_the_teacher_cache_key_is_normalised_the_same_way(tmp_path):
    def key(*extra: str) -> str:
        return trained_teacher_key(compose_config([*FAST, *extra], tmp_path))

    assert key("teacher.optimizer.lr=1") == key("teacher.optimizer.lr=1.0") != key("teacher.optimizer.lr=2")


def test_canonical_form_merges_spellings_not_meanings():
    same = [({"b": (1, 2.0), "a": {"y": 4.0, "x": -0.0}}, {"a": {"x": 0, "y": 4}, "b": [1, 2]})]
    for left, right in same:  # key order, tuple vs list, int vs the equal float
        assert canonical_json(left) == canonical_json(right)
    # A flag is not a number (kdexp tests flags with `is True`), a string is not a number, a
    # fraction is not rounded, and a count-or-fraction setting keeps its type.
    assert canonical_json({"x": True}) != canonical_json({"x": 1})
    assert canonical_json({"x": False}) != canonical_json({"x": 0})
    assert canonical_json({"x": "4"}) != canonical_json({"x": 4})
    assert canonical_json({"x": 4.5}) != canonical_json({"x": 4})
    assert canonical_json({"limit_val_batches": 1}) != canonical_json({"limit_val_batches": 1.0})
    assert canonical_json({"x": float("nan")}) == canonical_json({"x": float("nan")})  # no crash on non-finite


# -- a moved or copied cache -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_moved_or_copied_cache_serves_its_stages_from_where_it_is(chain_runs, tmp_path, how):
    _, original, first, *_ = chain_runs
    cache = tmp_path / "cache"  # compose_config's paths.cache_dir
    if how == "copied":  # the original stays: a copy must read its own files, not the original's
        shutil.copytree(original, cache)
    else:  # moved: the folder its records name exists no more (moved back after the test)
        original.rename(cache)
    try:
        before = stage_records(cache)
        record = run(compose_config([*FAST, "chain=[48,32]", f"paths.output_dir={tmp_path / 'run'}"], tmp_path))
        assert record["status"] == "finished"
        assert stage_records(cache) == before  # nothing retrained, no stage added
        last = next(k for k, r in first.items() if r["config"]["student"]["width"] == 32)
        assert record["teacher"]["path"] == str(cache / "stages" / last / "checkpoints" / "best.ckpt")
        assert all(entry["path"].startswith(f"{cache}/") for entry in record["lineage"]), record["lineage"]
        assert record["route"] == "via 48→32"
    finally:
        if how == "moved":
            cache.rename(original)


def test_a_stage_file_missing_from_a_cache_says_so(chain_runs, tmp_path):
    _, original, first, *_ = chain_runs
    cache = tmp_path / "cache"
    shutil.copytree(original, cache)
    last = next(k for k, r in first.items() if r["config"]["student"]["width"] == 32)
    (cache / "stages" / last / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"cached chain stage checkpoint not found.*moved or copied") as caught:
        run(compose_config([*FAST, "chain=[48,32]", f"paths.output_dir={tmp_path / 'run'}"], tmp_path))
    assert "teacher.checkpoint" not in str(caught.value) and str(cache / "stages" / last) in str(caught.value)
