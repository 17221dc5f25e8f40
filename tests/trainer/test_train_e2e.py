"""End-to-end runs of ``deepspeed --num_gpus 2 launch/run.py`` on CPU (gloo): ZeRO-2, ZeRO-3, resume.

Two ranks whose data differ (the sampler gives each rank its own slice); a tiny student with the real
Qwen3 tokenizer on a few standard-library files.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = [
    "--world.name=code",
    "--distill.preset=none",
    "--world.max_files=60",
    "--data.seq_len=64",
    "--diffusion.block_size=16",
    "--data.eval_samples=16",
    "--model.hidden_size=32",
    "--model.intermediate_size=64",
    "--model.head_dim=16",
    "--train.micro_batch_size=4",
    "--train.lr=1e-2",
    "--train.log_every=1",
    "--train.progress_bar=false",
    "--train.tensorboard=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(out: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus", str(nproc), "--master_port", str(_free_port()),
        str(ROOT / "launch" / "run.py"), f"--train.output_dir={out}", *TINY, *extra,
    ]


def _run(out: Path, *extra: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(out, *extra, nproc=nproc), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    return proc


def _unlink_shm(args: list[str]) -> None:
    port = args[args.index("--master_port") + 1]
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        os.unlink(path)


def _records(out: Path, kind: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    proc = _run(out, "--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6")
    assert proc.returncode == 0
    return out, proc


def test_zero2_two_ranks_trains_and_heldout_nll_decreases(zero2_run):
    out, proc = zero2_run
    evals = _records(out, "eval")
    assert sorted(evals) == [0, 6, 12]
    assert evals[12]["nll"] < evals[0]["nll"] - 0.5, evals
    train = _records(out, "train")
    assert sorted(train) == list(range(1, 13))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in train.values())
    # checkpoints: kept last 2, each complete, with the resolved config
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000006", "step_00000012"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000012"
    assert "micro_batch_size: 4" in (out / "checkpoints" / "step_00000012" / "config.yaml").read_text()
    assert "resolved config" in proc.stdout


def test_no_shared_memory_left_behind(zero2_run):
    """DeepSpeed's CPU all-reduce buffers (about 66 MiB per rank in /dev/shm, named after the master port)
    are unlinked when the run ends; DeepSpeed itself never unlinks them."""
    _, proc = zero2_run
    port = proc.args[proc.args.index("--master_port") + 1]
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*") == []


def test_existing_run_dir_is_never_overwritten(zero2_run):
    out, _ = zero2_run
    before = sorted(p.name for p in out.rglob("*"))
    proc = _run(out, "--train.max_steps=2", nproc=1)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--train.resume=auto" in proc.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_zero3_two_ranks_trains(tmp_path):
    out = tmp_path / "run"
    proc = _run(out, "--train.ds_config=ds_configs/zero3.json", "--train.max_steps=8", "--train.eval_every=0")
    assert proc.returncode == 0
    evals = _records(out, "eval")
    assert evals[8]["nll"] < evals[0]["nll"] - 0.5, evals
    assert (out / "checkpoints" / "step_00000008" / "trainer_state.json").is_file()


def test_killed_run_resumes_with_identical_losses(zero2_run, tmp_path):
    reference, _ = zero2_run
    out = tmp_path / "run"
    args = ["--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6"]
    proc = subprocess.Popen(_cmd(out, *args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and 8 in _records(out, "train"):
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached step 8")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _unlink_shm(proc.args)  # a SIGKILLed rank cannot unlink its DeepSpeed all-reduce buffer itself
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    resumed = _run(out, *args, "--train.resume=auto")
    assert resumed.returncode == 0
    ref, got = _records(reference, "train"), _records(out, "train")
    assert sorted(got) == list(range(1, 13))  # records after the checkpoint were replaced, not duplicated
    for step in range(7, 13):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
    assert _records(out, "eval")[12]["nll"] == pytest.approx(_records(reference, "eval")[12]["nll"], rel=1e-6)


def test_preempted_run_logs_its_partial_window(zero2_run, tmp_path):
    """A preemption between two train records writes one for the steps since the last (they would be lost:
    the resumed run starts its window at the checkpoint). Each record is the mean of the uninterrupted run's
    per-step values over its window."""
    import psutil

    reference, _ = zero2_run
    out = tmp_path / "run"
    args = ["--train.max_steps=12", "--train.save_every=6", "--train.eval_every=6", "--train.log_every=100"]
    proc = subprocess.Popen(_cmd(out, *args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "step_00000006").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 6"
            time.sleep(0.05)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launch/run.py" in " ".join(p.cmdline())
                 and "deepspeed.launcher" not in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        for p in ranks:
            p.send_signal(signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _unlink_shm(proc.args)  # whatever a rank killed by the launcher (or by the finally above) left behind
    stop = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 6 <= stop < 12
    assert sorted(_records(out, "train")) == [stop]
    resumed = _run(out, *args, "--train.resume=auto")
    assert resumed.returncode == 0
    ref, got = _records(reference, "train"), _records(out, "train")
    assert sorted(got) == [stop, 12]
    for end, steps in ((stop, range(1, stop + 1)), (12, range(stop + 1, 13))):
        mean = sum(ref[s]["loss"] for s in steps) / len(steps)
        assert got[end]["loss"] == pytest.approx(mean, rel=1e-6), (end, list(steps))
