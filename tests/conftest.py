"""Shared fixtures: real Hydra composition, real CLI runs, W&B offline, caches in tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from kdexp.core.records import RECORD_NAME, read_record

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))  # the users' own objectives, importable as in their projects


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """No test talks to a W&B server or writes outside its tmp folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("KDEXP_CACHE_DIR", str(tmp_path / "cache"))


def compose_config(overrides: list[str], tmp_path: Path, keep_hydra: bool = False) -> DictConfig:
    """Compose ``conf/train.yaml`` like the CLI does, with every path under ``tmp_path``."""
    GlobalHydra.instance().clear()
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=base + overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_cli(args: list[str], cache: Path, *, module: str = "kdexp.train", cwd: Path = ROOT, timeout: int = 600,
            extra_env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m kdexp.train ARGS`` (or another module) as a user would, W&B offline.

    The environment is set here, not only by ``offline_wandb``: module-scoped
    fixtures call this before any function-scoped fixture has run.
    """
    env = dict(os.environ)
    env.update({"KDEXP_CACHE_DIR": str(cache), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONPATH": f"{PLUGINS}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    for key, value in (extra_env or {}).items():  # None removes a variable
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_record(folder: Path) -> dict:
    """The run record in ``folder``; fails the test when there is none."""
    record = read_record(folder)
    assert record is not None, f"no readable {RECORD_NAME} in {folder}"
    return record


def records_in(folder: Path) -> list[dict]:
    """The records of every run folder directly under ``folder`` (a sweep or multirun)."""
    return [load_record(p.parent) for p in sorted(folder.glob(f"*/{RECORD_NAME}"))]


# Small, fast settings on scikit-learn digits used by the CLI tests.
DIGITS_FAST = [
    "experiment=digits_smoke",
    "teacher.max_epochs=3",
    "trainer.max_epochs=3",
]


def path_with_fake_srun(folder: Path) -> str:
    """``$PATH`` with an executable ``srun`` first, as on a SLURM login node (Lightning then hints that
    srun is not used): consoles are checked the same whatever the machine has installed."""
    folder.mkdir(parents=True, exist_ok=True)
    srun = folder / "srun"
    srun.write_text("#!/bin/sh\necho 'fake srun of the kdexp tests' >&2\nexit 1\n")
    srun.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
