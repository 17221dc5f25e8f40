"""launch/run.py: a user error is one line naming the rank (exit 2); any other exception keeps its traceback (exit 1).

Errors after the configuration checks go through ``tide_ds.failfast.fail``, which ends the process with
``os._exit``; here its last step raises ``SystemExit`` instead, so the test sees the status.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import tide_ds.log as tide_log
import tide_ds.trainer.loop as loop
import tide_ds.worlds as worlds
from tide_ds import failfast
from tide_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_py(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default train.output_dir (runs/demo) is fresh here
    spec = importlib.util.spec_from_file_location("tide_run", ROOT / "launch" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(loop, "init_distributed", lambda *a, **kw: None)
    monkeypatch.setattr(module, "_prepare_run", lambda cfg, **kw: cfg)  # the weight-free checks: tests/trainer/test_start_checks.py
    monkeypatch.setattr(loop, "shutdown", lambda: None)
    monkeypatch.setattr(tide_log, "setup_logging", lambda: None)  # no handler on this test's captured stderr
    monkeypatch.setattr(worlds, "prepare_world", lambda cfg: (cfg, None))
    monkeypatch.setattr(failfast, "_leave", _raise_exit)
    return module


def _raise_exit(code: int) -> None:
    raise SystemExit(code)


ARGS = ["--distill.preset=none", "--train.progress_bar=false"]  # data.dataset empty: a world (patched out here)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_config_error_is_one_line_on_every_rank(run_py, monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)

    def train(cfg):
        raise ConfigError("data.dataset='/d' is not an existing dataset directory")

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(SystemExit) as exited:
        run_py.main(ARGS)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"tide-ds: error (rank {rank}): data.dataset='/d' is not an existing dataset directory"


def test_config_error_in_the_arguments_names_the_rank(run_py, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert run_py.main(["--train.max_stpes=3"]) == 2
    assert "tide-ds: configuration error (rank 1): unknown option 'train.max_stpes'" in capsys.readouterr().err


def test_other_exceptions_keep_their_traceback(run_py, monkeypatch, capsys):
    def train(cfg):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(SystemExit) as exited:
        run_py.main(ARGS)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and 'raise ValueError("an internal bug' in err
    assert err.rstrip().endswith("tide-ds: error (rank 0): ValueError: an internal bug, not a user error")


def test_world_preparation_runs_under_failfast(run_py, monkeypatch, capsys):
    """A ConfigError while the world is built is reported like one from training: one line, exit 2."""
    def prepare(cfg):
        raise ConfigError("world.max_files=3 leaves no held-out file; raise it")

    monkeypatch.setattr(worlds, "prepare_world", prepare)
    monkeypatch.setattr(loop, "train", lambda cfg: pytest.fail("train must not start"))
    with pytest.raises(SystemExit) as exited:
        run_py.main(ARGS)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "tide-ds: error (rank 0): world.max_files=3 leaves no held-out file; raise it\n"


def test_the_same_error_on_two_ranks_is_printed_once(run_py, monkeypatch, capsys, tmp_path):
    """Two ranks of one job (same launcher and port) with the same configuration error: one line, both exit 2."""
    monkeypatch.setattr(failfast, "_jobs_dir", lambda: tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29555")
    codes = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        codes.append(run_py.main(["--train.max_stpes=3"]))
    assert codes == [2, 2]
    err = capsys.readouterr().err
    assert err.count("tide-ds: configuration error") == 1
    assert err.startswith("tide-ds: configuration error (rank 0): unknown option 'train.max_stpes'")


def test_a_real_two_rank_launch_prints_a_configuration_error_once(tmp_path):
    """``deepspeed --num_gpus 2 launch/run.py`` with a typo: both ranks fail alike, the job says it once, exit 2."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "launch" / "run.py"), "--train.max_stpes=3", f"--train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    lines = [line for line in text.splitlines() if "unknown option 'train.max_stpes'" in line]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith("tide-ds: configuration error (rank ") and "did you mean 'train.max_steps'?" in lines[0]
    assert "Traceback" not in text and not (tmp_path / "run").exists()


def test_checks_run_before_the_world_and_again_on_what_it_built(run_py, monkeypatch):
    """The weight-free checks come before any world work; a world's dataset is checked (and counted) after it."""
    import dataclasses

    seen = []

    def prepare_run(cfg, **kw):
        seen.append(("checks", cfg.data.dataset))
        return cfg

    def prepare_world(cfg):
        seen.append(("world", cfg.data.dataset))
        if cfg.data.dataset:
            return cfg, None
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="/built")), None

    monkeypatch.setattr(run_py, "_prepare_run", prepare_run)
    monkeypatch.setattr(worlds, "prepare_world", prepare_world)
    monkeypatch.setattr(loop, "train", lambda cfg: seen.append(("train", cfg.data.dataset)) or {"nll": 1.0})
    assert run_py.main(["--world.name=code", "--distill.preset=none", "--train.progress_bar=false"]) == 0
    assert seen == [("checks", ""), ("world", ""), ("checks", "/built"), ("train", "/built")]
    seen.clear()
    assert run_py.main([*ARGS, "--data.dataset=/d"]) == 0  # a named dataset: checked once, no world
    assert seen == [("checks", "/d"), ("world", "/d"), ("train", "/d")]
