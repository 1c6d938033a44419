"""DDP across processes, for real: ``trainer=ddp_cpu`` runs two gloo ranks on this machine through the
command line a user types. One run folder, record and W&B run (rank 0's); one teacher and one set of
teacher outputs, provisioned by rank 0 and loaded by rank 1; validation and test over the whole split;
the same best epoch on every rank; and the metrics of one process training on the same global batches.

The comparison: 2 ranks × ``data.batch_size=64`` step on the same 128 samples as one process with
``data.batch_size=128`` (rank r takes batch 2s+r of the same permutation at step s), so for a
per-sample objective (Hinton KD, an MLP without BatchNorm) both compute the same updates, but sum
them in another order: DDP averages two 64-sample mean gradients, one process takes one 128-sample
mean. That is float32 rounding (~6e-8 relative per operation), so the tolerance is 1e-5 relative and
1e-6 absolute; counted metrics (accuracy, agreement) come out equal. The training split is chosen to
be a multiple of 128 (1,280 samples): otherwise DDP leaves out each epoch's last partial pair of batches.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import socket

import pytest
import torch

from conftest import ROOT, compose_config, load_record, run_cli
from kdexp.core.errors import ConfigError
from kdexp.data.batches import IndexBatches
from kdexp.run.metrics import EvalMetrics

# digits: 1,438 train+val images; val_fraction 0.1099 holds out 158, leaving 1,280 = 10 × 128 to train on.
BASE = ["experiment=digits_smoke", "teacher.max_epochs=3", "trainer.max_epochs=3", "data.val_fraction=0.1099"]
DDP = [*BASE, "trainer=ddp_cpu", "data.batch_size=64"]
SINGLE = [*BASE, "trainer=cpu", "data.batch_size=128"]
REL, ABS = 1e-5, 1e-6
RUN_FILES = {".hydra", ".kdexp.lock", ".kdexp.owner", "checkpoints", "run_record.json", "train.log", "wandb"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One DDP run (it trains the teacher), then one single-process run with the DDP run's teacher."""
    base = tmp_path_factory.mktemp("ddp")
    env = {"WANDB_DIR": str(base)}
    ddp = run_cli([*DDP, "verbose=true", f"hydra.run.dir={base / 'ddp'}"], base / "cache", extra_env=env)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    teachers = sorted((base / "cache" / "teachers").glob("*/teacher.pt"))
    assert len(teachers) == 1, teachers
    single = run_cli([*SINGLE, f"teacher.checkpoint={teachers[0]}", f"hydra.run.dir={base / 'single'}"],
                     base / "cache", extra_env=env)
    assert single.returncode == 0, single.stderr[-4000:]
    return base, ddp, load_record(base / "ddp"), load_record(base / "single")


def test_the_ddp_record_says_finished_with_both_ranks(runs):
    _, _, record, _ = runs
    assert record["status"] == "finished" and "error" not in record
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["backend"] == "gloo"
    assert [view["rank"] for view in record["distributed"]["ranks"]] == [0, 1]
    assert record["epochs"] == 3 and record["global_steps"] == 30  # 10 steps of 2 × 64 samples per epoch


def test_one_folder_one_record_one_wandb_run_written_by_rank_zero(runs):
    base, _, record, _ = runs
    folder = base / "ddp"
    assert {p.name for p in folder.iterdir()} == RUN_FILES  # no train_ddp_process_1.log, no second record
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    wandb_runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and wandb_runs[0].name.endswith(record["wandb"]["id"])
    overrides = (folder / ".hydra" / "overrides.yaml").read_text()
    assert "trainer=ddp_cpu" in overrides and "train_ddp_process" not in overrides  # rank 0's, not rank 1's
    log = (folder / "train.log").read_text()
    assert "[rank 1]" not in log and "finished: test/acc" in log


def test_rank_zero_provisions_the_teacher_and_its_outputs_and_rank_one_loads_them(runs):
    base, ddp, record, _ = runs
    console = ddp.stdout + ddp.stderr  # verbose=true: rank 1 says what it loads too, marked [rank 1]
    assert console.count("No cached teacher under") == 1 and "[rank 1] No cached teacher" not in console
    assert console.count("[rank 1] Reusing cached teacher") == 1
    assert console.count("Teacher outputs computed") == 1 and "[rank 1] Teacher outputs computed" not in console
    assert record["teacher"]["source"] == "trained" and record["teacher_outputs"]["computed"] is True
    assert len(list((base / "cache" / "teacher_outputs").glob("*/outputs.pt"))) == 1
    # Trained in one process: the cache entry is the one a one-process run with the same settings uses.
    from kdexp.teachers.provision import trained_teacher_key

    one_process = compose_config([*BASE, "trainer=cpu", "data.batch_size=64"], base)
    assert record["teacher"]["cache_key"] == trained_teacher_key(one_process)


def test_metrics_equal_one_process_on_the_same_global_batches(runs):
    _, _, ddp, single = runs
    assert ddp["teacher"]["hash"] == single["teacher"]["hash"]
    assert ddp["data_fingerprint"] == single["data_fingerprint"] and ddp["global_steps"] == single["global_steps"]
    assert set(ddp["metrics"]) == set(single["metrics"])
    differ = {k: (ddp["metrics"][k], single["metrics"][k]) for k in ddp["metrics"]
              if not math.isclose(ddp["metrics"][k], single["metrics"][k], rel_tol=REL, abs_tol=ABS)}
    assert not differ
    assert ddp["metrics"]["test/acc"] > 0.3  # a trained student, not two equal untrained ones


def test_evaluation_covers_the_whole_split(runs):
    _, _, record, _ = runs
    sizes = record["data_sizes"]
    assert sizes["test"] == 359 and sizes["val"] == 158
    # 359 is prime: an accuracy over one rank's ~180 samples is no multiple of 1/359 (but 0 or 1).
    for name in ("test/acc", "test/acc_last", "test/agreement"):
        correct = record["metrics"][name] * 359
        assert abs(correct - round(correct)) < 1e-3 and 0 < round(correct) < 359, (name, correct)


def test_every_rank_selects_the_same_best_checkpoint(runs):
    base, _, record, _ = runs
    views = record["distributed"]["ranks"]
    assert {json.dumps({k: v for k, v in view.items() if k != "rank"}) for view in views} == \
        {json.dumps({k: v for k, v in views[0].items() if k != "rank"})}
    assert views[0]["best_checkpoint"] == str(base / "ddp" / "checkpoints" / "best.ckpt")
    assert views[0]["best_val_score"] == pytest.approx(record["metrics"]["val/acc_best"], abs=1e-7)


# -- the parts, without a Trainer ------------------------------------------------------
@pytest.mark.parametrize("n, world, batch", [(10, 2, 3), (7, 3, 2), (2, 3, 4)])
def test_evaluation_shards_take_every_sample_exactly_once(n, world, batch):
    x, y = torch.zeros(n, 1), torch.arange(n)
    seen = [torch.cat([i for _, _, i in IndexBatches(x, y, batch, rank=r, world_size=world)] or [torch.zeros(0)])
            for r in range(world)]
    assert sorted(torch.cat(seen).long().tolist()) == list(range(n))
    for r in range(world):
        assert len(IndexBatches(x, y, batch, rank=r, world_size=world)) == math.ceil(len(seen[r]) / batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_metrics(rank: int, port: int, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor,
                  results: multiprocessing.Queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metrics = EvalMetrics(5)
    if rank == 0:  # rank 1 evaluates nothing: a split smaller than the number of ranks
        metrics.update(logits, targets, teacher)
    results.put((rank, {k: float(v) for k, v in metrics.compute().items()}))
    torch.distributed.destroy_process_group()


def test_eval_metrics_all_reduce_over_gloo_also_from_a_rank_without_samples():
    torch.manual_seed(0)
    logits, targets, teacher = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randn(6, 5)
    alone = EvalMetrics(5)
    alone.update(logits, targets, teacher)
    expected = {k: float(v) for k, v in alone.compute().items()}
    context = multiprocessing.get_context("spawn")  # not fork: this process has run torch (OpenMP) already
    results, port = context.Queue(), _free_port()
    workers = [context.Process(target=_rank_metrics, args=(r, port, logits, targets, teacher, results))
               for r in (0, 1)]
    for worker in workers:
        worker.start()
    got = dict(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert got[0] == got[1] == expected  # both ranks report the whole split; agreement and kl_teacher too


# -- refused with a message ------------------------------------------------------------
def test_ddp_in_a_sweep_is_refused_before_anything_runs(tmp_path):
    sweep = run_cli(["sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--pack", "4", "--dir", str(tmp_path / "s"),
                     "trainer=ddp_cpu", "seed=1", "student.width=16"], tmp_path / "cache", module="kdexp.cli")
    assert sweep.returncode == 2, sweep.stderr[-2000:]
    assert "cannot run inside a sweep" in sweep.stderr and "nothing was run" in sweep.stderr
    assert not (tmp_path / "s").exists()


def test_ddp_in_a_hydra_multirun_is_refused_and_writes_nothing(tmp_path):
    multirun = run_cli(["-m", "experiment=digits_smoke", "trainer=ddp_cpu", "seed=1",
                        f"hydra.sweep.dir={tmp_path / 'm'}"], tmp_path / "cache")
    assert "cannot run inside a sweep" in multirun.stderr
    assert [p for p in (tmp_path / "m").rglob("*") if p.is_file() and p.name != "multirun.yaml"] == []


def test_ddp_that_kdexp_cannot_start_is_refused(tmp_path):
    from kdexp.train import run

    spawn = run_cli(["experiment=digits_smoke", "trainer=ddp_cpu", "trainer.strategy=ddp_spawn",
                     f"hydra.run.dir={tmp_path / 'spawn'}"], tmp_path / "cache")
    assert spawn.returncode == 2 and "trainer.strategy=ddp_spawn is not supported" in spawn.stderr
    assert not any((tmp_path / "spawn").iterdir())
    torchrun = run_cli(["experiment=digits_smoke", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'torchrun'}"],
                       tmp_path / "cache", extra_env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert torchrun.returncode == 2 and "Ranks started by another launcher are not supported" in torchrun.stderr
    assert not any((tmp_path / "torchrun").iterdir())
    cfg = compose_config(["experiment=digits_smoke", "trainer=ddp_cpu"], tmp_path)
    with pytest.raises(ConfigError, match="from the command line only"):
        run(cfg)


@pytest.mark.slow  # end to end; a third DDP launch
def test_a_rank_that_fails_before_joining_leaves_a_failed_record(runs, tmp_path):
    base = runs[0]  # its cached teacher: rank 0 goes straight to fit, where it waits for rank 1 to join
    broken = run_cli([*DDP, "kd._target_=kdexp_test_plugins.HintonKDBrokenInRankOne", f"hydra.run.dir={tmp_path / 'r'}"],
                     base / "cache")
    assert broken.returncode != 0 and "this objective is broken in rank 1" in broken.stderr
    record = load_record(tmp_path / "r")
    assert record["status"] == "failed" and "DDP rank 1" in record["error"]["message"], record.get("error")
