"""W&B mode is decided before wandb.init: the environment wins, nothing blocks without network."""

from __future__ import annotations

import time

import pytest

from kdexp.errors import ConfigError
from kdexp.tracking import resolve_wandb_mode


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc


def test_environment_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online")[0] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("auto")[0] == "offline"


def test_no_credentials_means_offline(no_credentials):
    mode, reason = resolve_wandb_mode("auto")
    assert mode == "offline" and "no W&B credentials" in reason


def test_key_but_unreachable_server_is_offline_within_seconds(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    mode, reason = resolve_wandb_mode("auto")
    assert mode == "offline" and "unreachable" in reason
    assert time.monotonic() - started < 10


def test_netrc_credentials_are_seen(no_credentials, tmp_path, monkeypatch):
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login user password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert "unreachable" in resolve_wandb_mode("auto")[1]


def test_explicit_mode_and_typos(no_credentials):
    assert resolve_wandb_mode("offline")[0] == "offline"
    with pytest.raises(ConfigError, match="logger.mode must be"):
        resolve_wandb_mode("onlin")
