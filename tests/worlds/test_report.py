"""The demo's report (tide_ds.worlds.report_world): one last line saying whether TIDE beat the no-distillation
baseline of the same world and rank count, in the student's units only; a runnable hint when there is none; the
students also in bits per byte of the responses scored, the teacher only in bits per byte of its held-out text.

The world here is real and tiny: a word-level tokenizer whose pieces spell known UTF-8 text, a held-out split
on disk and a teacher pretraining record, so every byte count below is known by hand."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import datasets
import pytest

from tide_ds.config import build_config
from tide_ds.worlds import (
    InstructWorld,
    baseline_verdict,
    comparison_command,
    fresh_output_dir,
    report_world,
    student_eval_units,
    teacher_bits_per_byte,
)
from tide_ds.worlds.pretrain import heldout_text_units
from tide_ds.worlds.pretrain import teacher_bits_per_byte as bits_of_units

ARGV = ["--local_rank=0", "--train.max_steps=150", "--train.output_dir=runs/demo", "--distill.preset=tide_cross"]


#: Pieces and the UTF-8 bytes they spell: "ab" 2, "cde" 3, "é" 2; the specials spell none.
PIECES = {"ab": 0, "cde": 1, "é": 2, "<eos>": 3, "<|mask|>": 4}
#: Held-out rows. Student labels (-100: not scored): row 0 "ab cde <eos>" = 3 tokens, 5 bytes; row 1 "é" = 1
#: token, 2 bytes; row 2 "ab ab" = 2 tokens, 4 bytes. Teacher tokens with attention 1: row 0 "ab cde <eos>" =
#: 3 tokens, 5 bytes; row 1 "é é ab <eos>" = 4 tokens, 6 bytes; row 2 "cde cde" = 2 tokens, 6 bytes.
HELDOUT = {
    "input_ids": [[0, 0, 1, 3], [2, 2, 2, 3], [0, 0, 3, 3]],
    "labels": [[-100, 0, 1, 3], [-100, -100, 2, -100], [0, 0, -100, -100]],
    "teacher_input_ids": [[0, 1, 3, 3], [2, 2, 0, 3], [1, 1, 1, 1]],
    "teacher_attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
}
TEACHER_NLL = 2.9871


def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(PIECES, unk_token="ab"))
    backend.decoder = decoders.Fuse()  # pieces joined as they are: the text's bytes are the pieces' bytes
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", mask_token="<|mask|>").save_pretrained(path)
    return path


@pytest.fixture
def world(tmp_path: Path, monkeypatch) -> InstructWorld:
    tok = _tokenizer(tmp_path / "tok")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(HELDOUT),
                          "heldout": datasets.Dataset.from_dict(HELDOUT)}).save_to_disk(str(tmp_path / "data"))
    teacher = tmp_path / "teacher-abc"
    teacher.mkdir()
    (teacher / "tide_ds_pretrain.json").write_text(json.dumps({"steps": 3, "heldout_nll": TEACHER_NLL}))
    monkeypatch.setenv("TIDE_DS_CACHE", str(tmp_path / "cache"))  # results.json of comparable runs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # as the DeepSpeed launcher sets it
    return InstructWorld(dataset=tmp_path / "data", teacher=teacher, teacher_tokenizer=tok,
                         teacher_heldout_nll=TEACHER_NLL, key="w1", pipeline="A")


def _cfg(world: InstructWorld, preset: str, *args: str):
    return build_config(overrides=["--train.max_steps=150", f"--distill.preset={preset}", "--data.eval_samples=2",
                                   f"--data.dataset={world.dataset}", f"--teacher.path={world.teacher}",
                                   f"--model.tokenizer={world.teacher_tokenizer}",
                                   *args])


def _report(world: InstructWorld, preset: str, nll: float, *args: str, tokens: int | None = 4) -> list[str]:
    cfg = _cfg(world, preset, *args)
    text = report_world(cfg, world, nll, Path(cfg.train.output_dir).resolve(), argv=ARGV, tokens=tokens)
    return text.splitlines()


def test_bits_per_byte_of_a_known_text(world) -> None:
    """Token and byte counts of the scored text, by hand, and the conversion: nats x tokens / (ln 2 x bytes)."""
    from tide_ds.data.tokenizers import load_tokenizer

    split = datasets.load_from_disk(str(world.dataset))["heldout"]
    tok = load_tokenizer(world.teacher_tokenizer)
    assert heldout_text_units(split, tok) == {"tokens": 9, "bytes": 17, "samples": 3}
    assert heldout_text_units(split, tok, max_samples=1) == {"tokens": 3, "bytes": 5, "samples": 1}
    assert bits_of_units(math.log(2), {"tokens": 8, "bytes": 8}) == 1.0  # ln 2 nats per token, a byte per token
    assert bits_of_units(2.0, {"tokens": 9, "bytes": 17}) == pytest.approx(1.5276, abs=1e-4)  # 18 / (ln 2 x 17)
    # the students: the first data.eval_samples=2 rows, labelled tokens: "ab cde <eos>" and "é"
    assert student_eval_units(_cfg(world, "tide_cross")) == ({"tokens": 4, "bytes": 7, "samples": 2}, "")
    assert student_eval_units(_cfg(world, "tide_cross", "--data.eval_samples=0"))[0] == {
        "tokens": 6, "bytes": 11, "samples": 3}
    units, why = student_eval_units(_cfg(world, "tide_cross"), tokens=5)  # not the text the evaluation scored
    assert units is None and why == "the 2 held-out samples hold 4 labelled tokens but the evaluation counted 5"
    # the teacher, cached before its record held the counts: counted now from the held-out split
    bits, units, why = teacher_bits_per_byte(world)
    assert (units, why) == ({"tokens": 9, "bytes": 17, "samples": 3}, "")
    assert bits == TEACHER_NLL * 9 / (math.log(2) * 17)
    # a record with the counts (built by this version) is read as it is
    (world.teacher / "tide_ds_pretrain.json").write_text(json.dumps(
        {"heldout_nll": TEACHER_NLL, "heldout_tokens": 90, "heldout_bytes": 170, "heldout_samples": 30,
         "heldout_bits_per_byte": 1.25}))
    assert teacher_bits_per_byte(world) == (1.25, {"tokens": 90, "bytes": 170, "samples": 30}, "")


def test_the_report_shows_the_teacher_in_bits_per_byte_only(world) -> None:
    lines = _report(world, "tide_cross", 3.2345)
    text = "\n".join(lines)
    assert "per teacher token" not in text and "2.9871" not in text  # never the teacher's nats per its own token
    teacher = next(line for line in lines if line.startswith("  teacher"))
    assert teacher == (f"  teacher (teacher-abc, own SentencePiece tokenizer): {2.9871 * 9 / (math.log(2) * 17):.4f} "
                       "bits per byte of its first 3 held-out teacher sequences (whole chat texts in its format, "
                       "prompts included; the students' numbers score responses only)")
    assert teacher.split(": ")[1].startswith("2.2815 bits per byte")
    assert lines[1].endswith("and in bits per byte of the 2 held-out responses scored (4 tokens, 7 bytes of UTF-8 text)")
    # the student: 3.2345 nats x 4 tokens / (ln 2 x 7 bytes) = 2.6665 bits per byte
    assert "  student, preset tide_cross (mode reverse_alm): 3.2345 (2.6665 bits per byte)" in lines
    # pipeline B: the teacher shares the student's tokenizer, and is still shown in bits per byte only
    lines = _report(dataclasses.replace(world, pipeline="B"), "tide_shared", 3.2345, "--distill.pipeline=B")
    assert "per teacher token" not in "\n".join(lines) and "  student, preset tide_shared (mode taid_aligned): " \
        "3.2345 (2.6665 bits per byte)" in lines
    assert next(line for line in lines if line.startswith("  teacher")).startswith(
        "  teacher (teacher-abc, WeDLM layout, the student's Qwen3 tokenizer): 2.2815 bits per byte of its first 3 "
        "held-out teacher sequences")
    # the evaluation scored other text than the held-out split holds: no student bits per byte, and why
    lines = _report(world, "tide_cross", 3.2345, tokens=5)
    assert "  student, preset tide_cross (mode reverse_alm): 3.2345" in lines
    assert "  (no bits per byte for the students: the 2 held-out samples hold 4 labelled tokens but the evaluation " \
           "counted 5)" in lines
    # no teacher record at all: the line says so and shows no number
    (world.teacher / "tide_ds_pretrain.json").unlink()
    teacher = next(line for line in _report(world, "tide_cross", 3.2345) if line.startswith("  teacher"))
    assert teacher.startswith("  teacher (teacher-abc, own SentencePiece tokenizer): not shown, its bits per byte "
                              "could not be computed (FileNotFoundError")


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


def test_with_a_baseline_the_last_line_says_by_how_much(world, monkeypatch) -> None:
    lines = _report(world, "none", 3.3685)
    assert lines[-1].startswith("No-distillation baseline: held-out NLL 3.3685 per student token; no TIDE run with "
                                "this world and 2 ranks to compare yet: deepspeed --num_gpus 2 launch/run.py "
                                "--train.max_steps=150 --distill.preset=tide_cross --train.output_dir=runs/demo-tide")
    lines = _report(world, "tide_cross", 3.2345)
    assert lines[-1] == ("TIDE (tide_cross) beat the no-distillation baseline by 0.1340 held-out NLL per student token "
                         "(3.2345 vs 3.3685, 4.0% lower).")
    # the baseline scored the same held-out responses: 3.3685 x 4 / (ln 2 x 7) = 2.7770 bits per byte
    assert "  student, no distillation (preset none, same world and 2 rank(s)): 3.3685 (2.7770 bits per byte)" in lines
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
