"""Text data: tokenizers, CSV / JSON-lines files for both text tasks, stdlib_topics, the encoder."""

from __future__ import annotations

import csv
import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from kdexp.data.stdlib_topics import PACKAGES, StdlibTopicsDataModule
from kdexp.data.text import split_of, stdlib_files
from kdexp.data.text_files import TextFilesDataModule
from kdexp.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, model_dir_tokenizer_fingerprint
from kdexp.core.errors import ConfigError
from kdexp.models.features import FeatureHooks
from kdexp.models.text_encoder import TextEncoderClassifier
from kdexp.objectives.base import UNLABELLED

PAD = 256  # the byte tokenizer's pad id

ROWS = [  # (text, label): mixed lengths, non-ASCII text, string labels
    ("a fine film", "pos"), ("dull", "neg"), ("héllo wörld, quite a long review that will be cut", "pos"),
    ("meh", "neg"), ("great acting", "pos"), ("bad plot", "neg"), ("loved it", "pos"), ("boring", "neg"),
    ("superb", "pos"), ("awful", "neg"), ("nice", "pos"), ("weak", "neg"),
]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def byte_ids(text: str, length: int) -> list[int]:
    """Independent reference: UTF-8 bytes, truncated and right-padded with 256."""
    ids = list(text.encode("utf-8"))[:length]
    return ids + [PAD] * (length - len(ids))


def module(tmp_path: Path, **kwargs) -> TextFilesDataModule:
    settings = dict(num_classes=2, input_shape=[16], batch_size=4)
    settings.update(kwargs)
    dm = TextFilesDataModule(**settings)
    dm.setup()
    return dm


def rows_of(dm: TextFilesDataModule, split: str) -> list[list[int]]:
    return dm.splits[split].x.tolist()


# -- tokenizers --------------------------------------------------------------
def make_hf_tokenizer(folder: Path, words: list[str]) -> Path:
    """A WordLevel tokenizer with BERT-style [CLS] … [SEP], saved like a model's tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(str(folder))
    return folder


def test_byte_tokenizer_round_trips_utf8():
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer("bytes"), ByteTokenizer)
    text = "naïve café → ✓"
    ids = tok.encode(text)
    assert bytes(ids).decode("utf-8") == text and max(ids) < 256 and len(ids) == len(text.encode())
    assert (tok.vocab_size, tok.pad_id, tok.fingerprint()) == (257, 256, load_tokenizer("bytes").fingerprint())


def test_hf_tokenizer_from_a_directory(tmp_path):
    words = ["good", "bad", "movie"]
    folder = make_hf_tokenizer(tmp_path / "tok", words)
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 4 + len(words) and tok.pad_id == 0
    assert tok.encode("good movie zzz") == [2, 4, 6, 1, 3]  # [CLS] good movie [UNK] [SEP]
    assert tok.encode_batch(["bad", "good bad"]) == [[2, 5, 3], [2, 4, 5, 3]]
    # Stable: a second load (and the model-directory helper) gives the same fingerprint ...
    assert tok.fingerprint() == load_tokenizer(str(folder)).fingerprint() == model_dir_tokenizer_fingerprint(folder)
    # ... and another vocabulary (same size, other words) a different one.
    other = load_tokenizer(str(make_hf_tokenizer(tmp_path / "other", ["good", "bad", "film"])))
    assert other.fingerprint() != tok.fingerprint() != ByteTokenizer().fingerprint()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer directory not found.*data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert model_dir_tokenizer_fingerprint(tmp_path / "model") is None  # a model saved without its tokenizer


# -- text files: sequence classification -------------------------------------
def test_csv_classification_ids_padding_and_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": t, "label": y} for t, y in ROWS])
    val = write_csv(tmp_path / "val.csv", [{"text": "pretty good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    test = write_csv(tmp_path / "test.csv", [{"text": "so-so", "label": "neg"}])
    dm = module(tmp_path, path=str(train), val_path=str(val), test_path=str(test))
    assert dm.task == "sequence_classification" and dm.label_names == ["neg", "pos"]  # sorted
    x, y = dm.splits["train"].x, dm.splits["train"].y
    assert x.dtype == torch.int64 and x.shape == (len(ROWS), 16)
    assert x.tolist() == [byte_ids(t, 16) for t, _ in ROWS]
    assert y.tolist() == [int(label == "pos") for _, label in ROWS]
    assert rows_of(dm, "val") == [byte_ids("pretty good", 16), byte_ids("bad", 16)]
    assert dm.splits["val"].y.tolist() == [1, 0] and dm.splits["test"].y.tolist() == [0]
    assert dm.labelled_train_size == len(ROWS) and (dm.pad_id, dm.vocab_size) == (256, 257)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (4, 16) and batch[0].dtype == torch.int64


def test_jsonl_labels_order_and_integer_labels(tmp_path):
    rows = [{"review": t, "stars": 3 - 2 * (y == "neg"), "extra": 1} for t, y in ROWS]  # labels 1 and 3
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    # CSV gives the same integers as strings: "10" sorts after "3" only as a number.
    val = write_csv(tmp_path / "val.csv", [{"review": "ok", "stars": "3"}, {"review": "no", "stars": "1"}])
    dm = module(tmp_path, path=str(path), val_path=str(val), text_field="review", label_field="stars")
    assert dm.label_names == ["1", "3"] and dm.splits["val"].y.tolist() == [1, 0]
    # data.labels fixes the order: here reversed.
    fixed = module(tmp_path, path=str(path), val_path=str(val), text_field="review", label_field="stars",
                   labels=[3, 1])
    assert fixed.label_names == ["3", "1"]
    assert (fixed.splits["val"].y == 1 - dm.splits["val"].y).all()
    assert (fixed.splits["train"].y + dm.splits["train"].y == 1).all()
    assert fixed.fingerprint() != dm.fingerprint()


def test_split_carved_from_the_training_file(tmp_path):
    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(40)]
    path = write_csv(tmp_path / "all.csv", rows)
    dm = module(tmp_path, path=str(path), val_fraction=0.25, test_fraction=0.1)
    texts = {split: {bytes(v for v in ids if v != PAD).decode() for ids in rows_of(dm, split)} for split in dm.splits}
    assert (len(texts["test"]), len(texts["val"]), len(texts["train"])) == (4, 9, 27)  # 10 %, then 25 % of 36
    assert set.union(*texts.values()) == {r["text"] for r in rows}  # every row once, no split shares one
    assert sum(len(t) for t in texts.values()) == 40
    assert sorted(dm.splits["test"].y.tolist()) == [0, 0, 1, 1]  # stratified
    again = module(tmp_path, path=str(path), val_fraction=0.25, test_fraction=0.1)
    assert again.fingerprint() == dm.fingerprint()  # deterministic
    other = module(tmp_path, path=str(path), val_fraction=0.25, test_fraction=0.1, split_seed=1)
    assert other.fingerprint() != dm.fingerprint()


def test_hf_tokenizer_data_and_fingerprint(tmp_path):
    folder = make_hf_tokenizer(tmp_path / "tok", ["good", "bad", "movie"])
    rows = [{"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}] * 5
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = module(tmp_path, path=str(path), tokenizer=str(folder), vocab_size=7, pad_id=0, input_shape=[6],
                val_fraction=0.2, test_fraction=0.2)
    assert sorted(map(tuple, rows_of(dm, "test"))) == [(2, 4, 6, 3, 0, 0), (2, 5, 6, 3, 0, 0)]  # one of each class
    assert dm.tokenizer_fingerprint == load_tokenizer(str(folder)).fingerprint()
    other = make_hf_tokenizer(tmp_path / "other", ["good", "bad", "movie"])
    # Same ids from an equal tokenizer elsewhere: equal data. The byte tokenizer: other data.
    assert module(tmp_path, path=str(path), tokenizer=str(other), vocab_size=7, pad_id=0, input_shape=[6],
                  val_fraction=0.2, test_fraction=0.2).fingerprint() == dm.fingerprint()
    with pytest.raises(ConfigError, match="data.vocab_size=7"):
        module(tmp_path, path=str(path), tokenizer=str(folder))


# -- text files: causal language modelling -----------------------------------
def expected_lm(prompt: str, text: str, length: int) -> tuple[list[int], list[int]]:
    """Independent reference for one row, position by position."""
    p, t = list(prompt.encode()), list(text.encode())
    ids = (p + t)[:length + 1]
    x, y = [], []
    for j in range(length):
        if j + 1 < len(ids):
            x.append(ids[j])
            y.append(ids[j + 1] if j + 1 >= len(p) else UNLABELLED)  # only completion tokens are targets
        else:
            x.append(PAD)
            y.append(UNLABELLED)
    return x, y


@pytest.mark.parametrize("writer", [write_csv, write_jsonl])
def test_causal_lm_prompt_mask(tmp_path, writer):
    rows = [{"q": "Q: 2+2?", "a": " 4"}, {"q": "Q: hi", "a": " hello there, this is long"}, {"q": "", "a": "xyz"},
            {"q": "a prompt longer than the window", "a": "!"}]
    suffix = ".csv" if writer is write_csv else ".jsonl"
    train = writer(tmp_path / f"train{suffix}", rows)
    val = writer(tmp_path / f"val{suffix}", rows[:1])
    dm = module(tmp_path, path=str(train), val_path=str(val), test_path=str(val), task="causal_lm",
                num_classes=257, text_field="a", prompt_field="q", input_shape=[12])
    x, y = dm.splits["train"].x.tolist(), dm.splits["train"].y.tolist()
    for i, row in enumerate(rows):
        assert (x[i], y[i]) == expected_lm(row["q"], row["a"], 12), row
    # " 4" after a 7-byte prompt: inputs end at "4"'s predecessor, targets are " " and "4" only.
    assert [t for t in y[0] if t != UNLABELLED] == list(b" 4")
    assert all(t == UNLABELLED for t in y[3])  # the prompt fills the window: nothing to learn
    # Without a prompt field, every next byte up to the padding is a target.
    plain = module(tmp_path, path=str(train), val_path=str(val), test_path=str(val), task="causal_lm",
                   num_classes=257, text_field="a", input_shape=[12])
    assert (plain.splits["train"].x.tolist()[1], plain.splits["train"].y.tolist()[1]) == expected_lm(
        "", rows[1]["a"], 12)


def test_causal_lm_needs_the_vocabulary_as_classes(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}] * 4)
    with pytest.raises(ConfigError, match="data.num_classes=257"):
        TextFilesDataModule(num_classes=2, input_shape=[8], path=str(path), task="causal_lm")


# -- text files: bad inputs ---------------------------------------------------
def test_bad_field_lists_the_file_fields(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"sentence": "hi", "label": 0}, {"sentence": "yo", "label": 1}] * 5)
    with pytest.raises(ConfigError, match=r"data.text_field=text is not a field .* its fields: sentence, label"):
        module(tmp_path, path=str(path))
    with pytest.raises(ConfigError, match=r"data.label_field=y is not a field"):
        module(tmp_path, path=str(path), text_field="sentence", label_field="y")


def test_unseen_label_and_class_count(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"text": t, "label": y} for t, y in ROWS])
    val = write_csv(tmp_path / "val.csv", [{"text": "x", "label": "neutral"}])
    with pytest.raises(ConfigError, match="labels that the training data .* does not: neutral"):
        module(tmp_path, path=str(train), val_path=str(val))
    with pytest.raises(ConfigError, match="labels that data.labels does not: pos"):
        module(tmp_path, path=str(train), labels=["neg", "neutral"])
    with pytest.raises(ConfigError, match=r"has 2 classes .* data.num_classes=2"):
        module(tmp_path, path=str(train), num_classes=3)
    with pytest.raises(ConfigError, match=r"has 3 classes .* data.num_classes=3"):
        module(tmp_path, path=str(train), val_path=str(val), labels=["neg", "neutral", "pos"])


def test_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="set data.path=.* or data.hub="):
        TextFilesDataModule(num_classes=2, input_shape=[8])
    (tmp_path / "t.txt").write_text("text,label\nhi,0\n")
    with pytest.raises(ConfigError, match="unknown file type '.txt'"):
        module(tmp_path, path=str(tmp_path / "t.txt"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ConfigError, match="holds no rows"):
        module(tmp_path, path=str(tmp_path / "empty.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="holds no rows"):
        module(tmp_path, path=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match="no such file"):
        module(tmp_path, path=str(tmp_path / "nope.csv"))
    with pytest.raises(ConfigError, match="data.vocab_size=257"):
        TextFilesDataModule(num_classes=2, input_shape=[8], path="x.csv", vocab_size=300)
    with pytest.raises(ConfigError, match="data.pad_id=256"):
        TextFilesDataModule(num_classes=2, input_shape=[8], path="x.csv", pad_id=0)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_without_the_datasets_package(tmp_path):
    dm = TextFilesDataModule(num_classes=2, input_shape=[8], hub="glue/sst2", text_field="sentence")
    with pytest.raises(ConfigError, match="pip install datasets"):
        dm.setup()


# -- stdlib_topics ------------------------------------------------------------
@pytest.fixture(scope="module")
def topics() -> StdlibTopicsDataModule:
    dm = StdlibTopicsDataModule(input_shape=[64], max_train_windows_per_class=60, max_eval_windows_per_class=20)
    dm.setup()
    return dm


def test_stdlib_topics_holds_out_files(topics):
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = {"train": set(), "val": set(), "test": set()}
    for package in PACKAGES:  # independent: every file of the packages, split by its path
        for path in stdlib_files(root / package):
            relative = path.relative_to(root).as_posix()
            expected[split_of(relative, 15, 15)].add(relative)
    for split, files in topics.files.items():
        assert files and set(files) <= expected[split]
    assert not set(topics.files["train"]) & set(topics.files["val"])
    assert not set(topics.files["train"]) & set(topics.files["test"])
    assert not set(topics.files["val"]) & set(topics.files["test"])


def test_stdlib_topics_labels_are_the_package_of_origin(topics):
    root = Path(sysconfig.get_paths()["stdlib"])
    assert topics.num_classes == len(PACKAGES) == len(topics.label_names) == 8
    for split in ("train", "test"):
        texts = {p: [(root / f).read_bytes() for f in topics.files[split] if f.split("/")[0] == p] for p in PACKAGES}
        s = topics.splits[split]
        assert s.x.shape[1:] == (64,) and s.x.dtype == torch.int64 and int(s.x.max()) < 256  # full windows, no pad
        assert sorted(set(s.y.tolist())) == list(range(8))
        assert max(torch.bincount(s.y).tolist()) <= (60 if split == "train" else 20)
        for ids, label in zip(s.x.tolist(), s.y.tolist()):
            window = bytes(ids)
            assert any(window in text for text in texts[PACKAGES[label]]), (split, PACKAGES[label])


def test_stdlib_topics_checks_its_config():
    with pytest.raises(ConfigError, match="data.num_classes=8"):
        StdlibTopicsDataModule(num_classes=10)
    with pytest.raises(ConfigError, match="no package 'nonexistent'"):
        StdlibTopicsDataModule(num_classes=2, packages=["json", "nonexistent"]).setup()
    with pytest.raises(ConfigError, match="data.pad_id=256"):
        StdlibTopicsDataModule(pad_id=0)


# -- the encoder ---------------------------------------------------------------
def test_encoder_ignores_padding_and_exposes_taps():
    torch.manual_seed(0)
    model = TextEncoderClassifier([32], num_classes=5, vocab_size=257, pad_id=PAD, width=32, depth=2).eval()
    tokens = torch.randint(0, 256, (3, 9))
    short = torch.cat([tokens, torch.full((3, 3), PAD)], dim=1)  # padded to 12
    long = torch.cat([tokens, torch.full((3, 23), PAD)], dim=1)  # padded to 32
    hooks = FeatureHooks(model, ["blocks.0", "blocks.1", "pooled"])
    with torch.no_grad():
        a, b = model(short), model(long)
    taps = hooks.pop()
    assert a.shape == b.shape == (3, 5)
    assert torch.allclose(a, b, atol=1e-5)
    assert taps["blocks.1"].shape == (3, 32, 32) and taps["pooled"].shape == (3, 32)
    # Padding is not ignored by accident: other tokens give other logits, and an all-pad row is finite.
    with torch.no_grad():
        assert not torch.allclose(model(long.roll(1, dims=0)), b)
        assert torch.isfinite(model(torch.full((2, 32), PAD))).all()
    with pytest.raises(ConfigError, match="multiple of heads"):
        TextEncoderClassifier([32], num_classes=5, vocab_size=257, pad_id=PAD, width=30, heads=4)
