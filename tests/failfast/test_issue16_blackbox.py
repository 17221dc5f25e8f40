"""Issue 16, black box: each failure the issue lists, through ``launch/run.py``, the ``python -m tide_ds...``
CLIs and public functions that existed before any of the issue's work (commit ade1ac1).

The same file runs unchanged on that commit: the launch tests pick the option names the code accepts
(``--world.name=code`` now, ``--data.dataset=stdlib`` then), the rest use only names both have. The results
on both commits are in docs/failfast_evidence.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide_ds.config import build_config

ROOT = Path(__file__).resolve().parents[2]

COMMON = ["--distill.preset=none", "--data.seq_len=64", "--diffusion.block_size=16", "--data.eval_samples=8",
          "--model.hidden_size=32", "--model.intermediate_size=64", "--model.head_dim=16",
          "--train.micro_batch_size=2", "--train.lr=1e-2", "--train.log_every=1", "--train.progress_bar=false",
          "--train.tensorboard=false", "--train.eval_every=0"]


def _tiny() -> list[str]:
    """The code world's options in the names this checkout accepts."""
    try:
        build_config(overrides=["--world.name=code", "--distill.preset=none"])
        return ["--world.name=code", "--world.max_files=30", *COMMON]
    except ValueError:  # before issue 14's worlds: the built-in corpus was a data.dataset name
        return ["--data.dataset=stdlib", "--data.max_files=30", *COMMON]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    return env


def _deepspeed(out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
            str(ROOT / "launch" / "run.py"), f"--train.output_dir={out}", *_tiny(), *extra]


def _launch(out: Path, *extra: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """A 2-rank ``deepspeed launch/run.py``; the process group is killed at ``timeout`` (a hang fails the test)."""
    start = time.time()
    proc = subprocess.Popen(_deepspeed(out, *extra), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        pytest.fail(f"hang: the job was still running after {timeout:.0f} s; last output:\n{text[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, text, ""), time.time() - start


# --------------------------------------------------------------------------------------------------------------
# Items 1 and 2: a failing rank, a corrupt newest checkpoint (one real 2-rank run with two checkpoints)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """A 2-rank run with two checkpoints, and its output."""
    out = tmp_path_factory.mktemp("bb") / "run"
    proc, _ = _launch(out, "--train.max_steps=2", "--train.save_every=1")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    return out, proc.stdout


@pytest.fixture(scope="module")
def two_checkpoints(first_run) -> Path:
    return first_run[0]


@pytest.mark.slow
def test_lines_every_rank_printed_appear_once(first_run) -> None:
    """Item 9, log noise: DeepSpeed's accelerator notice comes from the launcher (printed before any rank starts),
    never again from a rank; the LM-head line and each deprecation notice at most once per job."""
    text = first_run[1]
    ranks = text[text.rindex("spawned with command"):]  # everything after the launcher started the ranks
    assert ranks.count("Setting accelerator to CPU") == 0, ranks[:3000]
    assert text.count("LM-head losses") <= 1, text[-6000:]
    warned = [line for line in text.splitlines() if "FutureWarning" in line]
    assert len(warned) == len(set(warned)), warned  # each deprecation notice once, not once per rank


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_rank_failing_during_resume_ends_the_job_at_once(two_checkpoints, tmp_path) -> None:
    """Item 1: rank 1's optimizer file of the only checkpoint truncated (no manifest to catch it): rank 1 fails in
    the resume; the job must end at once with one error naming rank 1, not wait for gloo's 10-minute timeout."""
    run = _copy(two_checkpoints, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    ckpt = run / "checkpoints" / "step_00000001"
    (ckpt / "manifest.json").unlink(missing_ok=True)  # a checkpoint without a manifest is loaded unchecked
    _truncate(next(ckpt.rglob("*zero_pp_rank_1_*optim_states.pt")))
    proc, took = _launch(run, "--train.max_steps=4", "--train.save_every=0", "--train.resume=auto", timeout=150)
    text = proc.stdout
    assert proc.returncode != 0, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("tide-ds: error")]
    assert len(errors) == 1 and errors[0].startswith("tide-ds: error (rank 1)"), text[-4000:]
    assert "Timed out" not in text and took < 120, (took, text[-3000:])


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_skipped(two_checkpoints, tmp_path) -> None:
    """Item 2: the newest checkpoint's model states truncated: the resume names it and loads the previous one."""
    run = _copy(two_checkpoints, tmp_path)
    _truncate(next((run / "checkpoints" / "step_00000002").rglob("mp_rank_00_model_states.pt")))
    proc, _ = _launch(run, "--train.max_steps=3", "--train.save_every=0", "--train.resume=auto", timeout=240)
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:]
    assert "step_00000002" in text and "step_00000001" in text, text[-4000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3], steps  # step 2 trained again from step 1's checkpoint


def test_an_emptied_trainer_state_is_skipped_by_the_readers(tmp_path) -> None:
    """Item 2: ``trainer_state.json`` emptied in the newest checkpoint: a reader of the run (generate, eval,
    export) takes the previous one instead of failing with 'Expecting value' naming no file."""
    from tide_ds.sampling.load import resolve_checkpoint

    run = tmp_path / "run"
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
        (ckpt / "config.yaml").write_text(build_config().to_yaml())
    (run / "checkpoints" / "step_00000002" / "trainer_state.json").write_text("")
    assert resolve_checkpoint(run) == ("deepspeed", run / "checkpoints" / "step_00000001")


# --------------------------------------------------------------------------------------------------------------
# Item 3: a directory that is not a tide-ds run


def test_resume_auto_refuses_a_directory_that_is_not_a_run(tmp_path) -> None:
    from tide_ds.trainer import checkpoint

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own config\n")
    cfg = build_config(overrides=[f"--train.output_dir={mine}", "--train.resume=auto"])
    with pytest.raises(ValueError, match="is not a tide-ds run"):
        checkpoint.prepare_run_dir(cfg)
    assert (mine / "config.yaml").read_text() == "my: own config\n"


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(tmp_path) -> None:
    """Item 7's last case: the first start created the run directory, then failed before a checkpoint; the same
    command must start again instead of refusing the directory it left."""
    from tide_ds.trainer import checkpoint

    cfg = build_config(overrides=[f"--train.output_dir={tmp_path / 'run'}"])
    checkpoint.prepare_run_dir(cfg)  # the first start (then it failed: no checkpoint)
    assert checkpoint.prepare_run_dir(cfg).resume_from is None  # the same command again


# --------------------------------------------------------------------------------------------------------------
# Item 5: divergence, strict JSON, non-finite options


@pytest.mark.slow
def test_a_diverged_run_stops_with_an_error_and_strict_json(tmp_path) -> None:
    out = tmp_path / "run"
    proc, _ = _launch(out, "--train.lr=1e30", "--train.max_steps=12", "--train.save_every=0", timeout=300)
    text = proc.stdout
    assert proc.returncode not in (0, 1), text[-4000:]  # its own status, not success and not a crash
    assert "diverged" in text, text[-4000:]

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=reject)


@pytest.mark.parametrize("option", ["--train.lr=nan", "--distill.calm_weight=nan", "--train.adam_eps=nan",
                                    "--train.grad_clip=inf"])
def test_non_finite_options_are_refused(option) -> None:
    with pytest.raises(ValueError, match="finite"):
        build_config(overrides=[option])


def test_metrics_jsonl_is_strict_json(tmp_path) -> None:
    from tide_ds.trainer.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, start_step=0)
    writer.write(3, "train", {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    writer.close()

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=reject)
    assert record["lr"] == 1e-3 and record["loss"] is None


# --------------------------------------------------------------------------------------------------------------
# Item 6: Ctrl-C


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_ends_the_job(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(_deepspeed(out, "--train.max_steps=300", "--train.save_every=0"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and '"step": 3' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before step 3"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            text, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not end within 60 s of Ctrl-C")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    ckpts = [p.name for p in (out / "checkpoints").glob("step_*")] if (out / "checkpoints").is_dir() else []
    assert len(ckpts) == 1, (ckpts, text[-3000:])  # the progress is kept with save_every=0


# --------------------------------------------------------------------------------------------------------------
# Item 7: mistakes reported before any work, nothing created


def test_a_ds_config_key_typo_is_an_error(tmp_path) -> None:
    from tide_ds.trainer.engine import load_ds_json

    path = tmp_path / "typo.json"
    path.write_text('{"zero_optimizaton": {"stage": 2}}')
    with pytest.raises(ValueError, match="zero_optimizaton"):
        load_ds_json(path)


def test_a_recipe_whose_top_level_is_a_list_is_a_config_error(tmp_path) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- train:\n    lr: 1.0e-3\n")
    with pytest.raises(ValueError, match="mapping"):
        build_config(recipe=recipe)


def _run_py(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """One ``python launch/run.py`` process as a 1-rank job (the launcher's variables, no launcher), killed at
    ``timeout``."""
    env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"still running after {timeout:.0f} s (the check came after the work): {str(err.stdout)[-2000:]}")
    return proc, time.time() - start


def test_an_existing_run_is_refused_before_deepspeed_starts(tmp_path) -> None:
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 4}')
    (out / ".tide_ds_run").write_text("{}\n")
    proc, _ = _run_py(tmp_path, f"--train.output_dir={out}", *_tiny())
    text = proc.stdout + proc.stderr
    assert "already holds a run" in text, text[-3000:]
    before = text[: text.index("already holds a run")]
    # nothing of DeepSpeed's start (its comm op, the accelerator) or of the trainer's came before the refusal
    assert not any(s in before for s in ("shm_comm_op", "Setting accelerator", "LM-head losses")), text[-3000:]
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]


def test_an_empty_train_split_is_named_before_any_work(tmp_path) -> None:
    import datasets

    data = tmp_path / "data"
    row = {"input_ids": [[1] * 64], "labels": [[1] * 64]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(row).select([]),
                          "heldout": datasets.Dataset.from_dict(row)}).save_to_disk(str(data))
    out = tmp_path / "run"
    proc, _ = _run_py(tmp_path, f"--train.output_dir={out}", f"--data.dataset={data}", *COMMON)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "'train'" in text and "empty" in text, text[-3000:]
    assert "Traceback" not in text and "list index out of range" not in text and not out.exists(), text[-3000:]


# --------------------------------------------------------------------------------------------------------------
# Item 9: the README's command descriptions match the CLIs


def test_the_readme_does_not_promise_checkpoint_to_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Every command takes `--checkpoint`" not in readme
    help_text = subprocess.run([sys.executable, "-m", "tide_ds.export", "--help"], cwd=ROOT, env=_env(),
                               capture_output=True, text=True, timeout=120).stdout
    if "--checkpoint" not in help_text:  # export takes it positionally: the README must say so
        assert "`export` takes the same as its first argument" in readme
