"""tide_ds.failfast in one process: exit status, one message per job, the fault hook, the watchdog's record."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tide_ds import failfast
from tide_ds.errors import ConfigError
from tide_ds.trainer.divergence import Diverged

ROOT = Path(__file__).resolve().parents[2]


def test_exit_codes() -> None:
    assert failfast.exit_code(ConfigError("x")) == 2
    assert failfast.exit_code(ValueError("x")) == 1  # not a ConfigError: a bug
    assert failfast.exit_code(RuntimeError("x")) == 1
    assert failfast.exit_code(Diverged("x")) == 65
    assert failfast.exit_code(KeyboardInterrupt()) == 130
    assert failfast.exit_code(SystemExit(3)) == 3


def test_peer_loss_is_recognised() -> None:
    assert failfast.is_peer_loss(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"))
    assert not failfast.is_peer_loss(RuntimeError("shape mismatch"))


def test_fault_hook(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(failfast.FAULT_ENV, "save@3:1,resume:0")
    failfast.fault("resume")  # rank 0 only
    failfast.fault("save", 2)  # step 3 only
    with pytest.raises(failfast.InjectedFault, match=r"injected fault at 'save@3' on rank 1"):
        failfast.fault("save", 3)
    monkeypatch.delenv(failfast.FAULT_ENV)
    failfast.fault("save", 3)


def _rank(rank: int, port: int, body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent("""
        from tide_ds import failfast
        from tide_ds.errors import ConfigError
        def body():
            BODY
        failfast.run(body)
    """).replace("BODY", body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_the_same_error_on_two_ranks_is_printed_once() -> None:
    """Both 'ranks' (one parent: this test, one job key) raise the same ConfigError: one message, both exit 2."""
    port = 20000 + os.getpid() % 20000
    first = _rank(0, port, "raise ConfigError('train.output_dir is wrong')")
    second = _rank(1, port, "raise ConfigError('train.output_dir is wrong')")
    third = _rank(1, port, "raise RuntimeError('Connection closed by peer')")
    assert (first.returncode, second.returncode, third.returncode) == (2, 2, 1)
    assert first.stderr == "tide-ds: error (rank 0): train.output_dir is wrong\n"
    assert second.stderr == "" and third.stderr == ""  # the same failure, and its echo: already reported
    [record] = failfast._jobs_dir().glob(f"127.0.0.1-{port}-{os.getpid()}-*.failed")  # the parent: this process
    assert record.read_text() == "2\n0\ntrain.output_dir is wrong"
    record.unlink()
