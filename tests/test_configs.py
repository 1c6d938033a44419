"""Every YAML under conf/ composes and instantiates; every experiment runs one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import CONF_DIR, compose_config
from kdexp.core.config import instantiate, objective_node
from kdexp.core.errors import ConfigError
from kdexp.core.tasks import task_of
from kdexp.train import run

# Options that compose with the MNIST-1D defaults as they are; every other data, teacher
# or student option is an image option and needs image neighbours (see setup_for).
FITS_MNIST1D = {("data", "mnist1d"), ("teacher", "cnn1d"), ("student", "cnn1d"), ("student", "mlp")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


FITS_ANY = {("student", "linear"), ("teacher", "mlp")}  # flatten any input


def is_cifar_net(option: str) -> bool:
    """The CIFAR zoo (kdexp.models.cifar) takes RGB images only."""
    return option.startswith(("resnet", "wrn_", "vgg"))


def setup_for(group: str, option: str) -> list[str]:
    """Overrides for ``group`` (data, teacher or student) = ``option`` to compose with matching neighbours."""
    if (group, option) in FITS_MNIST1D | FITS_ANY:
        return []
    if option == "hf":  # Hugging Face models: a small GPT-2 built from scratch, on the language-model task
        return ["data=stdlib_text", "teacher=hf", "student=hf", "kd=token_kd", "teacher.model.width=32",
                "teacher.model.depth=1", "student.width=16", "student.depth=1",
                "data.max_train_bytes=20000", "data.max_eval_bytes=5000"]
    if option in ("stdlib_text", "gpt"):  # the language-model task: token ids in, (B, L, V) out
        return [*(["data=stdlib_text"] if group != "data" else []), "teacher=gpt", "student=gpt", "kd=token_kd",
                "data.max_train_bytes=20000", "data.max_eval_bytes=5000"]
    if option in ("stdlib_topics", "text_files", "text_encoder"):  # token ids in, one class per sequence out
        data = ["data=stdlib_topics"] if group != "data" else []
        # text_files reads data.path only in setup(): a name is enough to build the module and the models.
        path = ["data.path=unused.csv"] if option == "text_files" else []
        return [*data, *path, "teacher=text_encoder", "student=text_encoder"]
    if is_cifar_net(option):
        return ["data=cifar100", "teacher=cnn2d"]
    return ["teacher=cnn2d"] if group == "data" else ["data=digits", "teacher=cnn2d"]


def model_input(cfg, batch: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A dummy batch of the data's inputs, and the logits' shape a fitting model gives for it."""
    shape = [int(d) for d in cfg.data.input_shape]
    x = torch.zeros(batch, *shape, dtype=getattr(torch, cfg.data.get("input_dtype", "float32")))
    if task_of(cfg).per_position:
        return x, (batch, *shape, cfg.data.num_classes)
    return x, (batch, cfg.data.num_classes)


def test_slurm_launcher_config(tmp_path):
    """kdexp's watched submitit launcher; each job asks the CPUs its run uses (num_threads)."""
    from hydra.utils import instantiate as hydra_instantiate

    cfg = compose_config(["hydra/launcher=slurm"], tmp_path, keep_hydra=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.kdexp_launchers.WatchedSlurmLauncher"
    assert cfg.hydra.launcher.cpus_per_task == cfg.num_threads == 1 and cfg.hydra.launcher.mem_gb == 4
    launcher = hydra_instantiate(cfg.hydra.launcher)
    # By name: Hydra's plugin scan may load submitit's launcher module a second time, as another class object.
    assert [c.__name__ for c in type(launcher).__mro__[:3]] == ["WatchedSlurmLauncher", "WatchedSlurmLauncher",
                                                                "SlurmLauncher"]
    assert launcher.params["cpus_per_task"] == 1 and launcher.params["timeout_min"] == 120
    threads = compose_config(["hydra/launcher=slurm", "num_threads=4"], tmp_path, keep_hydra=True)
    assert hydra_instantiate(threads.hydra.launcher).params["cpus_per_task"] == 4


def test_the_defaults_list_names_every_group():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert groups == {"data", "teacher", "student", "kd", "optimizer", "scheduler", "trainer", "logger",
                      "callbacks", "paths", "hydra", "experiment", "debug", "schedule"}


@pytest.mark.parametrize("option", options("data"))
def test_data_configs(option, tmp_path):
    cfg = compose_config([f"data={option}", *setup_for("data", option)], tmp_path)
    dm = instantiate(cfg.data)
    assert dm.num_classes == cfg.data.num_classes and list(dm.input_shape) == list(cfg.data.input_shape)
    teacher = instantiate(cfg.teacher.model)
    student = instantiate(cfg.student)
    x, expected = model_input(cfg, 2)
    assert teacher(x).shape == student(x).shape == expected


@pytest.mark.parametrize("group", ["teacher", "student"])
def test_model_configs(group, tmp_path):
    for option in options(group):
        cfg = compose_config([f"{group}={option}", *setup_for(group, option)], tmp_path)
        node = cfg.teacher.model if group == "teacher" else cfg.student
        model = instantiate(node)
        x, expected = model_input(cfg, 3)
        assert model(x).shape == expected


def test_a_wrong_pairing_cannot_be_composed_silently(tmp_path):
    cfg = compose_config(["data=digits"], tmp_path)  # default teacher is the 1-D CNN
    with pytest.raises(Exception, match="CNN1D expects 1-D signals"):
        instantiate(cfg.teacher.model)


def test_kd_optimizer_scheduler_configs(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    for kd in options("kd"):
        objective = instantiate(objective_node(compose_config([f"kd={kd}"], tmp_path)))
        assert isinstance(objective, torch.nn.Module)
    for opt in options("optimizer"):
        optimizer = instantiate(compose_config([f"optimizer={opt}"], tmp_path).optimizer)([param])
        assert isinstance(optimizer, torch.optim.Optimizer)
        for sched in options("scheduler"):
            node = compose_config([f"scheduler={sched}"], tmp_path).scheduler
            if node:
                assert isinstance(instantiate(node)(optimizer), torch.optim.lr_scheduler.LRScheduler)
            else:
                assert sched == "none"


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs(option, tmp_path):
    cfg = compose_config([f"trainer={option}"], tmp_path)
    overrides = {}
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        overrides = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}  # composed as-is, built on CPU
    trainer = instantiate(cfg.trainer, **overrides, logger=False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs
    if option == "gpu":
        assert cfg.trainer.precision in ("bf16-mixed", "16-mixed")


def test_logger_and_callback_configs(tmp_path):
    for option in options("logger"):
        node = compose_config([f"logger={option}"], tmp_path).logger
        if not node:
            assert option == "none"
            continue
        factory = instantiate(node)
        assert callable(factory)
        if option == "csv":
            logger = factory(save_dir=tmp_path, run_name="x", job_type="distill", group=None, config={})
            assert isinstance(logger, pl.loggers.CSVLogger)
    for option in options("callbacks"):
        for node in compose_config([f"callbacks={option}"], tmp_path).callbacks.values():
            assert isinstance(instantiate(node), pl.Callback)


# A one-batch teacher scores about chance: allowed here on purpose (a real run refuses it).
ONE_BATCH = ["+teacher.allow_untrained=true", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
             "+trainer.limit_val_batches=1",
             "+trainer.limit_test_batches=1", "teacher.max_epochs=1", "logger=none"]


# debug=fast limits the batches; these shrink the text sets too, whose setup, teacher evaluation
# and teacher outputs would otherwise cover the whole corpus (the suite's time, not what is checked).
TINY_DATA = {"stdlib_lm": ["data.max_train_bytes=20000", "data.max_eval_bytes=5000"],
             "stdlib_topics": ["data.max_train_windows_per_class=40", "data.max_eval_windows_per_class=10"]}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_with_debug_fast(experiment, tmp_path, monkeypatch):
    """``experiment=X debug=fast`` as a user types it: one short epoch for teacher and student.

    The CIFAR-100 files run on tiny CIFAR-100 files this test writes (read by torchvision when
    it is installed, else by tests/test_cifar_zoo.py's stand-in reader), and on the CPU when
    there is no GPU; the text experiments on a sliver of their text (TINY_DATA).
    """
    overrides = [f"experiment={experiment}", "debug=fast", "logger=none", *TINY_DATA.get(experiment, [])]
    if experiment.startswith("cifar100_"):
        from test_cifar_zoo import use_cifar_reader, write_cifar100

        write_cifar100(tmp_path / "data")
        use_cifar_reader(monkeypatch)
        overrides.append(f"paths.data_dir={tmp_path / 'data'}")
        if not torch.cuda.is_available():
            overrides.append("trainer=cpu")
    record = run(compose_config(overrides, tmp_path))
    assert record["status"] == "finished" and record["choices"]["debug"] == "fast"
    assert 1 <= record["global_steps"] <= 5 and 0.0 <= record["metrics"]["test/acc"] <= 1.0
    assert Path(record["checkpoints"]["best"]).is_file()
    # A one-epoch teacher is allowed (debug=fast sets teacher.allow_untrained) and the record says
    # whether it beat chance: the byte-level LM's does not (it predicts the majority byte).
    assert record["config"]["teacher"]["allow_untrained"] is True
    assert isinstance(record["teacher"]["better_than_chance"], bool)
    if experiment == "stdlib_lm":
        assert record["teacher"]["better_than_chance"] is False


def test_invalid_override_is_explained(tmp_path):
    cfg = compose_config(["kd.alpha=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"kd.alpha must lie in \[0, 1\], got 2"):
        instantiate(objective_node(cfg))


def test_the_readme_plug_in_objective_composes_and_trains_one_batch(tmp_path):
    overrides = ["kd._target_=kdexp_test_plugins.MSELogits", "~kd.temperature", "~kd.alpha", "+kd.weight=0.5"]
    cfg = compose_config([*overrides, "experiment=digits_smoke", *ONE_BATCH], tmp_path)
    objective = instantiate(objective_node(cfg))
    assert type(objective).__name__ == "MSELogits" and objective.weight == 0.5
    record = run(cfg)
    assert record["status"] == "finished" and "train/loss_kd" in record["metrics"]
    assert record["run_name"].startswith("distill-mlp64-mselogits-weight0.5-s1")
    assert record["objective"]["knobs"] == ["kd.weight"] and record["metrics"]["train/weight"] == 0.5
