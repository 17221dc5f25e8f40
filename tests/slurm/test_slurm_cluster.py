"""A real Slurm cluster on localhost (two emulated nodes): two-node distillation, preemption and requeue.

tools/ci/slurm-localcluster.sh starts munged, slurmctld and one slurmd per node (node01, node02); the
fixture stops it again, also when a test fails. Two jobs run side by side, both submitted through
launch/slurm/submit.py (so through launch/slurm/tide.sbatch, launch mode srun: one DeepSpeed launcher
per node, one CPU rank each): a pipeline-A distillation (TIDE-Cross, tiny LLaDA2 teacher) that runs
uninterrupted, and the same run preempted twice: a SIGUSR1 to its batch shell (what
``--signal=B:USR1@N`` sends before the time limit) while it trains, and again while its first requeued
instance is still starting up. Both times every rank must checkpoint at the same step boundary, the
job requeue itself and resume, and the end result must equal the uninterrupted run's, loss for loss.

Slurm holds a requeued job until its old job credential has expired (EligibleTime = requeue +
``cred_expire`` + 1 s; releasing it earlier makes slurmd refuse the launch, "Job credential revoked",
and the job fails). The CI cluster sets ``AuthInfo=cred_expire=10`` instead of the default 120 s, and
schedules every 2 s, so a requeued job starts again about 11 s later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
from pipeline_a_data import build_pipeline_a_dataset
from test_train_e2e import TINY

CLUSTER = ROOT / "tools" / "ci" / "slurm-localcluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
MISSING = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
STEPS = 10
DEADLINE_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(bool(MISSING), reason=f"Slurm is not installed (missing {', '.join(MISSING)}): "
                       "`bash tools/ci/slurm-localcluster.sh install` (which .ci/run runs) installs munge, "
                       "slurmctld, slurmd and slurm-client"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (daemons, /etc/hosts entries)"),
]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:/usr/sbin:{os.environ['PATH']}",
            "SLURM_LC_DIR": str(root / "lc"),
            "SLURM_LC_NODES": "2",
            "SLURM_LC_CPUS": "2",
            "SLURM_CONF": str(root / "lc" / "etc" / "slurm.conf"),
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions")),
            "TIDE_RESEND_S": "5",
        }

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def diagnostics(self, job_id: str) -> str:
        """Job record and the daemons' last log lines, for a failure message."""
        lines = [f"job {job_id}: {self.job(job_id)}"]
        for log in sorted((self.root / "lc" / "log").glob("*.log")):
            lines += [f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-15:]]
        return "\n".join(lines)

    def submit(self, out: Path, train_args: list[str]) -> str:
        proc = self.run(sys.executable, str(ROOT / "launch" / "slurm" / "submit.py"), "--nodes", "2",
                        "--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-node", "1", "--time", "00:20:00",
                        "--job-name", out.name, "--", *train_args, f"--train.output_dir={out}", timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        start = c.run("bash", str(CLUSTER), "start", timeout=120)
        assert start.returncode == 0, start.stdout + start.stderr
        yield c
    finally:
        stop = c.run("bash", str(CLUSTER), "stop", timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        hosts = Path("/etc/hosts").read_text()
        assert "tide-slurm-localcluster" not in hosts, "the cluster script left /etc/hosts entries behind"


@pytest.fixture(scope="module")
def pipeline_a(tmp_path_factory):
    from tide_ds.data.corpus import ensure_code_corpus
    from tide_ds.data.tokenizers import default_tokenizer_cache, ensure_qwen3_tokenizer
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint

    root = tmp_path_factory.mktemp("slurm_pipeline_a")
    tok = ensure_qwen3_tokenizer()
    corpus = ensure_code_corpus(tok, default_tokenizer_cache(), seq_len=64, block_size=16, heldout_fraction=0.03, max_files=60)
    data = build_pipeline_a_dataset(corpus, tok, root / "data", teacher_len=192, max_samples=120)
    teacher = write_tiny_llada2_moe_checkpoint(root / "teacher", seed=0, shard=True)
    return data, teacher


def _train_records(out: Path) -> dict[int, dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def _log(out: Path, job_id: str) -> str:
    path = out / "logs" / f"{out.name}-{job_id}.log"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def jobs(cluster, pipeline_a):
    """Submit the reference and the preempted run together; drive the preemptions; wait for both."""
    data, teacher = pipeline_a
    args = [*TINY, f"--data.dataset={data}", f"--teacher.path={teacher}", "--teacher.placement=replicate",
            "--distill.preset=tide_cross", "--distill.pipeline=A", f"--train.max_steps={STEPS}", "--train.eval_every=0"]
    ref_out, pre_out = cluster.root / "reference", cluster.root / "preempted"
    ref, pre = cluster.submit(ref_out, args), cluster.submit(pre_out, args)
    events: list[str] = []
    phase = "train"  # train -> (USR1) -> requeued -> (restart 1 started) -> (USR1) -> requeued2
    t0 = time.monotonic()
    states: dict[str, dict[str, str]] = {}
    while time.monotonic() - t0 < DEADLINE_S:
        states = {job: cluster.job(job) for job in (ref, pre)}
        info = states[pre]
        if phase == "train" and len(_train_records(pre_out)) >= 3:
            cluster.run("scancel", "--signal=USR1", "--batch", pre)
            events.append(f"USR1 while training at {len(_train_records(pre_out))} records")
            phase = "requeued"
        elif phase == "requeued" and info.get("JobState") == "RUNNING" and "(restart 1)" in _log(pre_out, pre):
            cluster.run("scancel", "--signal=USR1", "--batch", pre)  # the ranks are still starting up
            events.append("USR1 while starting up")
            phase = "requeued2"
        if all(s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for s in states.values()):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"jobs not finished after {DEADLINE_S}s: events {events}\n{_log(pre_out, pre)[-3000:]}\n"
                    f"{cluster.diagnostics(pre)}")
    return {"ref": (ref, ref_out), "pre": (pre, pre_out), "states": states, "events": events,
            "elapsed": time.monotonic() - t0, "diagnostics": cluster.diagnostics(pre)}


def test_two_node_distillation_job(jobs):
    job, out = jobs["ref"]
    state = jobs["states"][job]
    log = _log(out, job)
    assert state["JobState"] == "COMPLETED", (log[-4000:], jobs["diagnostics"])
    assert state["NodeList"] == "node[01-02]" and state["Restarts"] == "0"
    assert "2 node(s) x 1 = 2 rank(s), master node01" in log and "launch srun" in log
    assert "objective: mode reverse_alm" in log
    train = _train_records(out)
    assert sorted(train) == list(range(1, STEPS + 1))
    assert all(r["calm_rev"] > 0 and r["active_chunks"] > 0 for r in train.values())
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").is_file()
    assert not list((out / "logs").glob("hostfile-*")) and not list((out / "logs").glob("preempted-*"))


def test_preempted_twice_resumes_with_the_same_losses(jobs):
    job, out = jobs["pre"]
    _, ref_out = jobs["ref"]
    state = jobs["states"][job]
    log = _log(out, job)
    assert state["JobState"] == "COMPLETED", (jobs["events"], log[-6000:], jobs["diagnostics"])
    assert state["Restarts"] == "2", jobs["events"]
    assert [e.split(" at ")[0] for e in jobs["events"]] == ["USR1 while training", "USR1 while starting up"]
    assert log.count("requeued; it resumes from the latest checkpoint") == 2
    stops = [int(s) for s in re.findall(r"checkpoint at step (\d+) complete", log)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(stops) == 2 and resumes == stops, (stops, resumes)
    assert 3 <= stops[0] < stops[1] < STEPS
    # nothing lost: every step appears once, and every loss equals the uninterrupted run's
    ref, got = _train_records(ref_out), _train_records(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "ce", "calm_rev", "lr"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-6, abs=1e-7), (step, key)
