"""Hugging Face models as teachers and students: built from scratch, loaded with from_pretrained
from directories the tests write (no network), run end to end, and refused with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import compose_config, load_record, run_cli
from kdexp.cli import main as cli_main
from kdexp.core.errors import CheckpointError, ConfigError
from kdexp.models.features import FeatureHooks
from kdexp.models.hf import HFModel, pretrained_identity
from kdexp.teachers.provision import weights_hash
from kdexp.teachers.outputs import read_store
from kdexp.train import run

transformers = pytest.importorskip("transformers")

CONTEXT = 24
SMALL_TEXT = ["data=stdlib_text", "data.max_train_bytes=24000", "data.max_eval_bytes=6000",
              f"data.input_shape=[{CONTEXT}]", "kd=token_kd", "student=hf", "student.width=16", "student.depth=1",
              "trainer.max_epochs=1"]


def save_tiny_gpt2(folder: Path, seed: int = 0, vocab: int = 256) -> Path:
    """A GPT-2 of 20k parameters saved as a user's fine-tuned model would be (save_pretrained)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, vocab_size=vocab,
                                     bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("llama", "causal_lm"),
                                         ("bert", "sequence_classification"),
                                         ("distilbert", "sequence_classification")])
def test_width_and_depth_are_hidden_size_and_layers(family, task):
    classes = 257 if task == "causal_lm" else 3
    model = HFModel([16], classes, task=task, family=family, width=32, depth=3, heads=4, vocab_size=257, pad_id=256)
    assert int(model.hf.get_input_embeddings().embedding_dim) == 32
    assert sorted(model.tap_aliases) == ["blocks.0", "blocks.1", "blocks.2", "pre_logits"]
    hooks = FeatureHooks(model, ["blocks.2"])
    logits = model(torch.randint(0, 256, (2, 16)))
    assert tuple(logits.shape) == ((2, 16, 257) if task == "causal_lm" else (2, 3))
    assert tuple(hooks.pop()["blocks.2"].shape) == (2, 16, 32)  # the third layer's hidden states


def test_padding_never_changes_a_classification():
    torch.manual_seed(0)
    model = HFModel([20], 3, task="sequence_classification", family="bert", width=32, depth=2,
                    vocab_size=257, pad_id=256).eval()
    text = torch.randint(0, 256, (1, 9))
    short = torch.cat([text, torch.full((1, 3), 256)], dim=1)
    long = torch.cat([text, torch.full((1, 11), 256)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(short), model(long), atol=1e-5)


def test_a_causal_model_never_reads_ahead():
    torch.manual_seed(0)
    model = HFModel([12], 256, family="llama", width=32, depth=2).eval()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_a_saved_model_loads_with_its_weights(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2")
    original = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    loaded = HFModel([CONTEXT], 256, pretrained=str(folder)).eval()
    tokens = torch.randint(0, 256, (2, CONTEXT))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), original(tokens).logits)
    assert pretrained_identity(str(folder)) == pretrained_identity(str(folder))
    other = save_tiny_gpt2(tmp_path / "other", seed=1)
    assert pretrained_identity(str(other)) != pretrained_identity(str(folder))  # the key follows the weights


def test_a_wrong_model_path_or_an_unreachable_hub_name_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="pretrained model directory not found"):
        HFModel([CONTEXT], 256, pretrained=str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no Hugging Face model"):
        HFModel([CONTEXT], 256, pretrained=str(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import: as if set before
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ConfigError, match="cannot load the pretrained model 'kdexp-tests/no-such-model'.*network"):
        HFModel([CONTEXT], 256, pretrained="kdexp-tests/no-such-model")


def test_a_vocabulary_that_does_not_fit_the_data_is_refused(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2", vocab=100)
    with pytest.raises(ConfigError, match="vocabulary has 100 tokens but the data's tokenizer has 256"):
        HFModel([CONTEXT], 256, pretrained=str(folder))


# -- end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """A saved GPT-2 teacher, fine-tuned on the text (once, cached), distilled into a from-scratch
    GPT-2 student through the real CLI; then saved predictions and a teacher-free run."""
    root = tmp_path_factory.mktemp("hf")
    pretrained = save_tiny_gpt2(root / "teacher-gpt2")
    teacher = ["teacher=hf", f"teacher.model.pretrained={pretrained}", "teacher.max_epochs=3",
               "teacher.optimizer.lr=0.003"]  # past the most-frequent-byte plateau (31 %)
    common = [*SMALL_TEXT, *teacher, f"paths.cache_dir={root / 'cache'}"]
    cli = run_cli([*common, f"hydra.run.dir={root / 'cli'}", "logger=wandb"], cache=root / "cache",
                  extra_env={"WANDB_DIR": str(root)})
    assert cli.returncode == 0, cli.stderr[-3000:]

    def in_process(name: str, *extra: str) -> dict:
        return run(compose_config([*common, "logger=none", f"paths.output_dir={root / name}", *extra], root))

    predictions = root / "predictions.pt"
    compose_config([], root)
    assert cli_main(["predict", "--out", str(predictions), *common]) == 0
    from_file = in_process("predictions", f"teacher.predictions={predictions}")
    unloaded = in_process("unloaded", f"teacher.predictions={predictions}", "teacher.load=false")
    return {"root": root, "pretrained": pretrained, "common": common, "cli": load_record(root / "cli"),
            "predictions": from_file, "unloaded": unloaded, "file": predictions,
            "in_process": in_process}


def test_a_saved_hf_teacher_distils_into_an_hf_student_through_the_cli(hf_runs):
    record = hf_runs["cli"]
    assert record["status"] == "finished" and record["task"] == "causal_lm" and record["epochs"] == 1
    assert record["config"]["task"] == "causal_lm"  # task=auto, stated as what it resolved to
    teacher = record["teacher"]
    assert teacher["source"] == "trained" and teacher["verified"]  # fine-tuned from the saved weights, cached
    original = HFModel([CONTEXT], 256, pretrained=str(hf_runs["pretrained"]))
    assert teacher["hash"] != weights_hash(original)  # fine-tuning changed it ...
    assert teacher["test_acc"] > 1.5 / 256  # ... into something better than chance
    assert record["metrics"]["test/bpb"] > 0 and "test/agreement" in record["metrics"]
    assert record["wandb"]["mode"] == "offline" and Path(record["wandb"]["dir"]).is_dir()  # a real W&B run
    assert list(Path(record["wandb"]["dir"]).glob("*.wandb"))
    ckpt = torch.load(hf_runs["root"] / "cli" / "checkpoints" / "best.ckpt", weights_only=True)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"model", "val_acc_best"}  # never the teacher


def test_saved_predictions_equal_the_online_teacher_and_can_replace_loading_it(hf_runs):
    cached, from_file, unloaded = hf_runs["cli"], hf_runs["predictions"], hf_runs["unloaded"]
    assert cached["teacher_outputs"]["source"] == "cache" and from_file["teacher_outputs"]["source"] == "predictions"
    for key in ("test/nll", "test/kl_teacher", "test/agreement", "train/loss", "val/acc_best"):
        assert from_file["metrics"][key] == pytest.approx(cached["metrics"][key], abs=1e-4), key
        assert unloaded["metrics"][key] == from_file["metrics"][key], key  # the same outputs, read the same way
    assert unloaded["teacher"]["verified"] is False and unloaded["teacher"]["source"] == "predictions"
    assert unloaded["teacher"]["hash"] == from_file["teacher"]["hash"]
    # The file holds the teacher's logits: equal to a fresh forward pass of the cached fine-tuned teacher.
    store = read_store(hf_runs["file"])
    cached = torch.load(Path(hf_runs["cli"]["teacher"]["path"]), weights_only=True)
    teacher = HFModel([CONTEXT], 256, pretrained=str(hf_runs["pretrained"]))
    teacher.load_state_dict(cached["state_dict"])
    from kdexp.data.text import StdlibTextDataModule

    data = StdlibTextDataModule(input_shape=[CONTEXT], max_train_bytes=24000, max_eval_bytes=6000)
    x, _, index = next(iter(data.eval_batches("val")))
    with torch.no_grad():
        expected = teacher.eval()(x)
    assert torch.allclose(store.outputs("val", index).logits, expected, atol=1e-4)


def test_a_predictions_file_from_another_teacher_is_refused(hf_runs):
    other = save_tiny_gpt2(hf_runs["root"] / "other-gpt2", seed=3)
    with pytest.raises(CheckpointError, match="teacher_hash: file"):
        hf_runs["in_process"]("other", f"teacher.predictions={hf_runs['file']}", f"teacher.model.pretrained={other}")


def test_a_random_pretrained_teacher_used_as_it_is_is_refused(hf_runs):
    with pytest.raises(CheckpointError, match="no better than chance"):
        hf_runs["in_process"]("as_is", "teacher.max_epochs=0")
    with pytest.raises(ConfigError, match="teacher.max_epochs=0"):
        hf_runs["in_process"]("scratch", "teacher.max_epochs=0", "teacher.model.pretrained=null")
    with pytest.raises(ConfigError, match="teacher.load=false"):
        hf_runs["in_process"]("no_file", "teacher.load=false")


def test_the_distilled_student_exports_as_a_hugging_face_model(hf_runs, tmp_path, capsys):
    run_dir = hf_runs["root"] / "cli"
    out = tmp_path / "student"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["n_embd"] == 16 and config["n_layer"] == 1  # student.width and student.depth
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    for name, tensor in exported.state_dict().items():  # the best-validation weights, as trained
        assert torch.equal(tensor, best[f"model.hf.{name}"]), name
    assert json.loads((out / "kdexp_export.json").read_text())["run_name"] == hf_runs["cli"]["run_name"]
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 2  # never overwritten
    assert "never overwritten" in capsys.readouterr().err


# -- sequence classification with a saved tokenizer ------------------------------------------
POSITIVE, NEGATIVE = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "film", "was", "plot", "and", "very", "acting", "music", "a", "it"]


def save_tokenizer(folder: Path, words: list[str]) -> int:
    """A word-level tokenizer, saved as a user's would be; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                                      unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    tokenizer.save_pretrained(folder)
    return len(vocab)


def write_reviews(path: Path, rows: int, seed: int) -> None:
    """Short 'reviews' whose label is carried by one sentiment word among filler words."""
    rng = torch.Generator().manual_seed(seed)
    with path.open("w") as handle:
        for i in range(rows):
            label = i % 2
            words = [FILLER[int(j)] for j in torch.randint(0, len(FILLER), (6,), generator=rng)]
            pool = POSITIVE if label else NEGATIVE
            words.insert(int(torch.randint(0, 6, (1,), generator=rng)), pool[int(torch.randint(0, 4, (1,), generator=rng))])
            handle.write(json.dumps({"text": " ".join(words), "label": "pos" if label else "neg"}) + "\n")


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    root = tmp_path_factory.mktemp("reviews")
    vocab = save_tokenizer(root / "teacher", [*POSITIVE, *NEGATIVE, *FILLER])
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=16, vocab_size=vocab, num_labels=2, pad_token_id=0)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "teacher")
    write_reviews(root / "reviews.jsonl", 600, seed=0)
    overrides = ["data=text_files", f"data.path={root / 'reviews.jsonl'}", f"data.tokenizer={root / 'teacher'}",
                 f"data.vocab_size={vocab}", "data.pad_id=0", "data.input_shape=[12]", "data.batch_size=32",
                 "teacher=hf", f"teacher.model.pretrained={root / 'teacher'}", "teacher.max_epochs=4",
                 "student=hf", "student.family=distilbert", "student.width=16", "student.depth=1",
                 "kd=hinton", "trainer.max_epochs=8", "optimizer.lr=0.005", "logger=none",
                 f"paths.cache_dir={root / 'cache'}"]
    return root, overrides


def test_a_bert_teacher_distils_into_a_distilbert_student_on_labelled_text(reviews):
    root, overrides = reviews
    record = run(compose_config([*overrides, f"paths.output_dir={root / 'run'}"], root))
    assert record["status"] == "finished" and record["task"] == "sequence_classification"
    assert record["teacher"]["test_acc"] > 0.9  # the sentiment word decides the label: a fine-tuned BERT finds it
    assert record["metrics"]["test/acc"] > 0.75 and record["metrics"]["test/agreement"] > 0.75  # it learned it too
    assert record["data_sizes"]["train_labelled"] + record["data_sizes"]["val"] + record["data_sizes"]["test"] == 600
    out = root / "exported"  # the distilled student, ready for transformers, with the tokenizer it reads
    assert cli_main(["export", str(root / "run"), "--out", str(out)]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tokenizer(["the film was great", "the plot was awful"], return_tensors="pt", padding="max_length",
                      max_length=12)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert predicted == [1, 0]  # labels in sorted order: neg = 0, pos = 1


def test_a_tokenizer_mismatch_between_teacher_and_data_is_refused(reviews):
    root, overrides = reviews
    save_tokenizer(root / "other-tokenizer", [*reversed(FILLER), *NEGATIVE, *POSITIVE])  # same words, other ids
    mismatched = [o for o in overrides if not o.startswith("data.tokenizer=")] + [
        f"data.tokenizer={root / 'other-tokenizer'}"]
    with pytest.raises(ConfigError, match="tokenizer mismatch: the teacher .* not supported"):
        run(compose_config([*mismatched, f"paths.output_dir={root / 'mismatch'}"], root))
    assert not (root / "mismatch" / "checkpoints").exists()  # refused before anything was trained


class RunsCode:
    """Pickled, it asks the loader to call ``os.system(touch MARKER)``: a weights-only load refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_that_would_run_code_are_refused_in_kdexp_words(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "gpt2")
    for weights in folder.glob("*.safetensors"):  # only the pickle is left for from_pretrained to read
        weights.unlink()
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as direct:
        HFModel([CONTEXT], 256, pretrained=str(folder))
    cfg = compose_config([*SMALL_TEXT, "teacher=hf", f"teacher.model.pretrained={folder}", "logger=none"], tmp_path)
    with pytest.raises(CheckpointError) as through_a_run:
        run(cfg)
    for message in (str(direct.value), str(through_a_run.value)):
        assert f"{folder} (pytorch_model.bin): loading it would run code" in message and "was not loaded" in message
        assert "weights_only=False" not in message and "does not fit" not in message
    assert not marker.exists()
