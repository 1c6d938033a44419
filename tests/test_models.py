"""The model zoo: shapes, the MNIST-1D paper's parameter count, clear errors on bad pairings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdexp.core.errors import ConfigError
from kdexp.models import CNN1D, CNN2D, MLP, FeatureHooks, count_parameters


def test_cnn1d_is_the_paper_model():
    assert count_parameters(CNN1D([40], 10, width=25)) == 5210
    assert CNN1D([40], 10)(torch.randn(7, 40)).shape == (7, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn2d_serves_all_image_sizes(shape):
    assert CNN2D(shape, 100, width=4)(torch.randn(2, *shape)).shape == (2, 100)


def test_mlp_width_sets_capacity():
    small, large = MLP([40], 10, width=128), MLP([40], 10, width=512)
    assert count_parameters(small) == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert count_parameters(large) > 4 * count_parameters(small)


@pytest.mark.parametrize("build,match", [
    (lambda: MLP([40], 10, width=0), "width must be a positive integer"),
    (lambda: CNN1D([40], 10, width=-3), "width must be a positive integer"),
    (lambda: CNN1D([1, 8, 8], 10), "CNN1D expects 1-D signals"),
    (lambda: CNN2D([40], 10), "CNN2D expects images"),
    (lambda: MLP([40], 1), "num_classes must be >= 2"),
])
def test_bad_model_config_is_explained(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_feature_hooks_capture_by_path_and_explain_typos():
    model = MLP([40], 10, width=16)
    hooks = FeatureHooks(model, ["stage1"])  # the first hidden layer, after its ReLU
    model(torch.randn(3, 40))
    features = hooks.pop()
    assert features["stage1"].shape == (3, 16) and (features["stage1"] >= 0).all()
    assert hooks.pop() == {}
    hooks.remove()
    with pytest.raises(ConfigError, match="no submodule 'stage9'.*available: .*pre_logits, stage1"):
        FeatureHooks(model, ["stage9"])
    assert isinstance(model.get_submodule("head"), nn.Linear)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_stage_names_mean_the_same_block_at_every_input_size(shape):
    """stageK is always the K-th conv block (width · 2^(K-1) channels); pre_logits is the head's input."""
    model = CNN2D(shape, 10, width=4)
    hooks = FeatureHooks(model, ["stage1", "stage2", "stage3", "pre_logits"])
    model(torch.randn(2, *shape))
    features = hooks.pop()
    assert [features[f"stage{k}"].shape[1] for k in (1, 2, 3)] == [4, 8, 16]
    assert features["pre_logits"].shape == (2, 16)
    assert isinstance(model.stage1[0], nn.Conv2d) and isinstance(model.stage3[0], nn.Conv2d)


@pytest.mark.parametrize("model, shapes", [
    (MLP([40], 10, width=16, depth=3), {"stage1": (2, 16), "stage3": (2, 16), "pre_logits": (2, 16)}),
    (CNN1D([40], 10, width=8), {"stage1": (2, 8, 19), "stage3": (2, 8, 5), "pre_logits": (2, 40)}),
])
def test_every_zoo_model_names_its_stages(model, shapes):
    hooks = FeatureHooks(model, list(shapes))
    model(torch.randn(2, 40))
    assert {k: tuple(v.shape) for k, v in hooks.pop().items()} == shapes
