"""The embedded causal-LM task: stdlib text split by file, a causal GPT, token KD end to end."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from kdexp.data.text import SEPARATOR, StdlibTextDataModule, split_of, stdlib_files
from kdexp.core.errors import ConfigError
from kdexp.models.gpt import TinyGPT
from kdexp.objectives.base import UNLABELLED
from kdexp.teachers.quality import evaluate_accuracy
from kdexp.train import run
from kdexp.run.validation import validate_config

SMALL = ["data=stdlib_text", "teacher=gpt", "student=gpt", "kd=token_kd", "data.max_train_bytes=40000",
         "data.max_eval_bytes=8000", "data.input_shape=[32]", "teacher.model.width=32", "teacher.model.depth=1",
         "student.width=16", "student.depth=1", "teacher.max_epochs=2", "trainer.max_epochs=2", "logger=none"]


def test_files_not_windows_are_split_and_targets_are_the_next_byte():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    splits = {name: {f for f in files if split_of(f, 5, 5) == name} for name in ("train", "val", "test")}
    assert sum(len(s) for s in splits.values()) == len(files) and all(splits.values())
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"])
    dm = StdlibTextDataModule(input_shape=[16], max_train_bytes=5000, max_eval_bytes=2000)
    dm.setup()
    for split in dm.splits.values():
        assert torch.equal(split.x[:, 1:], split.y[:, :-1])  # y is x shifted by one byte
        assert int(split.x.max()) < 256
    train = dm.splits["train"]
    assert torch.equal(train.x[1:, 0], train.y[:-1, -1])  # training windows continue the text
    assert len(train.x) == 4999 // 16 and len(dm.splits["val"].x) == len(dm.splits["test"].x) == 1999 // 16
    with pytest.raises(ConfigError, match="byte-level"):
        StdlibTextDataModule(num_classes=100)


def bigram_scores(dm: StdlibTextDataModule) -> dict[str, tuple[float, float]]:
    """(next-byte accuracy, bits per byte) on val and test of a bigram model counted on train
    (add-one smoothed): a model-free measure of how alike the two held-out sets are."""
    train = dm.splits["train"]
    counts = torch.bincount((train.x * 256 + train.y).flatten(), minlength=256 * 256).view(256, 256) + 1
    log2p = (counts / counts.sum(1, keepdim=True)).log2()
    return {name: (float((counts.argmax(1)[split.x] == split.y).float().mean()), float(-log2p[split.x, split.y].mean()))
            for name, split in dm.splits.items() if name != "train"}


def test_validation_and_test_are_samples_of_the_same_text():
    """Spread over all of their files, the held-out sets agree within the margin kdexp.data.text
    states (2 points of accuracy, 0.1 bits per byte); from their first files they are 8 points apart."""
    dm = StdlibTextDataModule(max_train_bytes=300_000, max_eval_bytes=100_000)  # conf/data/stdlib_text's budget
    dm.setup()
    scores = bigram_scores(dm)
    (val_acc, val_bpb), (test_acc, test_bpb) = scores["val"], scores["test"]
    assert abs(val_acc - test_acc) < 0.02 and abs(val_bpb - test_bpb) < 0.1, scores
    assert 0.3 < test_acc < 0.45  # a bigram model's level on source code: the windows are real text
    root = Path(sysconfig.get_paths()["stdlib"])
    text = SEPARATOR.join(p.read_bytes() for p in stdlib_files(root)
                          if split_of(p.relative_to(root).as_posix(), 5, 5) == "test")
    test = dm.splits["test"]
    assert len(test.x) == 99_999 // 128 < len(text) // 128 // 4  # a quarter of the text or less ...
    assert bytes(test.x[0].tolist()) == text[:128] and bytes(test.y[-1].tolist()) == text[-128:]  # ... end to end


def test_the_model_is_causal():
    torch.manual_seed(0)
    model = TinyGPT([12], 256, width=16, depth=2, heads=2).eval()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_accuracy_counts_labelled_positions_only():
    class Echo(torch.nn.Module):
        def forward(self, x):  # predicts the input byte itself at every position
            return torch.nn.functional.one_hot(x, 256).float()

    x = torch.tensor([[1, 2, 3, 4]])
    y = torch.tensor([[1, 9, UNLABELLED, UNLABELLED]])
    assert evaluate_accuracy(Echo(), [(x, y, torch.tensor([0]))]) == 0.5


def test_a_byte_level_teacher_is_distilled_token_by_token(tmp_path):
    record = run(compose_config([*SMALL, f"paths.output_dir={tmp_path / 'run'}"], tmp_path))
    m = record["metrics"]
    assert record["status"] == "finished" and record["objective"]["name"] == "token_kd"
    assert m["test/bpb"] == pytest.approx(m["test/nll"] / math.log(2), rel=1e-5)
    assert m["test/ppl"] == pytest.approx(math.exp(m["test/nll"]), rel=1e-4)
    assert 0 < m["test/agreement"] <= 1 and m["test/kl_teacher"] > 0
    assert m["test/acc"] > m["val/acc_init"]  # it learnt something in two epochs
    assert m["test/bpb"] < 8.0  # better than a uniform guess over 256 bytes
    assert record["teacher_outputs"]["source"] == "cache"  # (N, L, V) logits small enough here
    # The teacher's own test figures, for the reference row of a report on bpb, nll or ppl
    assert m["teacher/test_bpb"] == pytest.approx(m["teacher/test_nll"] / math.log(2), rel=1e-5)
    assert m["teacher/test_ppl"] == pytest.approx(math.exp(m["teacher/test_nll"]), rel=1e-4)
    assert record["teacher"]["better_than_chance"] is True


def test_a_class_logit_objective_is_refused_for_a_language_model(tmp_path):
    with pytest.raises(ConfigError, match="language-model task"):
        validate_config(compose_config([*SMALL, "kd=hinton"], tmp_path))
    with pytest.raises(ConfigError, match=r"student=.* cannot take data=.* inputs of shape \[32\]"):
        validate_config(compose_config([*SMALL, "student=mlp"], tmp_path))


@pytest.mark.slow  # the objective's math is tested in test_token_kd; this is the end-to-end wiring
def test_hidden_state_kd_runs_on_the_language_model(tmp_path):
    record = run(compose_config([*SMALL, "kd=hidden_kd", "trainer.max_epochs=1", "schedule=alpha_warmup",
                                 f"paths.output_dir={tmp_path / 'hidden'}"], tmp_path))
    assert record["status"] == "finished" and record["objective"]["name"] == "hidden_kd"
    assert record["metrics"]["train/loss_hidden"] > 0 and "train/alpha" in record["metrics"]


def test_fine_tuning_after_distillation_starts_from_the_distilled_student(tmp_path):
    from kdexp.core.errors import CheckpointError
    from kdexp.teachers.provision import load_teacher_weights, weights_hash

    distilled = run(compose_config([*SMALL, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'kd'}"], tmp_path))
    best = distilled["checkpoints"]["best"]
    tuned = run(compose_config([*SMALL, "kd=none", "trainer.max_epochs=1", f"init_from={best}",
                                f"paths.output_dir={tmp_path / 'ft'}"], tmp_path))
    student = load_teacher_weights(TinyGPT([32], 256, width=16, depth=1), best, 256)
    assert tuned["job_type"] == "finetune" and tuned["init_from"]["hash"] == weights_hash(student)
    assert tuned["init_from"]["run"] == distilled["run_name"]
    assert tuned["metrics"]["val/acc_init"] == pytest.approx(distilled["metrics"]["val/acc_best"], abs=1e-6)
    with pytest.raises(CheckpointError, match="init_from checkpoint not found"):
        run(compose_config([*SMALL, "kd=none", f"init_from={tmp_path / 'nope.ckpt'}",
                            f"paths.output_dir={tmp_path / 'bad'}"], tmp_path))
    with pytest.raises(CheckpointError, match="does not match student model"):
        run(compose_config([*SMALL, "kd=none", "student.width=32", f"init_from={best}",
                            f"paths.output_dir={tmp_path / 'bad2'}"], tmp_path))


def test_a_bf16_teacher_is_held_in_bf16_and_gives_float32_outputs_close_to_float32(tmp_path):
    from kdexp.run.modules import DistillationModule
    from kdexp.objectives.token_kd import TokenKD

    torch.manual_seed(0)
    teacher = TinyGPT([16], 256, width=32, depth=1).eval()
    x = torch.randint(0, 256, (2, 16))
    full = teacher(x).detach()
    module = DistillationModule(model=TinyGPT([16], 256, width=16, depth=1), teacher=teacher.to(torch.bfloat16),
                                optimizer=torch.optim.Adam, num_classes=256, objective=TokenKD())
    out = module.teacher_outputs(x, torch.arange(2), "train")
    assert next(teacher.parameters()).dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    assert torch.allclose(out.logits, full, atol=0.1) and not torch.equal(out.logits, full)
    record = run(compose_config([*SMALL, "trainer.max_epochs=1", "teacher.dtype=bfloat16",
                                 f"paths.output_dir={tmp_path / 'bf16'}"], tmp_path))
    assert record["status"] == "finished" and record["config"]["teacher"]["dtype"] == "bfloat16"


def test_top_k_outputs_keep_each_top_probability_and_the_rest_mass_exactly():
    from kdexp.teachers.outputs import compute_split

    torch.manual_seed(0)
    teacher = TinyGPT([16], 256, width=32, depth=1).eval()
    x = torch.randint(0, 256, (6, 16))
    batches = [(x, x, torch.arange(6))]
    full, top = compute_split(teacher, batches), compute_split(teacher, batches, topk=8)
    assert top.logits.shape == (6, 16, 8) and top.topk_indices.dtype == torch.int32 and top.vocab == 256
    p_full = full.take(torch.arange(6)).logits.softmax(-1)
    p_top = top.take(torch.arange(6)).logits.softmax(-1)
    idx = top.topk_indices.long()
    assert torch.allclose(p_top.gather(-1, idx), p_full.gather(-1, idx), atol=1e-6)  # each top-k probability
    rest = 1 - p_full.gather(-1, idx).sum(-1)
    assert torch.allclose(1 - p_top.gather(-1, idx).sum(-1), rest, atol=1e-5)  # the remaining mass in total
    everything = compute_split(teacher, batches, topk=256).take(torch.arange(6)).logits
    assert torch.allclose(everything, full.take(torch.arange(6)).logits, atol=1e-5)  # k = V is the full row


def test_saved_top_k_predictions_feed_a_student_run(tmp_path, capsys):
    from kdexp.cli import main as cli_main
    from kdexp.teachers.outputs import read_store

    out = tmp_path / "lm-top8.pt"
    compose_config([], tmp_path)
    assert cli_main(["predict", "--out", str(out), "--topk", "8", *SMALL, f"paths.cache_dir={tmp_path / 'cache'}"]) == 0
    assert "bytes per position" in capsys.readouterr().out
    store = read_store(out)
    assert store.manifest["topk"] == 8 and store.splits["train"].logits.shape[-1] == 8
    record = run(compose_config([*SMALL, "trainer.max_epochs=1", f"teacher.predictions={out}",
                                 f"paths.output_dir={tmp_path / 'student'}"], tmp_path))
    assert record["status"] == "finished" and record["teacher_outputs"]["source"] == "predictions"
    cached = run(compose_config([*SMALL, "trainer.max_epochs=1", "kd.cache_topk=8",
                                 f"paths.output_dir={tmp_path / 'cached'}"], tmp_path))
    assert cached["teacher_outputs"]["topk"] == 8
    assert cached["metrics"]["test/acc"] == pytest.approx(record["metrics"]["test/acc"], abs=1e-6)
