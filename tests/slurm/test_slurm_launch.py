"""The Slurm launch helpers without a cluster: allocation parsing, rank mapping, hostfile, sbatch command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch" / "slurm"))
import slurm_env
import submit

JOB = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu[01-02]"}


def test_tasks_per_node_expands_slurm_form():
    assert slurm_env.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_env.tasks_per_node("8") == [8]
    with pytest.raises(slurm_env.SlurmEnvError, match="'N\\(xM\\),K' form"):
        slurm_env.tasks_per_node("2x3")


def test_procs_per_node_sources_in_order():
    assert slurm_env.procs_per_node({"TIDE_PROCS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}) == 3
    assert slurm_env.procs_per_node({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}) == 8
    assert slurm_env.procs_per_node({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == 4
    with pytest.raises(slurm_env.SlurmEnvError, match="TIDE_PROCS_PER_NODE=N for CPU ranks"):
        slurm_env.procs_per_node({})
    with pytest.raises(slurm_env.SlurmEnvError, match="positive integer"):
        slurm_env.procs_per_node({"TIDE_PROCS_PER_NODE": "0"})


def test_plan_master_and_port_from_the_job():
    env = {**JOB, "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    plan = slurm_env.plan(env, mode="srun", hosts=["gpu01", "gpu02"])
    assert plan == {"NNODES": "2", "PROCS_PER_NODE": "4", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu01",
                    "MASTER_PORT": str(20000 + 12345 % 10000)}
    assert slurm_env.plan({**env, "MASTER_PORT": "29400"}, mode="tasks", hosts=["a"])["MASTER_PORT"] == "29400"
    assert slurm_env.hostfile_text(["gpu01", "gpu02"], 4) == "gpu01 slots=4\ngpu02 slots=4\n"


def test_plan_refuses_renumbering_launchers_on_shared_gpus():
    env = {**JOB, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    for mode in ("srun", "slurm"):
        with pytest.raises(slurm_env.SlurmEnvError, match="TIDE_LAUNCH=tasks"):
            slurm_env.plan(env, mode=mode, hosts=["gpu01"])
    assert slurm_env.plan(env, mode="tasks", hosts=["gpu01"])["PROCS_PER_NODE"] == "4"
    with pytest.raises(slurm_env.SlurmEnvError, match="not one of"):
        slurm_env.plan(env, mode="pdsh", hosts=["gpu01"])
    with pytest.raises(slurm_env.SlurmEnvError, match="inside a Slurm job"):
        slurm_env.plan({"CUDA_VISIBLE_DEVICES": "0"}, mode="srun", hosts=["x"])


def test_rank_env_maps_srun_task_variables():
    env = {**JOB, "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "gpu01"}
    assert slurm_env.rank_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4",
                                       "MASTER_ADDR": "gpu01", "MASTER_PORT": "22345"}
    uneven = {**env, "MASTER_ADDR": "", "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}
    assert slurm_env.rank_env(uneven, hosts=["n1", "n2"])["LOCAL_SIZE"] == "1"
    assert slurm_env.rank_env(uneven, hosts=["n1", "n2"])["MASTER_ADDR"] == "n1"
    no_srun = {k: v for k, v in env.items() if k != "SLURM_PROCID"}
    with pytest.raises(slurm_env.SlurmEnvError, match="start this with srun"):
        slurm_env.rank_env(no_srun)


def test_cli_outside_a_job_fails_with_a_message():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch/slurm/slurm_env.py"), "plan"], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "inside a Slurm job" in proc.stderr


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (apt-get install slurm-client)")
def test_expand_nodelist_with_scontrol_and_a_minimal_config(tmp_path, monkeypatch):
    # scontrol only parses here, but it refuses to run without some configuration (docs/infra.md §1.4.3)
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=nohost\nNodeName=n1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert slurm_env.expand_nodelist("node[01-03]") == ["node01", "node02", "node03"]
    assert slurm_env.expand_nodelist("a[1-2],b[05-06],c") == ["a1", "a2", "b05", "b06", "c"]


def _args(*argv: str):
    args, train = submit.parse_args([*argv, "--", "--data.dataset=stdlib", "--distill.preset=none"])
    return args, train


def test_sbatch_command_per_launch_mode(tmp_path):
    args, train = _args("--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--exclusive")
    cmd, env = submit.sbatch_command(args, train, tmp_path / "run")
    assert "--nodes=4" in cmd and "--ntasks-per-node=1" in cmd and "--cpus-per-task=64" in cmd
    assert "--gpus-per-node=8" in cmd and "--requeue" in cmd and "--signal=B:USR1@300" in cmd
    assert "--partition=gpu" in cmd and "--exclusive" in cmd and "--open-mode=append" in cmd
    assert f"--output={tmp_path / 'run' / 'logs'}/%x-%j.log" in cmd
    assert cmd[-3:] == [str(submit.SBATCH_SCRIPT), "--data.dataset=stdlib", "--distill.preset=none"]
    assert env["TIDE_LAUNCH"] == "srun" and "TIDE_PROCS_PER_NODE" not in env
    args, train = _args("--launch", "tasks", "--gpus-per-node", "4", "--cpus-per-node", "32")
    cmd, env = submit.sbatch_command(args, train, tmp_path)
    assert "--ntasks-per-node=4" in cmd and "--cpus-per-task=8" in cmd and env["TIDE_LAUNCH"] == "tasks"
    args, train = _args("--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-node", "2", "--warn-seconds", "0")
    cmd, env = submit.sbatch_command(args, train, tmp_path)
    assert "--gpus-per-node=0" in cmd and env["TIDE_PROCS_PER_NODE"] == "2"
    assert not any(c.startswith("--signal") for c in cmd)


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--gpus-per-node", "0"), "needs --procs-per-node"),
        (("--gpus-per-node", "2", "--procs-per-node", "4"), "exceeds --gpus-per-node"),
        (("--nodes", "0"), "at least 1"),
        (("--launch", "slurm", "--gpus-per-node", "3", "--cpus-per-node", "8"), "does not split evenly"),
    ],
)
def test_sbatch_command_rejects_inconsistent_layouts(tmp_path, argv, message):
    args, train = _args(*argv)
    with pytest.raises(ValueError, match=message):
        submit.sbatch_command(args, train, tmp_path)


def test_submit_checks_the_config_before_queueing(tmp_path):
    def run(*train: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launch/slurm/submit.py"), "--dry-run", "--", *train],
                              capture_output=True, text=True, cwd=ROOT, check=False)

    proc = run("--train.max_stpes=3")
    assert proc.returncode == 2 and "did you mean 'train.max_steps'" in proc.stderr
    proc = run("--data.dataset=stdlib", "--distill.preset=none", "--train.overwrite=true")
    assert proc.returncode == 2 and "always resumes" in proc.stderr
    proc = run("--data.dataset=stdlib", "--distill.preset=none", f"--train.output_dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    assert f"TIDE_LOG_DIR={tmp_path / 'r' / 'logs'}" in proc.stdout and "sbatch --parsable" in proc.stdout
    assert not (tmp_path / "r").exists()  # a dry run creates nothing
