"""Execution of generated code: one subprocess per sample, limits, no network, nothing left behind.

Each program runs in a fresh temporary directory (its working directory, ``HOME`` and ``TMPDIR``),
removed afterwards, through ``_sandbox_child.py`` under ``python -I``:

* **time**: a wall-clock limit (the whole process group is killed) and a CPU-time limit (``RLIMIT_CPU``);
* **memory**: ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``, reported as ``memory``);
* **output**: ``RLIMIT_FSIZE`` on every file it writes (stdout and stderr go to files);
* **network**: a new network namespace without interfaces (``unshare --net``), and sockets disabled in
  the interpreter in any case;
* **processes**: a new PID namespace (``unshare --pid``): when the program ends, the kernel kills every
  process it started, daemons included.

The namespaces need root or unprivileged user namespaces; :func:`isolation` probes once and falls back
to ``unshare --user --map-root-user`` and then to a plain subprocess (sockets disabled in the interpreter,
the process group killed at the end; a process that leaves its session could outlive it). The mode used
is part of every result.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ExecResult", "SandboxLimits", "isolation", "run_program"]

CHILD = Path(__file__).with_name("_sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "memory", "error")
_PREFIXES = {
    "namespaces": ["unshare", "--net", "--pid", "--fork", "--kill-child", "--"],
    "user-namespaces": ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--"],
    "process-group": [],
}


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Per-program limits."""

    #: Wall-clock seconds (also the CPU-time limit, rounded up).
    timeout_s: float = 10.0
    #: Address-space limit in MiB.
    memory_mb: int = 1024
    #: Largest file the program may write (stdout and stderr included), bytes.
    max_file_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_file_bytes <= 0:
            raise ValueError(f"sandbox limits must be > 0; got {self}")


@dataclass(frozen=True)
class ExecResult:
    """``status``: passed, failed (an exception, e.g. a failed assert), timeout, memory or error."""

    status: str
    returncode: int
    detail: str
    seconds: float
    isolation: str


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """The strongest mode that works here: ``namespaces``, ``user-namespaces`` or ``process-group``."""
    if shutil.which("unshare"):
        for mode in ("namespaces", "user-namespaces"):
            try:
                probe = subprocess.run(
                    [*_PREFIXES[mode], sys.executable, "-c", "pass"], capture_output=True, timeout=30, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return mode
    return "process-group"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits (True) or ``timeout_s`` passes (False), without reaping it."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _remove(path: Path) -> None:
    """Delete the work directory even if the program made parts of it read-only."""

    def retry(func, target, _exc):
        os.chmod(os.path.dirname(target) or ".", stat.S_IRWXU)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, stat.S_IRWXU)
        func(target)

    shutil.rmtree(path, onexc=retry) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=retry)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", errors="replace").strip()


def _classify(returncode: int, *, timed_out: bool, finished: bool) -> str:
    if timed_out or returncode == 128 + signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed" if finished else "error"  # exit 0 without the end-of-program marker: os._exit half-way
    if returncode == 3:
        return "memory"
    if returncode in (1, 4):
        return "failed"
    return "error"


def run_program(source: str, *, limits: SandboxLimits = SandboxLimits(), work_root: str | Path | None = None) -> ExecResult:
    """Run the Python program ``source`` in the sandbox and say how it ended.

    ``passed`` means it ran to its last statement without an exception (tests are asserts in the program).
    ``work_root`` is where the temporary directory is made (default: the system's temp directory).
    """
    mode = isolation()
    work = Path(tempfile.mkdtemp(prefix="tide-sandbox-", dir=work_root))
    start = time.perf_counter()
    try:
        program, marker = work / "program.py", work / f".done-{secrets.token_hex(8)}"
        program.write_text(source)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        cpu = int(limits.timeout_s) + 1
        cmd = [*_PREFIXES[mode], sys.executable, "-I", str(CHILD), str(program), str(limits.memory_mb << 20),
               str(cpu), str(limits.max_file_bytes), str(marker)]
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
            finally:
                # The leader is not reaped yet (a zombie at worst), so its group id cannot have been reused:
                # killing the group ends only what this program started.
                _kill_group(proc.pid)
                proc.wait()
        status = _classify(proc.returncode, timed_out=timed_out, finished=marker.is_file())
        if status == "passed":
            detail = ""
        elif status == "timeout":
            detail = f"over the {limits.timeout_s:g} s limit"
        elif status == "memory":
            detail = f"MemoryError: over the {limits.memory_mb} MiB limit"
        elif proc.returncode == 4:
            detail = "SystemExit before the end of the program"
        elif proc.returncode == 0:
            detail = "the process exited with status 0 before the end of the program (os._exit)"
        else:
            detail = _tail(work / "stderr.txt") or f"exit status {proc.returncode}"
        return ExecResult(status=status, returncode=proc.returncode, detail=detail,
                          seconds=time.perf_counter() - start, isolation=mode)
    finally:
        _remove(work)
