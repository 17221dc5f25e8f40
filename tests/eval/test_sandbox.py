"""The code-execution sandbox: verdicts, limits, no network, nothing left behind."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from tide_ds.eval.sandbox import SandboxLimits, isolation, run_program

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=512)


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.fixture
def work_root(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    return root


def test_correct_program_passes_and_a_wrong_one_fails(work_root):
    good = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\n", limits=LIMITS, work_root=work_root)
    assert good.status == "passed" and good.detail == ""
    bad = run_program("def f(x):\n    return x\n\nassert f(1) == 2\n", limits=LIMITS, work_root=work_root)
    assert bad.status == "failed" and "AssertionError" in bad.detail
    syntax = run_program("def f(:\n", limits=LIMITS, work_root=work_root)
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


def test_exiting_before_the_end_is_not_a_pass(work_root):
    early = run_program("import os\nos._exit(0)\nassert False\n", limits=LIMITS, work_root=work_root)
    assert early.status == "error" and "os._exit" in early.detail
    sys_exit = run_program("import sys\nsys.exit(0)\nassert False\n", limits=LIMITS, work_root=work_root)
    assert sys_exit.status == "failed" and "SystemExit" in sys_exit.detail


@pytest.mark.parametrize("source", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"], ids=["busy", "sleeping"])
def test_timeout(source, work_root):
    start = time.perf_counter()
    result = run_program(source, limits=SandboxLimits(timeout_s=1.5), work_root=work_root)
    assert result.status == "timeout"
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "source", ["x = bytearray(8 * 1024 ** 3)\n", "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n"],
    ids=["one-allocation", "growing"],
)
def test_memory_bomb(source, work_root):
    result = run_program(source, limits=SandboxLimits(timeout_s=20, memory_mb=256), work_root=work_root)
    assert result.status == "memory", result


def test_no_network(work_root):
    wrapped = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", limits=LIMITS,
                          work_root=work_root)
    assert wrapped.status == "failed" and "network access is disabled" in wrapped.detail
    # the C-level socket module bypasses the Python guard: the namespace has no interface (not even loopback up)
    raw = run_program("import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))\n",
                      limits=LIMITS, work_root=work_root)
    assert raw.status == "failed"
    if isolation() != "process-group":
        assert "Network is unreachable" in raw.detail or "Errno 101" in raw.detail, raw.detail


def test_output_is_limited(work_root):
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n",
                         limits=SandboxLimits(timeout_s=5, max_file_bytes=1 << 16), work_root=work_root)
    assert result.status == "failed" and "File too large" in result.detail


def test_nothing_is_left_behind(work_root):
    token = f"30.{secrets.randbelow(10**9):09d}"  # a sleep of ~30 s, recognisable by its argument
    source = (
        "import subprocess, pathlib\n"
        f"subprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
        "pathlib.Path('junk').mkdir()\n"
        "pathlib.Path('junk/file').write_text('x')\n"
        "pathlib.Path('junk').chmod(0o500)\n"
    )
    result = run_program(source, limits=LIMITS, work_root=work_root)
    assert result.status == "passed"
    deadline = time.time() + 5
    while _processes_with(token) and time.time() < deadline:
        time.sleep(0.05)
    left = _processes_with(token)
    for pid in left:  # only in the plain process-group mode: a daemon that left its session outlives it
        os.kill(pid, 9)
    if isolation() != "process-group":
        assert left == []
    assert list(work_root.iterdir()) == []
