"""Items 3, 5 and 7 of issue 16: mistakes reported before any work, nothing created; divergence; strict JSON."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tide_ds.config import build_config
from tide_ds.trainer import checkpoint
from tide_ds.trainer.divergence import Diverged, DivergenceTracker, finite_or_none
from tide_ds.trainer.metrics import MetricsWriter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_main():
    spec = importlib.util.spec_from_file_location("tide_run", ROOT / "launch" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _fails(run_main, capsys, tmp_path: Path, *args: str) -> str:
    """launch/run.py exits 2 with one error line, and creates nothing under tmp_path."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    assert run_main([f"--train.output_dir={out}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tide-ds: configuration error (rank 0): ") and err.count("\n") == 1, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return err


def test_ds_config_mistakes_are_named_before_any_work(run_main, capsys, tmp_path: Path) -> None:
    bad = tmp_path / "cfg"
    bad.mkdir()
    (bad / "broken.json").write_text('{"zero_optimization": {"stage": 2},}')
    (bad / "typo.json").write_text('{"zero_optimizaton": {"stage": 2}}')
    (bad / "zero_typo.json").write_text('{"zero_optimization": {"stgae": 2, "overlap_comm": true}}')
    err = _fails(run_main, capsys, tmp_path, f"--train.ds_config={bad / 'broken.json'}")
    assert "is not valid JSON" in err
    err = _fails(run_main, capsys, tmp_path, f"--train.ds_config={bad / 'typo.json'}")
    assert "unknown key 'zero_optimizaton' at the top level; did you mean 'zero_optimization'?" in err
    err = _fails(run_main, capsys, tmp_path, f"--train.ds_config={bad / 'zero_typo.json'}")
    assert "unknown key 'stgae' in zero_optimization; did you mean 'stage'?" in err


def test_the_shipped_ds_configs_pass() -> None:
    from tide_ds.trainer.engine import load_ds_json

    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        assert "zero_optimization" in load_ds_json(path)


def test_recipe_whose_top_level_is_not_a_mapping(run_main, capsys, tmp_path: Path) -> None:
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- train:\n    lr: 1.0\n")
    err = _fails(run_main, capsys, tmp_path, "--recipe", str(recipe))
    assert f"recipe {recipe} must be a mapping of sections (model:, data:, train:, ...) at its top level, got a list" in err


@pytest.mark.parametrize("option", ["--train.lr=nan", "--distill.calm_weight=nan", "--train.adam_eps=nan",
                                    "--train.grad_clip=inf", "--train.lr=inf"])
def test_non_finite_numbers_are_rejected(run_main, capsys, tmp_path: Path, option: str) -> None:
    name, value = option[2:].split("=")
    err = _fails(run_main, capsys, tmp_path, option)
    assert f"{name}={float(value)!r} must be a finite number" in err


def test_a_directory_that_is_not_a_run_is_refused(run_main, capsys, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "notes").mkdir()
    for mode in ("--train.resume=auto", "--train.overwrite=true", "--train.resume=never"):
        err = _fails(run_main, capsys, tmp_path, mode)
        assert f"train.output_dir={str(out)!r} is not empty and is not a tide-ds run (no .tide_ds_run): " \
               "it holds config.yaml, notes/" in err
    assert (out / "config.yaml").read_text() == "mine: true\n"


def test_a_run_that_failed_before_its_first_checkpoint_starts_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = build_config(overrides=[f"--train.output_dir={out}"])
    assert checkpoint.prepare_run_dir(cfg).resume_from is None  # creates the run, marker first
    assert (out / checkpoint.RUN_MARKER).is_file()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')  # it failed after its step-0 evaluation
    assert checkpoint.run_dir_error(cfg) is None  # the same command again
    assert checkpoint.prepare_run_dir(cfg).moved_aside is None
    # once it has a checkpoint, the same command is refused (never mixes into a run)
    (out / "checkpoints" / "step_00000001").mkdir()
    (out / "checkpoints" / "step_00000001" / "trainer_state.json").write_text("{}")
    assert "already holds a run (1 checkpoint(s))" in checkpoint.run_dir_error(cfg)


def test_divergence_stops_after_the_limit_of_consecutive_non_finite_steps() -> None:
    tracker = DivergenceTracker(3, torch.device("cpu"))
    inf = float("inf")
    steps = [(1.0, 0.5), (math.nan, 0.5), (1.0, inf), (1.0, 0.5), (1.0, inf), (2.0, inf)]  # never 3 in a row
    for loss, gn in steps:
        tracker.after_step(torch.tensor(loss), gn)
    record = tracker.window_record(6, skipped_steps=4)
    assert record == {"nonfinite_steps": 4, "nonfinite_steps_total": 4, "nonfinite_run": 2, "skipped_steps": 4}
    tracker.check(6, lr=1.0)  # a run of 2 < 3: goes on
    tracker.after_step(torch.tensor(1.0), torch.tensor(inf))  # the run continues across the record: 3 now
    record = tracker.window_record(7)
    assert record == {"nonfinite_steps": 1, "nonfinite_steps_total": 5, "nonfinite_run": 3}
    with pytest.raises(Diverged, match=r"NaN/inf for 3 consecutive steps \(train.max_nonfinite_steps=3\) since step 5, "
                                       r"stopped at step 7.*Lower --train.lr \(now 1e\+06\)") as info:
        tracker.check(7, lr=1e6)
    assert info.value.exit_code == 65
    assert DivergenceTracker(0, torch.device("cpu")).limit == 0  # 0: never stops


def test_metrics_are_strict_json(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, start_step=0)
    writer.write(3, "train", {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    record = json.loads(line, parse_constant=reject)
    assert record["loss"] is None and record["grad_norm"] is None and record["lr"] == 1e-3
    assert record["nonfinite"] == ["loss", "grad_norm"]
    assert finite_or_none({"a": 1.0}) == {"a": 1.0}


def test_dataset_and_weights_are_checked_before_start(run_main, capsys, tmp_path: Path) -> None:
    import datasets

    from tide_ds.models.hf_weights import save_safetensors_checkpoint

    data = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]}),
                          "heldout": datasets.Dataset.from_dict({"input_ids": [[1, 2]]}).select([])}).save_to_disk(str(data))
    capsys.readouterr()
    err = _fails(run_main, capsys, tmp_path, f"--data.dataset={data}", "--distill.preset=none")
    assert f"split 'heldout' of data.dataset={str(data)!r} is empty (no rows)" in err
    import shutil

    shutil.rmtree(data)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]}),
                          "heldout": datasets.Dataset.from_dict({"input_ids": [[1, 2]]})}).save_to_disk(str(data))
    capsys.readouterr()
    err = _fails(run_main, capsys, tmp_path, f"--data.dataset={data}", "--distill.preset=none", "--data.eval_split=test")
    assert "data.eval_split='test' is not a split of" in err and "splits: ['train', 'heldout']" in err
    teacher = tmp_path / "teacher"
    save_safetensors_checkpoint({"w": torch.ones(32, 32)}, teacher)
    (teacher / "config.json").write_text("{}")
    shard = teacher / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = _fails(run_main, capsys, tmp_path, f"--teacher.path={teacher}")
    assert f"teacher.path={str(teacher)!r}: {shard} (" in err and "is not a readable safetensors file" in err


def test_a_slurm_job_log_folder_does_not_make_a_directory_foreign(tmp_path: Path) -> None:
    """``submit.py``/``tide.sbatch`` write ``<run>/logs/<job>.log`` before the ranks start: the run starts there."""
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "tide-7.log").write_text("[tide.sbatch] job 7 ...\n")
    for resume in ("never", "auto"):
        cfg = build_config(overrides=[f"--train.output_dir={out}", f"--train.resume={resume}"])
        assert checkpoint.run_dir_error(cfg) is None
    assert checkpoint.prepare_run_dir(cfg).moved_aside is None
    assert (out / checkpoint.RUN_MARKER).is_file() and (out / "logs" / "tide-7.log").is_file()
    # anything else beside the log folder is still the user's, named in the refusal
    other = tmp_path / "other"
    (other / "logs").mkdir(parents=True)
    (other / "mine.txt").write_text("keep me\n")
    error = checkpoint.run_dir_error(build_config(overrides=[f"--train.output_dir={other}"]))
    assert error is not None and "it holds mine.txt." in error


def test_the_evidence_runners_files_do_not_make_a_directory_foreign(tmp_path: Path) -> None:
    """``python -m tide_ds.experiments.evidence`` writes its run spec and log into the run directory before the
    trainer starts (and its exit record after): the run starts there (issue 18)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("evidence_run.json", "train.log", "evidence_exit.json"):
        (out / name).write_text("{}\n")
    cfg = build_config(overrides=[f"--train.output_dir={out}", "--train.resume=auto"])
    assert checkpoint.run_dir_error(cfg) is None
    (out / "notes.txt").write_text("mine\n")
    error = checkpoint.run_dir_error(cfg)
    assert error is not None and "it holds notes.txt." in error
