"""The ``tide-ds`` console command: subcommands, their --help, train's argument split and signal forwarding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide_ds.cli import COMMANDS, split_train_args

ROOT = Path(__file__).resolve().parents[1]
TIDE_DS = [sys.executable, "-m", "tide_ds.cli"]  # what the tide-ds console script runs


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*TIDE_DS, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed_and_lists_every_command():
    script = Path(sys.executable).parent / "tide-ds"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS) == ["train", "preprocess", "plan", "generate", "eval", "lm-eval", "export", "tokenizer"]
    unknown = _run("trian")
    assert unknown.returncode == 2 and "unknown command 'trian'" in unknown.stderr


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "plan"])
def test_every_subcommand_has_help(command):
    proc = _run(command, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower() or "--recipe" in proc.stdout


def test_plan_is_dispatched_lazily_or_reported_missing():
    from importlib.util import find_spec

    proc = _run("plan", "--help")
    if find_spec("tide_ds.plan") is None:
        assert proc.returncode == 2 and "has no tide_ds.plan" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr


def test_train_print_config_applies_run_options():
    proc = _run("train", "--num_gpus", "2", "--print-config", "--", "--distill.preset=none", "--train.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout and "preset: none" in proc.stdout
    bad = _run("train", "--print-config", "--train.max_stepz=7")
    assert bad.returncode == 2 and "max_stepz" in bad.stderr


def test_train_argument_split():
    assert split_train_args(["--num_gpus", "2", "--master_port=2950", "--recipe", "r.yaml", "--train.lr=1e-3"]) == (
        ["--num_gpus", "2", "--master_port=2950"], ["--recipe", "r.yaml", "--train.lr=1e-3"])
    assert split_train_args(["--no_ssh", "--", "--num_gpus", "3"]) == (["--no_ssh"], ["--num_gpus", "3"])
    with pytest.raises(ValueError, match="--num_gpus needs a value"):
        split_train_args(["--num_gpus"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of an exited parent is reaped by init soon; count it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_reaches_the_whole_launcher_group(tmp_path):
    """A fake launcher with a 'rank' child that ignores its parent's death: SIGTERM to tide-ds ends both."""
    pids = tmp_path / "pids"
    launcher = (
        "import subprocess, sys, time\n"
        "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{rank.pid}}')\n"
        "time.sleep(120)\n"
    )
    wrapper = ("import sys; from tide_ds.cli import run_process_group; "
               f"sys.exit(run_process_group([sys.executable, '-c', {launcher!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", wrapper], cwd=ROOT)
    deadline = time.time() + 60
    while not (pids.exists() and pids.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    rank_pid = int(pids.read_text())
    assert _alive(rank_pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while _alive(rank_pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(rank_pid)
