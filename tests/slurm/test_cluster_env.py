"""Cluster settings: gloo follows NCCL's interface, srun steps get their CPUs, collectives get a long timeout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "tide.sbatch"


def _sbatch_env(env: dict[str, str]) -> str:
    lines = [line for line in SBATCH.read_text().splitlines()
             if line.startswith("if [ -z \"${GLOO_SOCKET_IFNAME") or line.startswith("[ -n \"${SLURM_CPUS_PER_TASK")]
    assert len(lines) == 2, lines
    script = "\n".join(lines) + '\necho "${GLOO_SOCKET_IFNAME:-}|${SRUN_CPUS_PER_TASK:-}"'
    return subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("env,expected", [
    ({"NCCL_SOCKET_IFNAME": "ib0", "SLURM_CPUS_PER_TASK": "64"}, "ib0|64"),
    ({"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth1"}, "eth1|"),
    ({"SLURM_CPUS_PER_TASK": "8", "SRUN_CPUS_PER_TASK": "4"}, "|4"),
    ({}, "|"),
])
def test_sbatch_sets_gloo_interface_and_srun_cpus(env, expected):
    assert _sbatch_env(env) == expected


def test_collective_timeout_reaches_deepspeed(monkeypatch):
    import datetime

    import deepspeed

    from tide_ds.config import build_config
    from tide_ds.trainer import loop

    seen = {}
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    monkeypatch.setattr(loop.torch.cuda, "is_available", lambda: False)
    cfg = build_config(overrides=["--train.dist_timeout_minutes=90"])
    loop.init_distributed(cfg.train.dist_timeout_minutes)
    assert seen == {"dist_backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    assert build_config().train.dist_timeout_minutes >= 30


def test_preemption_group_gets_the_collective_timeout(monkeypatch):
    """A new torch group takes the backend's default (30 min), not the world's: the guard passes it on."""
    import datetime
    import signal

    import torch

    from tide_ds.trainer import preemption

    seen = {}
    monkeypatch.setattr(preemption.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(preemption.dist, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda **kw: seen.update(kw) or "group")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **kw: None)
    guard = preemption.PreemptionGuard([signal.SIGUSR1])
    guard.group_timeout = datetime.timedelta(minutes=90)
    assert guard.should_stop() is False
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
