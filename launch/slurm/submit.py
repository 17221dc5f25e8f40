#!/usr/bin/env python
"""Submit a tide-ds training run to Slurm: ``launch/slurm/tide.sbatch`` with consistent options.

  python launch/slurm/submit.py --nodes 2 --gpus-per-node 8 [options] -- --recipe R.yaml --train.output_dir=runs/x [...]

Everything after ``--`` goes to ``launch/run.py``. Before anything is queued the configuration is
resolved (recipe + overrides), so a typo fails here and not after hours in the queue. The run
directory is ``train.output_dir``; the job log goes to ``<output_dir>/logs/<job-name>-<job id>.log``
(one file per job, appended to by its requeued restarts), the checkpoints to
``<output_dir>/checkpoints/``. Before queueing, the launch's weight-free checks run for the job's world size
(``tide_ds.plan.checks``: paths, key layouts, ids, dataset lengths, batch divisibility); ``python -m
tide_ds.plan`` prints the memory plan. ``--train.resume=auto`` is always in force: submitting the same
command again continues the run from its latest checkpoint, at any node count.

Options map onto sbatch; the per-node task layout follows the launch mode (``--launch``): ``srun``
(one DeepSpeed launcher per node: ``--ntasks-per-node=1``, all of the node's CPUs to it) or
``slurm``/``tasks`` (one task per rank: ``--ntasks-per-node=<ranks per node>``, the CPUs split).
``--dry-run`` prints the sbatch command and environment instead of submitting.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = ROOT / "launch" / "slurm" / "tide.sbatch"
MODES = ("srun", "slurm", "tasks")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        ours, train_args = argv[:cut], argv[cut + 1 :]
    else:
        ours, train_args = argv, []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0 for a CPU-only run (then --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, default=0, help="ranks per node (default: one per GPU)")
    p.add_argument("--cpus-per-node", type=int, default=0, help="CPUs per node for the job (default: 8 per rank)")
    p.add_argument("--time", default="2-00:00:00", help="time limit of each job instance (default 2 days)")
    p.add_argument("--warn-seconds", type=int, default=300,
                   help="SIGUSR1 this long before the time limit: checkpoint, then requeue (default 300)")
    p.add_argument("--launch", default="srun", choices=MODES, help="launch mode (see tide.sbatch; default srun)")
    p.add_argument("--job-name", default="tide")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--exclusive", action="store_true", help="whole nodes (recommended with --launch srun/slurm)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch argument, repeatable (e.g. --sbatch-arg=--constraint=h100)")
    p.add_argument("--python", default=sys.executable, help="python of the environment to run (default: this one)")
    p.add_argument("--gpu-mem-gib", type=float, default=0.0,
                   help="GPU memory per rank in GiB: plan the run's memory (python -m tide_ds.plan) and refuse to queue "
                        "one that does not fit (default 0: the launch's checks only)")
    p.add_argument("--host-mem-gib", type=float, default=1024.0, help="host memory per node in GiB for the plan")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command instead of submitting")
    return p.parse_args(ours), train_args


def resolve_run(train_args: list[str], *, world_size: int = 0, gpus: bool = True, plan_on=None) -> Path:
    """Check the training configuration now (with ``world_size``, every check of the launch; with ``plan_on``, a
    ``tide_ds.plan.memory.Cluster``, its memory plan too); the run directory."""
    sys.path.insert(0, str(ROOT / "launch"))
    from run import parse_argv

    from tide_ds.config import build_config

    recipe, overrides, flags = parse_argv(train_args)
    if flags:
        raise ValueError(f"{sorted(flags)} are not training options; run launch/run.py with them directly")
    for option in overrides:
        if option.startswith(("--train.overwrite", "--train.resume")):
            raise ValueError(
                f"{option}: a Slurm run always resumes (--train.resume=auto) so that a requeued job continues where "
                "it stopped; move an old run aside yourself or choose another --train.output_dir"
            )
    cfg = build_config(recipe=recipe, overrides=[*overrides, "--train.resume=auto"])
    if plan_on is not None:
        from tide_ds.plan.planner import format_plan, make_plan

        plan = make_plan(cfg, plan_on)
        print(format_plan(plan, recipe=recipe or ""), file=sys.stderr)
        if not plan.fits:
            raise ValueError("the run does not fit (plan above): " + "; ".join(plan.problems))
    elif world_size:  # the launch's own weight-free checks (tide_ds.plan), now rather than after the queue
        from tide_ds.plan import prepare_run

        prepare_run(cfg, world_size=world_size, on_gpu=gpus)
    out = Path(cfg.train.output_dir)
    return out if out.is_absolute() else ROOT / out


def sbatch_command(args: argparse.Namespace, train_args: list[str], out: Path) -> tuple[list[str], dict[str, str]]:
    """The sbatch argv and the extra environment (pure; used by --dry-run and the tests)."""
    if args.nodes < 1:
        raise ValueError(f"--nodes={args.nodes} must be at least 1")
    if args.gpus_per_node < 0 or args.procs_per_node < 0:
        raise ValueError("--gpus-per-node and --procs-per-node must not be negative")
    procs = args.procs_per_node or args.gpus_per_node
    if procs < 1:
        raise ValueError("--gpus-per-node=0 (a CPU-only run) needs --procs-per-node=N, the ranks per node")
    if args.gpus_per_node and args.procs_per_node > args.gpus_per_node:
        raise ValueError(f"--procs-per-node={args.procs_per_node} exceeds --gpus-per-node={args.gpus_per_node}")
    if args.warn_seconds < 0:
        raise ValueError(f"--warn-seconds={args.warn_seconds} must be >= 0")
    cpus = args.cpus_per_node or 8 * procs
    per_task = 1 if args.launch == "srun" else procs
    if cpus % per_task:
        raise ValueError(f"--cpus-per-node={cpus} does not split evenly over {per_task} tasks per node")
    logs = out / "logs"
    cmd = [
        "sbatch", "--parsable", f"--job-name={args.job_name}", f"--nodes={args.nodes}",
        f"--ntasks-per-node={per_task}", f"--cpus-per-task={cpus // per_task}", f"--time={args.time}",
        f"--output={logs}/%x-%j.log", "--open-mode=append", "--requeue",
    ]
    cmd.append(f"--gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else "--gpus-per-node=0")
    if args.warn_seconds:
        cmd.append(f"--signal=B:USR1@{args.warn_seconds}")
    for flag in ("partition", "account", "qos"):
        if getattr(args, flag):
            cmd.append(f"--{flag}={getattr(args, flag)}")
    if args.exclusive:
        cmd.append("--exclusive")
    cmd += args.sbatch_arg
    cmd += [str(SBATCH_SCRIPT), *train_args]
    env = {
        "TIDE_ROOT": str(ROOT),
        "TIDE_PYTHON": args.python,
        "TIDE_LAUNCH": args.launch,
        "TIDE_LOG_DIR": str(logs),
    }
    if args.procs_per_node:
        env["TIDE_PROCS_PER_NODE"] = str(args.procs_per_node)
    return cmd, env


def main(argv: list[str]) -> int:
    args, train_args = parse_args(argv)
    try:
        procs = args.procs_per_node or args.gpus_per_node
        cluster = None
        if args.gpu_mem_gib > 0:
            from tide_ds.plan.memory import GIB, Cluster

            cluster = Cluster(world_size=args.nodes * procs, gpus_per_node=procs, gpu_bytes=int(args.gpu_mem_gib * GIB),
                              host_bytes_per_node=int(args.host_mem_gib * GIB))
        out = resolve_run(train_args, world_size=args.nodes * procs, gpus=args.gpus_per_node > 0, plan_on=cluster)
        cmd, env = sbatch_command(args, train_args, out)
    except (ValueError, FileNotFoundError) as err:
        print(f"tide-ds submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
        return 0
    if shutil.which("sbatch") is None:
        print("tide-ds submit: sbatch is not on PATH (run this on a Slurm login node)", file=sys.stderr)
        return 2
    (out / "logs").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"tide-ds submit: sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return proc.returncode
    job = proc.stdout.strip().split(";")[0]
    print(job)
    print(f"job {job}: log {out / 'logs'}/{args.job_name}-{job}.log, checkpoints {out / 'checkpoints'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
