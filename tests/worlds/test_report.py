"""The demo's report (tide_ds.worlds.report_world): one last line saying whether TIDE beat the no-distillation
baseline of the same world and rank count, in the student's units only; a runnable hint when there is none."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tide_ds.config import build_config
from tide_ds.worlds import InstructWorld, baseline_verdict, comparison_command, fresh_output_dir, report_world

ARGV = ["--local_rank=0", "--train.max_steps=150", "--train.output_dir=runs/demo", "--distill.preset=tide_cross"]


@pytest.fixture
def world(tmp_path: Path, monkeypatch) -> InstructWorld:
    monkeypatch.setenv("TIDE_DS_CACHE", str(tmp_path / "cache"))  # results.json of comparable runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # as the DeepSpeed launcher sets it
    return InstructWorld(dataset=tmp_path / "data", teacher=tmp_path / "teacher-abc", teacher_tokenizer=tmp_path / "tok",
                         teacher_heldout_nll=2.9871, key="w1", pipeline="A")


def _report(world: InstructWorld, preset: str, nll: float, *args: str) -> list[str]:
    cfg = build_config(overrides=["--train.max_steps=150", f"--distill.preset={preset}", *args])
    text = report_world(cfg, world, nll, Path(cfg.train.output_dir).resolve(), argv=ARGV)
    return text.splitlines()


def test_without_a_baseline_the_hint_names_the_rank_count_and_a_fresh_directory(world, caplog) -> None:
    Path("runs/demo-none").mkdir(parents=True)  # a directory of an earlier attempt: the hint must not name it
    with caplog.at_level(logging.INFO, logger="tide_ds.worlds"):
        lines = _report(world, "tide_cross", 3.2345)
    assert caplog.records and caplog.records[-1].getMessage().splitlines() == lines
    assert lines[-1] == (
        "Did TIDE beat the no-distillation baseline? Not known: no baseline with this world and 2 ranks yet; run it "
        "with: deepspeed --num_gpus 2 launch/run.py --train.max_steps=150 --distill.preset=none "
        "--train.output_dir=runs/demo-none-2"
    )
    assert "  student, no distillation (preset none, same world and 2 rank(s)): not run yet" in lines
    teacher = next(line for line in lines if line.startswith("  teacher"))
    assert teacher.endswith("2.9871 per teacher token (other units: not comparable with the student's)")


def test_with_a_baseline_the_last_line_says_by_how_much(world, monkeypatch) -> None:
    lines = _report(world, "none", 3.3685)
    assert lines[-1].startswith("No-distillation baseline: held-out NLL 3.3685 per student token; no TIDE run with "
                                "this world and 2 ranks to compare yet: deepspeed --num_gpus 2 launch/run.py "
                                "--train.max_steps=150 --distill.preset=tide_cross --train.output_dir=runs/demo-tide")
    lines = _report(world, "tide_cross", 3.2345)
    assert lines[-1] == ("TIDE (tide_cross) beat the no-distillation baseline by 0.1340 held-out NLL per student token "
                         "(3.2345 vs 3.3685, 4.0% lower).")
    assert "  student, no distillation (preset none, same world and 2 rank(s)): 3.3685" in lines
    assert sum("beat" in line for line in lines) == 1  # one verdict, at the end
    # a run of another rank count is not compared with the 2-rank baseline
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_SIZE", "1")
    lines = _report(world, "tide_cross", 3.2345)
    assert lines[-1].startswith("Did TIDE beat the no-distillation baseline? Not known: no baseline with this world "
                                "and 1 rank yet; run it with: deepspeed --num_gpus 1 launch/run.py")


def test_the_verdict_in_each_case() -> None:
    assert baseline_verdict("calm", 3.5, {"none": 3.4, "calm": 3.5}, world_size=1, command="x") == (
        "TIDE (calm) did not beat the no-distillation baseline: 0.1000 held-out NLL per student token worse "
        "(3.5000 vs 3.4000).")
    assert baseline_verdict("kl", 3.4, {"none": 3.4}, world_size=1, command="x") == (
        "TIDE (kl) tied the no-distillation baseline (3.4000 held-out NLL per student token).")
    assert baseline_verdict("none", 3.4, {"none": 3.4, "tide_cross": 3.3, "calm": 3.5}, world_size=1, command="x") == (
        "No-distillation baseline: held-out NLL 3.4000 per student token; TIDE (calm) did not beat the "
        "no-distillation baseline: 0.1000 held-out NLL per student token worse (3.5000 vs 3.4000); TIDE (tide_cross) "
        "beat the no-distillation baseline by 0.1000 held-out NLL per student token (3.3000 vs 3.4000, 2.9% lower).")


def test_the_comparison_command(tmp_path: Path) -> None:
    argv = ["--local_rank", "1", "--recipe", "r.yaml", "--distill.mode", "reverse_alm", "--train.resume=auto",
            "--train.overwrite", "--data.seq_len=64"]
    assert comparison_command(argv, world_size=8, local_world_size=8, extra=["--distill.preset=none"],
                              output_dir="o") == (
        "deepspeed --num_gpus 8 launch/run.py --recipe r.yaml --data.seq_len=64 --distill.preset=none "
        "--train.output_dir=o")
    assert comparison_command([], world_size=16, local_world_size=8, extra=[], output_dir="o") == (
        "<this run's launcher, 16 ranks> launch/run.py --train.output_dir=o")
    (tmp_path / "run-none").mkdir()
    (tmp_path / "run-none-2").mkdir()
    assert fresh_output_dir(tmp_path / "run", "none") == str(tmp_path / "run-none-3")


def test_world_baseline_asks_for_the_baseline_only_when_none_is_recorded(world) -> None:
    from tide_ds.worlds import baseline_config, comparison_key
    from tide_ds.worlds.instruct import record_result

    cfg = build_config(overrides=["--train.max_steps=150", "--distill.preset=tide_cross", "--distill.comp_demo=true",
                                  "--world.baseline=false"])
    assert baseline_config(cfg, world) is None  # asked not to
    cfg = build_config(overrides=["--train.max_steps=150", "--distill.preset=tide_cross", "--distill.comp_demo=true",
                                  "--train.resume=auto"])  # on by default
    Path("runs/demo-none").mkdir(parents=True)
    base = baseline_config(cfg, world)
    assert base.distill.preset == "none" and base.distill.mode == "" and base.distill.comp_demo is None
    assert base.train.output_dir == "runs/demo-none-2" and base.train.resume == "never"
    assert base.train.max_steps == 150 and base.world == cfg.world and base.model == cfg.model
    assert comparison_key(base, world) == comparison_key(cfg, world)  # the report compares the two
    record_result(comparison_key(cfg, world), "none", 3.5)
    assert baseline_config(cfg, world) is None  # recorded: reused, not trained again
    none = build_config(overrides=["--distill.preset=none", "--world.baseline=true"])
    assert baseline_config(none, world) is None
