"""Item 0 of issue 16: no child process inherits the trainer's signal handlers; a pool that cannot stop says so."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide_ds import workers
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


def test_preprocessing_pool_ends_under_the_preemption_guard(qwen3_dir: Path, tmp_path: Path) -> None:
    """Forked workers used to inherit the guard's SIGTERM handler, so Pool.terminate() could hang for ever."""
    runs = 40
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(HERE / "pool_signals_worker.py"), str(qwen3_dir), str(tmp_path),
                             str(runs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the pool hung after {out.count(' ok')} of {runs} runs:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert out.count(" ok") == runs


def _record(signum, frame):  # a handler like the preemption guard's: it only records
    pass


def _sleep_forever(_):
    time.sleep(3600)


def _handlers(_):
    return [signal.getsignal(s) for s in workers.TRAINER_SIGNALS], list(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_workers_start_with_default_handlers():
    previous = {s: signal.signal(s, _record) for s in workers.TRAINER_SIGNALS}
    try:
        pool = workers.start_pool(multiprocessing.get_context("fork"), 2)
        handlers, blocked = pool.map(_handlers, range(2))[0]
        workers.stop_pool(pool, what="test")
        assert handlers == [signal.SIG_DFL, signal.default_int_handler, signal.SIG_DFL, signal.SIG_DFL]
        assert not set(blocked) & set(workers.TRAINER_SIGNALS)
        # and the parent's handlers and mask are untouched
        assert all(signal.getsignal(s) is _record for s in workers.TRAINER_SIGNALS)
        assert not set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(workers.TRAINER_SIGNALS)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def test_a_pool_that_cannot_stop_says_so():
    """A worker that ignores SIGTERM (here: SIG_IGN set by the task) is named and killed after the deadline."""
    pool = workers.start_pool(multiprocessing.get_context("fork"), 1)
    pool.apply_async(_ignore_term_and_sleep)
    time.sleep(0.5)
    t0 = time.monotonic()
    with pytest.raises(workers.PoolStuck, match=r"worker process\(es\) \[\d+\] did not exit within 1 s"):
        workers.stop_pool(pool, what="test pool", timeout=1.0, clean=False)
    assert time.monotonic() - t0 < 10


def _ignore_term_and_sleep():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)
