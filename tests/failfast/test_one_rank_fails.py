"""Item 1 of issue 16: a failure on one rank ends the whole job within seconds, with one message.

Real ``deepspeed --num_gpus 2 launch/run.py`` runs on CPU (gloo); ``TIDE_DS_FAULT`` makes rank 1 raise
during a step, during a resume and during a checkpoint write. Before tide_ds.failfast, rank 0 waited in a
collective until gloo's 10-minute timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide_ds.trainer import manifest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "--world.name=code", "--distill.preset=none", "--world.max_files=30", "--data.seq_len=64",
    "--diffusion.block_size=16", "--data.eval_samples=8", "--model.hidden_size=32", "--model.intermediate_size=64",
    "--model.head_dim=16", "--train.micro_batch_size=2", "--train.lr=1e-2", "--train.log_every=1",
    "--train.progress_bar=false", "--train.tensorboard=false", "--train.max_steps=4", "--train.save_every=1",
    "--train.eval_every=0",
]
FAULT_TIME = re.compile(r"injected fault at '([^']+)' on rank (\d) at t=([0-9.]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, fault: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TIDE_DS_FAULT": fault,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launch" / "run.py"), f"--train.output_dir={out}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, time.time()


def _check_failed_fast(proc: subprocess.CompletedProcess, ended: float, where: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    faults = FAULT_TIME.findall(text)
    assert faults and faults[0][:2] == (where, "1"), text[-4000:]
    waited = ended - float(faults[0][2])
    print(f"{where}: the job ended {waited:.1f} s after the fault on rank 1")
    assert waited < 30, f"the job took {waited:.1f} s to end after the fault on rank 1"
    # the failing rank's message once, with its rank; nothing from rank 0 but its exit
    assert text.count("tide-ds: error") == 1, text[-4000:]
    line = next(line for line in text.splitlines() if line.startswith("tide-ds: error"))
    assert line.startswith("tide-ds: error (rank 1): ") and f"InjectedFault: injected fault at '{where}'" in line
    assert "Timed out" not in text
    return text


def test_one_rank_failing_ends_the_job_within_seconds(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # during a step: checkpoints 1 and 2 exist, rank 1 fails after step 3
    proc, ended = _launch(out, "step@3:1")
    _check_failed_fast(proc, ended, "step@3")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000001", "step_00000002"]

    # during a resume
    proc, ended = _launch(out, "resume:1", "--train.resume=auto")
    _check_failed_fast(proc, ended, "resume")

    # during a checkpoint write: resumed at 2, step 3 done, rank 1 fails while saving step 3
    proc, ended = _launch(out, "save@3:1", "--train.resume=auto")
    text = _check_failed_fast(proc, ended, "save@3")
    assert "writing checkpoint step_00000003 on rank 1 failed" in text
    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert not (root / ".staging" / "step_00000003").exists()  # partial files removed
    assert manifest.problems(root / "step_00000002", rank=0, world_size=2) == []
    assert manifest.problems(root / "step_00000002", rank=1, world_size=2) == []
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 3


def test_a_diverged_run_stops_with_its_own_status(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, _ = _launch(out, "", "--train.lr=1e30", "--train.max_steps=12", "--train.max_nonfinite_steps=3",
                      "--train.save_every=0")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 65, text[-4000:]
    assert text.count("tide-ds: error") == 1, text[-4000:]
    line = next(line for line in text.splitlines() if line.startswith("tide-ds: error"))
    assert "training diverged: the loss or gradient norm was NaN/inf for 3 consecutive steps" in line
    assert "Lower --train.lr (now 1e+30)" in line

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    train = [r for r in map(lambda s: json.loads(s, parse_constant=reject),
                            (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert train[-1]["nonfinite_run"] >= 3 and train[-1]["step"] < 12
    assert sum(r["nonfinite_steps"] for r in train) == train[-1]["nonfinite_steps_total"] >= 3
    assert not (out / "checkpoints" / "step_00000012").exists()


def test_ctrl_c_checkpoints_and_ends_the_job(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) with save_every=0: the ranks
    checkpoint at the next step boundary and exit 75; nothing of the progress is lost."""
    import psutil

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    args = [a for a in TINY if not a.startswith(("--train.max_steps", "--train.save_every"))]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launch" / "run.py"), f"--train.output_dir={out}", *args, "--train.max_steps=200",
           "--train.save_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").is_file() and '"step": 3, "kind": "train"' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 3"
            time.sleep(0.1)
        session = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid]
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.time()
        gone, alive = psutil.wait_procs(session, timeout=60)
        waited = time.time() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        text = proc.communicate()[0]
    print(f"Ctrl-C: every process gone {waited:.1f} s after it")
    assert not alive and waited < 40, text[-4000:]
    assert "Ctrl-C: checkpoint at the next step boundary" in text
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].removeprefix("step_")) < 200, (ckpts, text[-3000:])
    assert manifest.problems(out / "checkpoints" / ckpts[0], rank=1, world_size=2) == []
    assert "preemption: SIGINT -> stopping at step" in text and "exiting with code 75" in text


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
