"""The CIFAR zoo (CRD / DKD benchmark nets), CIFAR augmentation, and their configs.

CIFAR-100 is read from tiny files this test writes in torchvision's format (20 train
and 10 test images), through the real ``TorchvisionDataModule``. When torchvision is
not usable here (it is an optional extra), a stand-in for ``torchvision.datasets.CIFAR100``
that reads the pickles the way torchvision does takes its place, so everything after
the file reader (file checks, layout, splits, batching, augmentation, normalisation)
is still the real code; the test of torchvision's own reader is then skipped.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import compose_config
from kdexp.core.config import instantiate, objective_node
from kdexp.data import IndexBatches, TorchvisionDataModule
from kdexp.data.vision import random_crop_flip
from kdexp.core.errors import ConfigError
from kdexp.models import FeatureHooks, count_parameters
from kdexp.models import cifar

ARCHS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
         "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg13"]
N_TRAIN, N_TEST = 20, 10


def _torchvision_usable() -> bool:
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:
        return False
    return True


# --- fake CIFAR-100 files -------------------------------------------------------------


def write_cifar100(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``cifar-100-python/{train,test,meta}`` as torchvision expects them; returns the NCHW images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        images[split] = x
        entry = {"data": x.reshape(n, -1), "fine_labels": [int(i % 7) for i in range(n)],
                 "coarse_labels": [0] * n, "filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return images


class _StandInCIFAR100:
    """Reads the files as ``torchvision.datasets.CIFAR100`` does: ``data`` (N, H, W, C) uint8, ``targets``."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        with open(Path(root) / "cifar-100-python" / ("train" if train else "test"), "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # a file this test wrote
        self.data = entry["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = entry["fine_labels"]


def use_cifar_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the data module read the fake files: torchvision without its checksums, or the stand-in."""
    if _torchvision_usable():
        import torchvision.datasets.cifar as tv_cifar

        monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)  # fake files, other md5s
        monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    else:
        monkeypatch.setattr(TorchvisionDataModule, "_torchvision_class", lambda self: _StandInCIFAR100)


def cifar100_module(root: Path, **kwargs) -> TorchvisionDataModule:
    options = {"batch_size": 2, "eval_batch_size": 4, "shuffle_seed": 0, "augment": True, **kwargs}
    return TorchvisionDataModule("cifar100", num_classes=100, input_shape=(3, 32, 32), data_dir=str(root), **options)


@pytest.fixture(scope="module")
def cifar_batch(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented, normalised training batch of 2 images from the real CIFAR-100 data module."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    with pytest.MonkeyPatch.context() as mp:
        use_cifar_reader(mp)
        dm = cifar100_module(root)
        dm.setup()
    x, y, _ = next(iter(dm.train_dataloader()))
    return x, y


# --- architectures ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_trains_on_cifar_batches(name, cifar_batch):
    x, y = cifar_batch
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    model = getattr(cifar, name)(in_shape=(3, 32, 32), num_classes=100)
    logits = model(x)
    assert logits.shape == (2, 100)
    F.cross_entropy(logits, y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# Published sizes on CIFAR-100 (the CRD / DKD / ReviewKD tables), in millions of parameters.
PUBLISHED_MILLIONS = {"resnet56": 0.86, "resnet110": 1.74, "resnet8x4": 1.23, "resnet32x4": 7.43,
                      "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_match_the_published_nets(name):
    count = count_parameters(getattr(cifar, name)((3, 32, 32), 100))
    assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.05)


def _stage_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    names = [n for n, _ in model.named_children() if n.startswith("stage") or n == "pre_logits"]
    hooks = FeatureHooks(model, names)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return {name: tuple(f.shape[1:]) for name, f in hooks.pop().items()}


# Channels of stage1, stage2, … at width 1 (the last one is also the pre_logits size).
STAGE_CHANNELS = {"resnet8x4": (64, 128, 256), "resnet32x4": (64, 128, 256), "wrn_16_2": (32, 64, 128),
                  "wrn_40_2": (32, 64, 128), "vgg8": (64, 128, 256, 512, 512), "vgg13": (64, 128, 256, 512, 512)}


def _expected_stages(name: str, width: float) -> dict[str, tuple[int, ...]]:
    channels = STAGE_CHANNELS.get(name, (16, 32, 64))
    sizes = (16, 8, 4, 4, 4) if name.startswith("vgg") else (32, 16, 8)  # VGG pools inside stages 1–3
    stages = {f"stage{i}": (int(c * width), s, s) for i, (c, s) in enumerate(zip(channels, sizes), start=1)}
    return {**stages, "pre_logits": (int(channels[-1] * width),)}


@pytest.mark.parametrize("name", ARCHS)
def test_named_stages_and_half_width(name):
    build = getattr(cifar, name)
    full, half = build((3, 32, 32), 100), build((3, 32, 32), 100, width=0.5)
    assert _stage_shapes(full) == _expected_stages(name, 1)
    assert _stage_shapes(half) == _expected_stages(name, 0.5)  # every channel count halves…
    assert 0.24 < count_parameters(half) / count_parameters(full) < 0.28  # …so the weights quarter (+ head, BN)
    half.train()
    F.cross_entropy(half(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()


def test_width_rounds_half_up_and_never_reaches_zero():
    assert _stage_shapes(cifar.resnet20((3, 32, 32), 10, width=0.3))["stage1"][0] == 5  # 16 · 0.3 = 4.8
    assert _stage_shapes(cifar.resnet20((3, 32, 32), 10, width=2))["stage3"][0] == 128
    assert _stage_shapes(cifar.vgg8((3, 32, 32), 10, width=0.125 / 16))["stage1"][0] == 1  # 64 · w = 0.5 → 1
    tiny = cifar.wrn_16_2((3, 32, 32), 10, width=0.001)
    assert set(_stage_shapes(tiny).values()) >= {(1, 32, 32), (1, 16, 16), (1, 8, 8)}
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_other_image_sizes_keep_the_stages():
    # VGG pools after block 4 only for 64×64 inputs, as CRD's does; ResNets pool globally.
    vgg = cifar.vgg8((3, 64, 64), 10)
    hooks = FeatureHooks(vgg, ["stage4", "stage5"])
    vgg(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[2:]) for f in hooks.pop().values()] == [(4, 4), (4, 4)]
    assert cifar.resnet8x4((3, 40, 40), 10)(torch.zeros(2, 3, 40, 40)).shape == (2, 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"in_shape": (1, 28, 28)}, r"resnet8x4 expects RGB images \(data.input_shape \[3, H, W\].*got \[1, 28, 28\]"),
    ({"in_shape": (40,)}, r"resnet8x4 expects RGB images.*got \[40\]"),
    ({"width": 0}, r"resnet8x4: width is a channel multiplier and must be a positive number.*got 0"),
    ({"width": True}, r"width is a channel multiplier"),
    ({"width": float("nan")}, r"width is a channel multiplier"),
    ({"num_classes": 1}, r"resnet8x4: num_classes must be >= 2"),
])
def test_bad_arguments_are_explained(kwargs, message):
    args = {"in_shape": (3, 32, 32), "num_classes": 100, **kwargs}
    with pytest.raises(ConfigError, match=message):
        cifar.resnet8x4(**args)


def test_bad_arguments_name_every_family():
    for build, name in ((cifar.wrn_40_2, "wrn_40_2"), (cifar.vgg13, "vgg13"), (cifar.resnet110, "resnet110")):
        with pytest.raises(ConfigError, match=f"{name} expects RGB images"):
            build((1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"depth must be 6n \+ 4"):
        cifar.WideResNet((3, 32, 32), 10, depth=18, k=2)
    with pytest.raises(ConfigError, match=r"depth must be 6n \+ 2"):
        cifar.CifarResNet((3, 32, 32), 10, depth=18)


# --- augmentation -----------------------------------------------------------------------


def test_crop_flip_keeps_shape_and_dtype_and_moves_a_known_pattern():
    x = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :, :16] = 200  # left half bright
    out = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    left, right = out[:, 0, 16, :8].float().mean(1), out[:, 0, 16, -8:].float().mean(1)
    flipped = right > left
    assert 10 < int(flipped.sum()) < 54  # about half are mirrored
    # A crop shifts by up to 4 pixels and pads with black: some rows/columns are zero, never more than 4.
    zero_rows = out.amax(dim=(1, 3)) == 0  # (B, H)
    assert zero_rows.sum(1).max() <= 4 and zero_rows.any()
    assert set(out.unique().tolist()) <= {0, 200}


def test_crop_flip_matches_a_per_image_reference():
    """Each output is pad(x)[top:top+32, left:left+32], mirrored when flipped — torchvision's semantics."""
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    top, left = torch.randint(0, 9, (6, 1), generator=g), torch.randint(0, 9, (6, 1), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        ref = padded[i, :, top[i, 0]:top[i, 0] + 32, left[i, 0]:left[i, 0] + 32]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    images = write_cifar100(tmp_path / "data")
    use_cifar_reader(monkeypatch)
    return tmp_path / "data", images


def _train_epoch(dm: TorchvisionDataModule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = dm.train_dataloader()
    batches.epoch = epoch
    return [(x, index) for x, _, index in batches]


def test_augmentation_is_seeded_and_only_touches_training_batches(cifar_root):
    root, images = cifar_root
    dm = cifar100_module(root)
    plain = cifar100_module(root, augment=False)
    assert type(plain.train_dataloader()) is IndexBatches  # augment=false: the loader as before, untouched
    first, again = _train_epoch(dm, 0), _train_epoch(cifar100_module(root), 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    # Same order as without augmentation (the shuffle is untouched), different pixels.
    unaugmented = _train_epoch(plain, 0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, unaugmented))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, unaugmented))
    assert all(a[0].shape == (2, 3, 32, 32) for a in first)
    # Another epoch or another shuffle seed augments differently.
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, _train_epoch(dm, 1)))
    assert not torch.equal(_train_epoch(cifar100_module(root, shuffle_seed=5), 0)[0][0], first[0][0])
    # Validation, test and eval batches are exactly the unaugmented ones.
    for split in ("val", "test"):
        loader = getattr(dm, f"{split}_dataloader")()
        reference = getattr(plain, f"{split}_dataloader")()
        assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, reference))
    assert torch.equal(next(iter(dm.eval_batches("train")))[0], next(iter(plain.eval_batches("train")))[0])
    # The loaded pixels are the written ones, in NCHW, normalised per channel.
    x, _, index = next(iter(dm.eval_batches("test")))
    mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
    raw = torch.from_numpy(images["test"][index.numpy()]).float() / 255
    assert torch.allclose(x, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-6)


def test_a_batch_is_augmented_the_same_way_when_resumed_mid_epoch(cifar_root):
    root, _ = cifar_root
    straight = _train_epoch(cifar100_module(root), 2)
    loader = cifar100_module(root).train_dataloader()
    loader.epoch = 2
    loader.load_state_dict({"epoch": 2, "batches_done": 3})
    resumed = [(x, index) for x, _, index in loader]
    assert len(resumed) == len(straight) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, straight[3:]))


def test_flips_and_crops_come_through_the_data_module(tmp_path, monkeypatch):
    """A left-bright / right-dark image comes out mirrored for some samples and shifted for some."""
    root = tmp_path / "data"
    write_cifar100(root)
    folder = root / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        entry = pickle.load(f)
    pattern = np.zeros((N_TRAIN, 3, 32, 32), dtype=np.uint8)
    pattern[..., :16] = 255
    entry["data"] = pattern.reshape(N_TRAIN, -1)
    with open(folder / "train", "wb") as f:
        pickle.dump(entry, f)
    use_cifar_reader(monkeypatch)
    dm = cifar100_module(root, augment=True)
    x = torch.cat([b for epoch in range(3) for b, _ in _train_epoch(dm, epoch)])  # (3 · 18, 3, 32, 32)
    pixel = x[:, 0, 16]  # the middle row of the red channel, normalised
    bright_left = pixel[:, :8].mean(1) > pixel[:, -8:].mean(1)
    assert bright_left.any() and (~bright_left).any()  # some mirrored, some not
    bright = {tuple((row == x[:, 0].max()).tolist()) for row in pixel[bright_left]}
    assert len(bright) > 1  # the bright block sits at different columns: shifted by the crop
    assert all(sum(cols) in range(12, 17) for cols in bright)  # 16 columns, up to 4 cut off by padding


@pytest.mark.skipif(not _torchvision_usable(), reason="torchvision (the vision extra) is not installed here; "
                    "its CIFAR reader is replaced by a stand-in in the other tests")
def test_torchvision_reads_the_written_files(cifar_root):
    root, images = cifar_root
    dm = cifar100_module(root, augment=False)
    dm.setup()
    assert len(dm.splits["test"].y) == N_TEST and dm.splits["test"].x.dtype == torch.uint8
    assert np.array_equal(dm.splits["test"].x.numpy(), images["test"])


# --- configs ------------------------------------------------------------------------------


@pytest.mark.slow  # builds every CIFAR net at full size; test_configs builds each model config
@pytest.mark.parametrize("group", ["student", "teacher"])
def test_every_cifar_model_config_builds_for_cifar100(group, tmp_path):
    for name in ARCHS:
        neighbour = "teacher=cnn2d" if group == "student" else "student=cnn2d"
        cfg = compose_config([f"{group}={name}", "data=cifar100", neighbour], tmp_path)
        node = cfg.teacher.model if group == "teacher" else cfg.student
        assert node._target_ == f"kdexp.models.cifar.{name}" and node.width == 1
        model = instantiate(node)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
        if group == "teacher":
            assert cfg.teacher.max_epochs == 240 and cfg.teacher.checkpoint is None and cfg.teacher.seed == 0
            opt = instantiate(cfg.teacher.optimizer)(model.parameters())
            assert isinstance(opt, torch.optim.SGD)
            assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.9
            assert opt.defaults["weight_decay"] == 5e-4


def test_cifar_data_configs_augment_and_mnist_does_not(tmp_path):
    for data, augment in (("cifar10", True), ("cifar100", True), ("mnist", False), ("fashion_mnist", False)):
        cfg = compose_config([f"data={data}", "teacher=cnn2d", "student=cnn2d"], tmp_path)
        assert instantiate(cfg.data).augment is augment


@pytest.mark.parametrize("experiment", ["cifar100_crd_kd", "cifar100_crd_dkd"])
def test_crd_experiments_hold_the_published_protocol(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.data.dataset == "cifar100" and cfg.data.batch_size == 64 and cfg.data.augment is True
    assert cfg.teacher.model._target_.endswith("resnet32x4") and cfg.student._target_.endswith("resnet8x4")
    assert cfg.trainer.max_epochs == 240 and cfg.trainer.accelerator == "gpu"
    objective = instantiate(objective_node(cfg))
    if experiment.endswith("_kd"):
        assert type(objective).__name__ == "HintonKD" and (cfg.kd.alpha, cfg.kd.temperature) == (0.9, 4.0)
    else:
        assert type(objective).__name__ == "DKD"
        assert (cfg.kd.beta, cfg.kd.temperature, cfg.kd.warmup_epochs) == (8.0, 4.0, 20)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.optimizer)([param])
    assert optimizer.defaults == {**optimizer.defaults, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                                  "nesterov": False}
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(240):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # once per epoch, as Lightning does for this scheduler
    for epoch, lr in ((0, 0.05), (149, 0.05), (150, 0.005), (179, 0.005), (180, 5e-4), (210, 5e-5), (239, 5e-5)):
        assert lrs[epoch] == pytest.approx(lr)


@pytest.mark.parametrize("experiment", ["cifar100_crd_kd", "cifar100_crd_dkd"])
def test_crd_experiments_run_one_batch_on_cpu(experiment, tmp_path, monkeypatch):
    """The experiment end to end (teacher trained for one batch, student distilled), on the fake files."""
    from kdexp.train import run

    write_cifar100(tmp_path / "data")
    use_cifar_reader(monkeypatch)
    cfg = compose_config([f"experiment={experiment}", "trainer=cpu", f"paths.data_dir={tmp_path / 'data'}",
                          "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
                          "+trainer.limit_test_batches=1", "teacher.max_epochs=1", "logger=none",
                          "data.eval_batch_size=16", "+teacher.allow_untrained=true"], tmp_path)
    record = run(cfg)
    assert record["status"] == "finished" and record["global_steps"] == 1
    assert 0.0 <= record["metrics"]["test/acc"] <= 1.0
