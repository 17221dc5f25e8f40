"""Cooperative preemption (tide_ds.trainer.preemption): signal -> flag -> agreed stop step -> checkpoint -> exit 75."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tide_ds.config import build_config, parse_signals
from tide_ds.trainer import preemption

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_parse_signals_accepts_names_and_rejects_mistakes():
    assert parse_signals("opt", "USR1,TERM") == [signal.SIGUSR1, signal.SIGTERM]
    assert parse_signals("opt", " sigusr2 , usr2,") == [signal.SIGUSR2]
    assert parse_signals("opt", "") == []
    with pytest.raises(ValueError, match="'USR3' is not a signal name"):
        parse_signals("opt", "USR1,USR3")
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals("opt", "KILL")
    with pytest.raises(ValueError, match="train.preempt_signals"):
        build_config(overrides=["--train.preempt_signals=STOP"])
    assert build_config(overrides=["--train.preempt_signals="]).train.preempt_signals == ""


def test_stop_saves_writes_marker_and_raises(tmp_path, monkeypatch):
    marker = tmp_path / "logs" / "preempted-7"
    monkeypatch.setenv(preemption.MARKER_ENV, str(marker))
    guard = preemption.PreemptionGuard([signal.SIGUSR2]).install()
    try:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGUSR2)  # the handler only records it: the process goes on
        assert guard.received == signal.SIGUSR2
        assert guard.should_stop()
        saved, closed = [], []
        with pytest.raises(preemption.Preempted) as info:
            guard.stop(17, save=saved.append, close=lambda: closed.append(True))
        assert info.value.step == 17 and info.value.signal_name == "SIGUSR2"
        assert saved == [17] and closed == [True]
        assert json.loads(marker.read_text())["step"] == 17
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # handlers restored by stop()
    finally:
        guard.uninstall()


def test_stop_without_save_when_the_step_was_just_checkpointed(tmp_path, monkeypatch):
    monkeypatch.delenv(preemption.MARKER_ENV, raising=False)
    guard = preemption.PreemptionGuard([signal.SIGUSR2]).install()
    guard.request(signal.SIGUSR2)
    assert guard.should_stop()
    with pytest.raises(preemption.Preempted):
        guard.stop(5, save=None)
    assert not list(tmp_path.iterdir())


def test_no_signals_means_no_stop_and_no_handler():
    before = signal.getsignal(signal.SIGUSR1)
    guard = preemption.install("")
    assert signal.getsignal(signal.SIGUSR1) is before
    guard.request()  # even a request is ignored: nothing watches for it
    assert not guard.should_stop()


def test_outside_the_main_thread_nothing_is_installed():
    import threading

    box = []
    thread = threading.Thread(target=lambda: box.append(preemption.install("USR1")))
    thread.start()
    thread.join()
    assert box[0].signals == [] and not box[0].should_stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signal_rank", [0, 1])
def test_ranks_agree_on_the_stop_step_when_only_one_rank_is_signalled(tmp_path, signal_rank):
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "guard_worker.py"), str(tmp_path / "out"), str(signal_rank), "3", "6"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["stops"] == [False, False, True, True, True, True], (rank, result)
        assert result["agreed"] == "SIGUSR1"
        assert result["received"] == ("SIGUSR1" if rank == signal_rank else None)
        assert result["handler_restored"]
