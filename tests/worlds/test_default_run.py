"""The embedded default (`deepspeed launch/run.py`, the full TIDE demo) on a reduced world.

Fresh cache: the demo builds its corpus, teacher tokenizer, pipeline-A dataset and teacher, then
distils. A CE-only run of the same configuration first, so the TIDE run's report can show the
no-distillation baseline beside the student and the teacher.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from test_train_e2e import ROOT, _env, _free_port  # noqa: E402

pytestmark = pytest.mark.slow

# The default recipe, only smaller: fewer source files, a shorter teacher pretraining, a few steps.
REDUCED = ["--world.max_files=40", "--world.teacher_steps=20", "--data.eval_samples=16", "--train.max_steps=6",
           "--train.eval_every=0", "--train.log_every=1", "--train.progress_bar=false", "--train.tensorboard=false",
           "--train.micro_batch_size=4"]


def _launch(out: Path, cache: Path, *extra: str):
    import subprocess

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launch" / "run.py"), f"--train.output_dir={out}", *REDUCED, *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**_env(), "TIDE_DS_CACHE": str(cache)}, capture_output=True, text=True,
                          timeout=900)


def test_default_run_is_the_tide_demo_with_baseline_report(tmp_path):
    cache = tmp_path / "cache"
    base = _launch(tmp_path / "none", cache, "--distill.preset=none")
    assert base.returncode == 0, base.stdout[-4000:] + base.stderr[-4000:]
    tide = _launch(tmp_path / "tide", cache)
    log = tide.stdout + tide.stderr
    assert tide.returncode == 0, log[-8000:]
    assert "mode reverse_alm" in log and "objective: mode reverse_alm" in log
    records = [json.loads(line) for line in (tmp_path / "tide" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6 and all(r["calm_rev"] > 0 and r["active_chunks"] > 0 for r in train)
    final = [r for r in records if r["kind"] == "eval"][-1]["nll"]
    base_final = [json.loads(x) for x in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    base_nll = [r for r in base_final if r["kind"] == "eval"][-1]["nll"]
    # The report: teacher, student, baseline (the earlier comparable run) and where the run lives.
    # The student in nats per student token and bits per byte of the scored responses; the teacher only in bits
    # per byte of its own held-out sequences (issue 16 item 9), never per teacher token.
    teacher = re.search(r"teacher \(.*own SentencePiece tokenizer\): ([0-9.]+) bits per byte of its first (\d+) "
                        r"held-out teacher sequences", log)
    student = re.search(r"student, preset tide_cross \(mode reverse_alm\): ([0-9.]+) \(([0-9.]+) bits per byte\)", log)
    baseline = re.search(r"student, no distillation \(preset none, same world and 2 rank\(s\)\): ([0-9.]+) "
                         r"\(([0-9.]+) bits per byte\)", log)
    scored = re.search(r"bits per byte of the (\d+) held-out responses scored \((\d+) tokens, (\d+) bytes", log)
    assert teacher and student and baseline and scored, log[-3000:]
    assert "per teacher token" not in log[log.index("TIDE demo, pipeline A"):]
    assert float(student.group(1)) == pytest.approx(final, abs=1e-4)
    assert float(baseline.group(1)) == pytest.approx(base_nll, abs=1e-4)
    import datasets

    heldout = len(datasets.load_from_disk(str(next((cache / "demo").glob("pipeline-a-*"))))["heldout"])
    assert int(scored.group(1)) == min(16, heldout)  # data.eval_samples=16 (the reduced world holds fewer)
    tokens, n_bytes = int(scored.group(2)), int(scored.group(3))
    assert float(student.group(2)) == pytest.approx(final * tokens / (math.log(2) * n_bytes), abs=1e-4)
    assert float(baseline.group(2)) == pytest.approx(base_nll * tokens / (math.log(2) * n_bytes), abs=1e-4)
    pretrain = json.loads(next((cache / "demo").glob("teacher-*/tide_ds_pretrain.json")).read_text())
    assert int(teacher.group(2)) == pretrain["heldout_samples"] == min(64, heldout)
    assert pretrain["heldout_bits_per_byte"] == pytest.approx(
        pretrain["heldout_nll"] * pretrain["heldout_tokens"] / (math.log(2) * pretrain["heldout_bytes"]))
    assert float(teacher.group(1)) == pytest.approx(pretrain["heldout_bits_per_byte"], abs=1e-4)
    assert f"logs, metrics and checkpoints: {tmp_path / 'tide'}" in log
    # ... ending with one line: did TIDE beat the baseline, by how much, in the student's units only
    lines = log.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  logs, metrics and checkpoints: {tmp_path / 'tide'}"))
    verdict, gap = lines[at + 1], float(baseline.group(1)) - float(student.group(1))
    word = "beat the no-distillation baseline by" if gap > 0 else "did not beat the no-distillation baseline"
    assert verdict.startswith(f"TIDE (tide_cross) {word}"), verdict
    by = float(re.search(r"([0-9.]+) held-out NLL per student token", verdict).group(1))
    assert by == pytest.approx(abs(gap), abs=2e-4)  # the report's numbers are rounded to 4 places
    assert "teacher" not in verdict
    # the baseline's own report named the command of the TIDE run to compare with: rank count, a fresh directory
    base_log = base.stdout + base.stderr
    assert ("no TIDE run with this world and 2 ranks to compare yet: deepspeed --num_gpus 2 launch/run.py "
            in base_log and f"--distill.preset=tide_cross --train.output_dir={tmp_path / 'none'}-tide" in base_log)
    _assert_lines_once(log)
    world = json.loads(next((cache / "demo").glob("teacher-*/tide_ds_pretrain.json")).read_text())
    assert world["steps"] == 20 and world["heldout_nll"] < world["heldout_nll_before"]


def _assert_lines_once(log: str) -> None:
    """Issue 16's log noise: DeepSpeed's accelerator notice comes from the launcher (which prints it before any
    rank starts), never again from a rank; the LM-head line and each deprecation notice at most once per job."""
    ranks = log[log.rindex("spawned with command"):]  # everything after the launcher started the ranks
    assert ranks.count("Setting accelerator to CPU") == 0, ranks[:3000]
    assert log.count("LM-head losses") <= 1, log[-6000:]
    warned = [line for line in log.splitlines() if "FutureWarning" in line]
    assert len(warned) == len(set(warned)), warned  # each deprecation notice once, not once per rank


def test_world_baseline_true_trains_the_missing_baseline_and_reports_against_it(tmp_path):
    """--world.baseline=true on a world without a comparable baseline: the job trains it after the TIDE run,
    into <output_dir>-none, and the report's last line compares the two."""
    cache = tmp_path / "cache"
    proc = _launch(tmp_path / "tide", cache, "--world.baseline=true", "--train.max_steps=3")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    base_records = [json.loads(x) for x in (tmp_path / "tide-none" / "metrics.jsonl").read_text().splitlines()]
    base_nll = [r for r in base_records if r["kind"] == "eval"][-1]["nll"]
    assert all("calm_rev" not in r for r in base_records if r["kind"] == "train")  # CE only
    baseline = re.search(r"student, no distillation \(preset none, same world and 2 rank\(s\)\): ([0-9.]+)", log)
    assert baseline and float(baseline.group(1)) == pytest.approx(base_nll, abs=1e-4), log[-3000:]
    lines = log.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  logs, metrics and checkpoints: {tmp_path / 'tide'}"))
    assert re.match(r"TIDE \(tide_cross\) (beat|did not beat|tied) the no-distillation baseline", lines[at + 1]), lines[at + 1]
    assert "Not known" not in log
