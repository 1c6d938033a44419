"""``kdexp export RUN --out DIR``: a finished run's student as a Hugging Face model directory.

The distilled student of a ``student=hf`` run is written with ``save_pretrained`` (plus the
data's tokenizer when it is a Hugging Face one), so ``AutoModelFor*.from_pretrained(DIR)``,
``pipeline(...)`` or a later ``student.pretrained=DIR`` stage load it. ``kdexp_export.json``
beside it says which run, checkpoint and weights it holds.

    kdexp export outputs/runs/2026-11-23/20-01-02 --out students/gpt2-w64   [--checkpoint last]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdexp.core.config import instantiate
from kdexp.core.errors import ConfigError
from kdexp.core.records import read_record
from kdexp.data.tokenizer import load_tokenizer
from kdexp.teachers.provision import CheckpointRole, load_teacher_weights, weights_hash


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdexp export", description="Write a finished run's student (student=hf) as a "
                                "Hugging Face model directory that from_pretrained loads.")
    p.add_argument("run", type=Path, help="the run's folder (it holds run_record.json and checkpoints/)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (never overwritten without --force)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best: the best-validation weights the run's test/acc reports (default); last: the last epoch's")
    p.add_argument("--force", action="store_true", help="write into an existing --out")
    return p


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf


    args = parser().parse_args(argv)
    record = read_record(args.run)
    if record is None:
        raise ConfigError(f"{args.run} holds no run record (run_record.json): give the folder of a kdexp run.")
    if record.get("status") != "finished":
        raise ConfigError(f"run {args.run} is {record.get('status')!r}, not finished: its weights are not the "
                          "result its record would describe. Finish or rerun it first.")
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"{out} already exists and is never overwritten; choose another --out or pass --force.")
    config = OmegaConf.create(record["config"])
    student = instantiate(config.student, what="student")
    if not hasattr(student, "save_pretrained"):
        raise ConfigError(f"the run's student ({config.student._target_}) is not a Hugging Face model; its weights "
                          f"are in {args.run / 'checkpoints'} (load them with torch.load).")
    checkpoint = args.run / "checkpoints" / f"{args.checkpoint}.ckpt"
    role = CheckpointRole("run checkpoint", "student", f"The run folder holds no {checkpoint.name}; choose "
                          "--checkpoint best or last, whichever it has", "Was the run folder's config edited?")
    load_teacher_weights(student, checkpoint, int(config.data.num_classes), role)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer = config.data.get("tokenizer")
    if tokenizer and tokenizer != "bytes":  # the student reads ids of this tokenizer: ship it alongside

        load_tokenizer(str(tokenizer)).tokenizer.save_pretrained(str(out))
    note = {"run": str(args.run.resolve()), "run_name": record.get("run_name"), "checkpoint": str(checkpoint),
            "weights_hash": weights_hash(student), "task": record.get("task"),
            "metrics": {k: v for k, v in (record.get("metrics") or {}).items() if k.startswith("test/")}}
    (out / "kdexp_export.json").write_text(json.dumps(note, indent=2) + "\n")
    print(f"Wrote {out}: {record.get('run_name')} ({args.checkpoint}.ckpt, weights {note['weights_hash']}). "
          f"Load it with transformers' AutoModel classes' from_pretrained('{out}').")
    return 0
