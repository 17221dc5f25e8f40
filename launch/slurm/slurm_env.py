#!/usr/bin/env python
"""What a Slurm allocation means for a DeepSpeed launch; used by ``launch/slurm/tide.sbatch``.

  python launch/slurm/slurm_env.py plan --mode srun|slurm|tasks --hostfile PATH
      Inside the batch script: write the DeepSpeed hostfile (one ``host slots=N`` line per node of
      SLURM_JOB_NODELIST, expanded by ``scontrol show hostnames``) and print shell ``export`` lines for
      NNODES, PROCS_PER_NODE, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
  python launch/slurm/slurm_env.py exec SCRIPT [ARGS...]
      Inside an ``srun`` task (``TIDE_LAUNCH=tasks``, or the script DeepSpeed's ``--launcher slurm`` starts):
      set RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_SIZE / MASTER_ADDR / MASTER_PORT from SLURM_PROCID /
      SLURM_NTASKS / SLURM_LOCALID / SLURM_TASKS_PER_NODE / SLURM_JOB_NODELIST / SLURM_JOB_ID, then run SCRIPT
      as ``__main__`` in this process.

Ranks per node come from ``TIDE_PROCS_PER_NODE`` if set (CPU-only clusters, CI), else from the GPUs
Slurm gave the node (``SLURM_GPUS_ON_NODE``, else ``CUDA_VISIBLE_DEVICES``). The master is the first
host of the node list; the port is ``MASTER_PORT`` if set, else ``20000 + job id mod 10000`` (the
reference launcher's rule: stable across requeues of the same job, different for neighbouring jobs).

Mistakes fail here, before DeepSpeed starts, with what to do instead: not inside a job, ``exec``
not started by ``srun`` (every process would believe it is rank 0 and the rendezvous would time
out), no GPUs and no ``TIDE_PROCS_PER_NODE``, or a node whose ``CUDA_VISIBLE_DEVICES`` is not
``0..N-1`` under a launcher that renumbers devices itself (DeepSpeed's per-node launcher sets
``CUDA_VISIBLE_DEVICES=0..N-1`` and would use GPUs Slurm gave to another job).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

MODES = ("srun", "slurm", "tasks")


class SlurmEnvError(RuntimeError):
    """A launch that cannot work as configured; the message says what to change."""


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-02],gpu7`` -> ``["node01", "node02", "gpu7"]`` through ``scontrol show hostnames``."""
    if not nodelist.strip():
        raise SlurmEnvError("SLURM_JOB_NODELIST is empty: run this inside a Slurm job (sbatch/salloc)")
    if shutil.which("scontrol") is None:
        raise SlurmEnvError("scontrol is not on PATH: run inside a Slurm job on a node with the Slurm client tools")
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise SlurmEnvError(
            f"'scontrol show hostnames {nodelist}' failed (exit {proc.returncode}): {proc.stderr.strip()} "
            "(scontrol needs a Slurm configuration: SLURM_CONF or /etc/slurm/slurm.conf)"
        )
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node form (``"2(x3),1"``) into one count per node: ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise SlurmEnvError(f"tasks per node {spec!r} is not in Slurm's 'N(xM),K' form")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def procs_per_node(env: Mapping[str, str]) -> int:
    """Ranks to start on each node (see the module docstring for the sources, in order)."""
    for key in ("TIDE_PROCS_PER_NODE", "SLURM_GPUS_ON_NODE"):
        value = env.get(key, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise SlurmEnvError(f"{key}={value!r} must be a positive integer")
            return int(value)
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible:
        return len(visible)
    raise SlurmEnvError(
        "the allocation has no GPUs (no SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES): submit with "
        "--gpus-per-node=N, or set TIDE_PROCS_PER_NODE=N for CPU ranks"
    )


def check_visible_devices(env: Mapping[str, str], mode: str, procs: int) -> None:
    """Refuse a launcher that renumbers GPUs on a node where Slurm gave other device ids (see the docstring)."""
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if mode == "tasks" or not visible or not all(d.isdigit() for d in visible):
        return
    if visible != [str(i) for i in range(len(visible))]:
        raise SlurmEnvError(
            f"CUDA_VISIBLE_DEVICES={','.join(visible)} on this node, but TIDE_LAUNCH={mode} starts ranks through "
            "DeepSpeed's per-node launcher, which sets CUDA_VISIBLE_DEVICES=0..N-1 itself and would use GPUs of "
            "another job; submit with --exclusive, or use TIDE_LAUNCH=tasks (one srun task per GPU)"
        )
    if procs > len(visible):
        raise SlurmEnvError(f"{procs} ranks per node asked for, but the node shows only {len(visible)} GPU(s)")


def master_port(env: Mapping[str, str]) -> int:
    if env.get("MASTER_PORT", "").strip():
        return int(env["MASTER_PORT"])
    return 20000 + int(env["SLURM_JOB_ID"]) % 10000


def require_job(env: Mapping[str, str]) -> None:
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
    if missing:
        raise SlurmEnvError(f"{', '.join(missing)} not set: run this inside a Slurm job (sbatch launch/slurm/tide.sbatch)")


def plan(env: Mapping[str, str], *, mode: str, hosts: list[str]) -> dict[str, str]:
    """The launch settings of this allocation (pure: ``hosts`` already expanded)."""
    if mode not in MODES:
        raise SlurmEnvError(f"TIDE_LAUNCH={mode!r} is not one of {list(MODES)}")
    require_job(env)
    procs = procs_per_node(env)
    check_visible_devices(env, mode, procs)
    return {
        "NNODES": str(len(hosts)),
        "PROCS_PER_NODE": str(procs),
        "WORLD_SIZE": str(len(hosts) * procs),
        "MASTER_ADDR": env.get("MASTER_ADDR", "").strip() or hosts[0],
        "MASTER_PORT": str(master_port(env)),
    }


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def rank_env(env: Mapping[str, str], *, hosts: list[str] | None = None) -> dict[str, str]:
    """torch.distributed variables for one srun task.

    MASTER_ADDR comes from the environment (the batch script exports it) or else from the first host of
    the step's node list (``hosts``, expanded with scontrol when not given).
    """
    require_job(env)
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        raise SlurmEnvError(
            "SLURM_PROCID / SLURM_NTASKS not set: start this with srun (one task per rank); started directly in the "
            "batch script every process would be rank 0 and the rendezvous would time out"
        )
    master = env.get("MASTER_ADDR", "").strip()
    if not master:
        if hosts is None:
            hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        master = hosts[0]
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env["SLURM_NTASKS"]
    counts = tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node < len(counts):
        raise SlurmEnvError(f"SLURM_NODEID={node} but the step's tasks per node {spec!r} cover {len(counts)} node(s)")
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_SIZE": str(counts[node]),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(master_port(env)),
    }


def _cmd_plan(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    require_job(env)
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    settings = plan(env, mode=args.mode, hosts=hosts)
    if args.hostfile:
        path = Path(args.hostfile)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(hostfile_text(hosts, int(settings["PROCS_PER_NODE"])))
        os.replace(tmp, path)
        settings["HOSTFILE"] = str(path)
    for key, value in settings.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    os.environ.update(rank_env(os.environ))
    script = Path(args.script)
    if not script.is_file():
        raise SlurmEnvError(f"{script} does not exist (run from the repository root: TIDE_ROOT)")
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")  # its sys.exit(status) ends this process with that status
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write the hostfile and print the launch settings as shell exports")
    p.add_argument("--mode", default=os.environ.get("TIDE_LAUNCH", "srun"), choices=MODES)
    p.add_argument("--hostfile", default="")
    e = sub.add_parser("exec", help="map srun's task variables to torch.distributed's and run a script")
    e.add_argument("script")
    e.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        return _cmd_plan(args) if args.command == "plan" else _cmd_exec(args)
    except SlurmEnvError as err:
        print(f"tide-ds slurm: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
