"""Starting a run: inputs are checked before a run directory exists; a failed start runs again as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_run_refuses_a_bad_teacher_before_creating_the_run_dir(tmp_path, capsys, monkeypatch, rank):
    sys.path.insert(0, str(ROOT / "launch"))
    from run import main

    import tide_ds.worlds as worlds

    def no_world(cfg):
        raise AssertionError("the world was started before the checks")

    monkeypatch.setattr(worlds, "prepare_world", no_world)
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "run"
    rc = main(["--world.name=code", f"--teacher.path={tmp_path / 'missing'}", f"--train.output_dir={out}"])
    err = capsys.readouterr().err.strip()
    # one line on every rank, before any process group, world or run directory
    assert rc == 2 and err.startswith(f"tide-ds: configuration error (rank {rank}): teacher.path=") and "\n" not in err
    assert "is not a directory" in err
    assert not out.exists()  # nothing created: the same command runs once the path is fixed


def test_a_start_that_failed_before_its_first_checkpoint_runs_again(tmp_path):
    from tide_ds.config import build_config
    from tide_ds.trainer import checkpoint

    out = tmp_path / "run"
    cfg = build_config(overrides=[f"--train.output_dir={out}"])
    checkpoint.prepare_run_dir(cfg)  # the first start: config.yaml, an empty checkpoints/ ...
    (out / "train.log").write_text("the teacher load failed\n")  # ... and then it failed
    decision = checkpoint.prepare_run_dir(cfg)  # the same command again
    assert decision.error is None  # started again in place (issue 16's rule: no checkpoint yet, nothing to keep apart)
    assert (out / "train.log").read_text() == "the teacher load failed\n"  # nothing deleted
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run"):  # with a checkpoint: never moved unasked
        checkpoint.prepare_run_dir(cfg)


def test_global_batch_and_epochs_are_resolved_for_any_caller_of_the_trainer(tmp_path):
    """build_run resolves train.global_batch_size and train.epochs itself (idempotently), not only launch/run.py."""
    import datasets
    import numpy as np

    from tide_ds.config import build_config
    from tide_ds.errors import ConfigError
    from tide_ds.plan.checks import resolve_training_size

    ids = np.zeros((37, 64), dtype=np.int64)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}),
                          "heldout": datasets.Dataset.from_dict({"input_ids": ids[:4], "labels": ids[:4]})}
                         ).save_to_disk(str(tmp_path / "d"))
    base = [f"--data.dataset={tmp_path / 'd'}", "--distill.preset=none", "--data.seq_len=64",
            "--diffusion.block_size=16", "--train.micro_batch_size=2"]
    cfg = build_config(overrides=[*base, "--train.global_batch_size=12", "--train.epochs=2"])
    out = resolve_training_size(cfg, world_size=2)
    assert out.train.gradient_accumulation_steps == 3 and out.train.max_steps == 7  # ceil(2 * 37 / 12)
    assert resolve_training_size(out, world_size=2) == out  # idempotent: launch/run.py resolved it already
    plain = build_config(overrides=base)
    assert resolve_training_size(plain, world_size=2) is plain  # neither option: untouched
    with pytest.raises(ConfigError, match=r"train.global_batch_size=12 is not divisible by .* = 2 \* 4 = 8"):
        resolve_training_size(cfg, world_size=4)
