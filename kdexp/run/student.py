"""What every engine states about a student run: its data sizes, objective label, run name and W&B
config (the single-run engine and the pack engine write the same)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kdexp.core.config import choice, to_plain
from kdexp.core.tracking import wandb_run_config
from kdexp.data.base import InMemoryDataModule
from kdexp.objectives.base import DistillationObjective
from kdexp.schedules import Schedule
from kdexp.teachers.chain import route_tag
from kdexp.teachers.provision import Teacher


def data_sizes(datamodule: InMemoryDataModule) -> dict[str, int]:
    """The split sizes a record states (a transfer set's inputs counted apart from the labelled ones)."""
    return {"train_labelled": datamodule.labelled_train_size,
            "train_transfer": len(datamodule.splits["train"].x) - datamodule.labelled_train_size,
            "val": len(datamodule.splits["val"].x), "test": len(datamodule.splits["test"].x)}


def objective_label(objective: DistillationObjective, schedules: dict[str, Schedule]) -> str:
    """The objective's own label plus its schedules: ``hinton-T4-a0.9-alpha~lin0-0.9e20``."""
    return "-".join([objective.describe(), *(f"{name}~{s.describe()}" for name, s in schedules.items())])


def run_name_for(cfg: DictConfig, job_type: str, objective_label: str) -> str:
    """``distill-mlp16-hinton-T4-a0.9-s1``; through a chain, the route too: ``distill-mlp16-via48-32-hinton-…``."""
    width = cfg.student.get("width", "")
    route = f"{route_tag(cfg)}-" if route_tag(cfg) else ""
    return f"{job_type}-{choice(cfg, 'student')}{width}-{route}{objective_label}-s{cfg.seed}"  # finetune-gpt64-ce-s1


def student_wandb_config(cfg: DictConfig, record: dict[str, Any], teacher: Teacher) -> dict[str, Any]:
    """A student run's W&B config: the resolved config plus what its record states (job type,
    teacher, data, parameters, objective, teacher outputs, lineage, the SLURM job it ran in)."""
    slurm = {"slurm": record["slurm"]} if "slurm" in record else {}
    return wandb_run_config(to_plain(cfg), job_type=record["job_type"], teacher_hash=teacher.weights_hash,
                            teacher_test_acc=teacher.test_acc, data_fingerprint=record["data_fingerprint"],
                            student_parameters=record["parameters"], output_dir=str(record["output_dir"]),
                            objective=record["objective"], teacher_outputs=record["teacher_outputs"],
                            stage=len(teacher.lineage), lineage=teacher.lineage, **slurm)
