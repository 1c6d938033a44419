"""W&B mode is decided before wandb.init: the environment wins, nothing blocks without network."""

from __future__ import annotations

import time

import pytest

from kdexp.core.errors import ConfigError
from kdexp.core.tracking import resolve_wandb_mode


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


@pytest.mark.parametrize("source", ["logger.mode", "WANDB_MODE"])
def test_online_with_an_unreachable_server_goes_offline(no_credentials, monkeypatch, source):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # refuses connections
    if source == "WANDB_MODE":
        monkeypatch.setenv("WANDB_MODE", "online")
    mode, reason = resolve_wandb_mode("online")
    assert mode == "offline" and "unreachable" in reason


def test_a_run_asked_to_log_online_without_a_server_finishes_offline(tmp_path):
    """The real CLI: logger.mode=online, a key, and a W&B address that refuses connections."""
    from conftest import DIGITS_FAST, load_record, run_cli

    started = time.monotonic()
    proc = run_cli([*DIGITS_FAST, "logger.mode=online", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path / "cache",
                   extra_env={"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
                              "WANDB_DIR": str(tmp_path), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "does not answer: logging offline" in proc.stderr
    record = load_record(tmp_path / "r")
    assert record["status"] == "finished" and record["wandb"]["mode"] == "offline"
    assert time.monotonic() - started < 120  # never the ~90 s wandb.init stall


def test_a_rejected_key_switches_the_run_to_offline(tmp_path):
    """A local server that answers every request with 401, like W&B for a bad key."""
    import http.server
    import threading

    from conftest import DIGITS_FAST, load_record, run_cli

    class Deny(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors":[{"message":"invalid api key"}]}')

        do_GET = do_POST = do_PUT = _deny

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_cli([*DIGITS_FAST, "logger.mode=online", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path / "cache",
                       extra_env={"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "HOME": str(tmp_path),
                                  "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_port}",
                                  "WANDB_DIR": str(tmp_path)})
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not start an online run" in proc.stderr and "logging this run offline" in proc.stderr
    record = load_record(tmp_path / "r")
    assert record["status"] == "finished" and record["wandb"]["mode"] == "offline"
