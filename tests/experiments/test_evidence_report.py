"""The evidence experiment's aggregation and reporting on synthetic run directories (no training): run status
(finished only with the final evaluation and checkpoint; unfinished, failed and missing runs are flagged, never
dropped), mean ± sample std over seeds, paired deltas, direction verdicts, the markdown tables and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tide_ds.experiments import evidence, report

STEPS = 40


def fake_run(run_dir: Path, *, nll: float | None, last_step: int = STEPS, checkpoint: bool = True,
             exit_code: int | None = 0, ce0: float = 12.0) -> Path:
    """A run directory as the trainer and the runner leave it: train records every 10 steps, evaluations at
    0 and 20 (and at STEPS with the final NLL when ``nll`` is given), a checkpoint, the runner's exit file."""
    run_dir.mkdir(parents=True)
    lines = [{"step": 0, "kind": "eval", "nll": 12.5}]
    for step in range(10, last_step + 1, 10):
        lines.append({"step": step, "kind": "train", "loss": ce0 - step / 10, "ce": ce0 - step / 10})
        if step == 20:
            lines.append({"step": 20, "kind": "eval", "nll": 11.0})
    if nll is not None:
        lines.append({"step": STEPS, "kind": "eval", "nll": nll})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if checkpoint:
        ckpt = run_dir / "checkpoints" / f"step_{last_step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
    if exit_code is not None:
        (run_dir / report.EXIT_FILE).write_text(json.dumps({"exit_code": exit_code, "wall_s": 10.0, "cpu_s": 9.0}))
    return run_dir


def collect(tmp_path: Path, variant: str, seed: int) -> report.RunResult:
    return report.collect_run(tmp_path / variant / f"seed{seed}", variant=variant, seed=seed, max_steps=STEPS)


def test_run_status_finished_unfinished_failed_missing(tmp_path):
    fake_run(tmp_path / "v" / "seed1", nll=9.5)
    fake_run(tmp_path / "v" / "seed2", nll=None, last_step=20, exit_code=None)  # killed mid-run
    fake_run(tmp_path / "v" / "seed3", nll=None, last_step=30, exit_code=1)  # crashed
    fake_run(tmp_path / "v" / "seed4", nll=9.0, checkpoint=False)  # final eval written, checkpoint not
    runs = {s: collect(tmp_path, "v", s) for s in (1, 2, 3, 4, 5)}
    assert runs[1].status == "finished" and runs[1].final_nll == 9.5
    assert runs[1].eval_nll == [(0, 12.5), (20, 11.0), (40, 9.5)]
    assert runs[1].train_ce == [(10, 11.0), (20, 10.0), (30, 9.0), (40, 8.0)]
    assert (runs[1].wall_s, runs[1].cpu_s) == (10.0, 9.0)
    assert runs[2].status == "unfinished" and runs[2].describe() == "unfinished at step 20/40"
    assert runs[3].status == "failed" and runs[3].describe() == "failed (exit code 1, last step 30/40)"
    assert runs[4].status == "unfinished" and runs[4].final_nll is None
    assert runs[5].status == "missing" and runs[5].describe() == "missing"


def test_metrics_reader_skips_cut_lines_and_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 0, "kind": "eval", "nll": 12.0}) + "\n"
        + json.dumps({"step": 0, "kind": "eval", "nll": 12.5}) + "\n"  # a restart re-evaluates step 0
        + json.dumps({"step": 5, "kind": "train", "ce": 11.0}) + "\n"
        + '{"step": 10, "kind": "tra'  # cut by a crash
    )
    train, evals = report.read_metrics(path)
    assert evals[0]["nll"] == 12.5 and list(train) == [5]


def test_mean_std_and_paired_delta():
    mean, std = report.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert math.isnan(report.mean_std([3.0])[1])
    with pytest.raises(ValueError, match="no run of this variant finished"):
        report.mean_std([])
    # differences -0.1, -0.12, -0.08: mean -0.1, std 0.02, t = -0.1 / (0.02 / sqrt 3) = -8.66 > 4.303
    d = report.paired_delta({1: 9.9, 2: 9.88, 3: 9.92, 4: 1.0}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert d.n == 3 and d.mean == pytest.approx(-0.1) and d.std == pytest.approx(0.02)
    assert d.t == pytest.approx(-0.1 / (0.02 / math.sqrt(3))) and d.resolved
    # its 95% t-interval: -0.1 ± t_2 * 0.02 / sqrt(3) = -0.1 ± 4.303 * 0.011547 = [-0.14969, -0.05031]
    assert d.ci95 == pytest.approx((-0.149688, -0.050312), abs=1e-5)
    assert d.to_json()["ci95"] == pytest.approx([-0.149688, -0.050312], abs=1e-5)
    noisy = report.paired_delta({1: 9.9, 2: 10.1, 3: 9.95}, {1: 10.0, 2: 10.0, 3: 10.0})
    assert not noisy.resolved
    lo, hi = noisy.ci95
    assert lo < 0 < hi  # an unresolved difference: the interval holds 0
    assert report.paired_delta({1: 9.0}, {1: 10.0, 2: 10.0}) is None  # one common seed: no test


def synthetic(tmp_path: Path) -> list[report.RunResult]:
    """Reference ``P/none`` at 10.0 ± small; ``P/good`` 0.1 lower on every seed; ``P/bad`` 0.2 higher on
    seeds 1-2, seed 3 unfinished."""
    values = {"P/none": [10.0, 10.02, 9.98], "P/good": [9.9, 9.93, 9.87], "P/bad": [10.2, 10.21, None]}
    runs = []
    for variant, nlls in values.items():
        for seed, nll in enumerate(nlls, start=1):
            fake_run(tmp_path / variant / f"seed{seed}", nll=nll, last_step=STEPS if nll else 20,
                     exit_code=0 if nll else None)
            runs.append(collect(tmp_path, variant, seed))
    return runs


LABELS = {"P/none": "none", "P/good": "good", "P/bad": "bad"}
REFS = {"P/good": "P/none", "P/bad": "P/none"}


def test_summary_flags_unfinished_runs_and_averages_the_finished(tmp_path):
    summaries = {s.variant: s for s in report.summarize(synthetic(tmp_path), labels=LABELS, references=REFS)}
    good, bad, none = summaries["P/good"], summaries["P/bad"], summaries["P/none"]
    assert good.mean == pytest.approx(9.9) and good.std == pytest.approx(0.03)
    assert good.delta.mean == pytest.approx(-0.1) and good.delta.n == 3
    assert bad.values == {1: 10.2, 2: 10.21} and bad.mean == pytest.approx(10.205)
    assert [r.seed for r in bad.not_finished] == [3] and bad.delta.n == 2
    assert none.delta is None and none.reference is None
    data = bad.to_json()
    assert data["finished"] == 2 and data["planned"] == 3 and data["not_finished"] == {"3": "unfinished at step 20/40"}

    table = report.variant_table(list(summaries.values()))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "9.9000 ± 0.0300" in rows["good"] and "-0.1000 ± " in rows["good"] and "*" in rows["good"]
    assert "10.2050 ± 0.0071 (2/3)" in rows["bad"] and "3: –" in rows["bad"]
    assert "seed 3 unfinished at step 20/40" in rows["bad"]
    assert "(reference)" in rows["none"]
    assert report.fmt_mean_std(None, None, 0, 3) == "– (0/3 finished)"


def test_direction_verdicts(tmp_path):
    summaries = report.summarize(synthetic(tmp_path), labels=LABELS, references=REFS)
    rows = report.check_direction(summaries, [
        report.Expectation("P/good", "P/none", "lower", "s"),
        report.Expectation("P/good", "P/none", "higher", "s"),
        report.Expectation("P/good", "P/none", "similar", "s"),
        report.Expectation("P/bad", "P/none", "higher", "s"),  # two seeds, +0.2 and +0.19: resolved
    ])
    assert [r["verdict"] for r in rows] == ["agrees", "opposite", "differs", "agrees"]
    noisy = report.check_direction(summaries, [report.Expectation("P/bad", "P/good", "similar", "s")])
    assert noisy[0]["verdict"] == "differs"  # +0.3 on both common seeds
    assert report.check_direction(
        report.summarize(synthetic(tmp_path / "again"), labels=LABELS, references=REFS),
        [report.Expectation("P/none", "P/none", "similar", "s")],
    )[0]["verdict"] == "agrees (no resolved difference)"
    with pytest.raises(ValueError, match="lower, higher or similar"):
        report.check_direction(summaries, [report.Expectation("P/good", "P/none", "better", "s")])
    text = report.direction_table(rows, labels=LABELS)
    tiny = {**rows[0], "delta": {"mean": -2.1e-6, "std": 3e-7, "n": 3, "t": -12.1, "resolved": True}}
    assert "| -2.1e-06 ± 3.0e-07 (n=3, t=-12.10) |" in report.direction_table([tiny], labels=LABELS)
    # differences -0.1, -0.09, -0.11: 95% t-interval -0.1 ± 4.303 * 0.01 / sqrt(3) = [-0.1248, -0.0752]
    assert "| good vs none | lower | s | -0.1000 ± 0.0100 [-0.1248, -0.0752] (n=3, t=-17.32) | agrees |" in text


def test_write_report_json_and_markdown(tmp_path):
    plan = evidence.Plan(variants=("A/none", "A/tide_cross"), seeds=(1, 2), steps=STEPS, micro_batch_size=16,
                         ranks_per_run=1, eval_samples=0, eval_every=20, log_every=10, save_every=20)
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir / "A" / "none" / "seed1", nll=10.0)
    fake_run(runs_dir / "A" / "none" / "seed2", nll=10.1)
    fake_run(runs_dir / "A" / "tide_cross" / "seed1", nll=9.8)
    worlds = {"A": evidence.World("A", "/data/a", "/ckpt/teacher-a", 5.4)}
    jobs = evidence.plan_jobs(plan, worlds, runs_dir)
    assert [(j.variant.key, j.seed) for j in jobs] == [("A/none", 1), ("A/tide_cross", 1), ("A/none", 2), ("A/tide_cross", 2)]
    results = [report.collect_run(j.run_dir, variant=j.variant.key, seed=j.seed, max_steps=STEPS) for j in jobs]
    meta = {"command": "python -m tide_ds.experiments.evidence", "parallel": 2, "date": "today",
            "git": {"commit": "abc", "uncommitted_code_changes": []}, "machine": evidence.machine_state(),
            "loadavg_start": [0.0, 0.0, 0.0], "loadavg_end": [0.0, 0.0, 0.0]}
    refs = {"A": {"uniform_nll": 11.93, "unigram_nll": 5.6, "unigram_smoothing": 0.1, "heldout_maskable_tokens": 50,
                  "heldout_samples": 2}}
    data = evidence.write_report(tmp_path / "out", plan=plan, jobs=jobs, results=results, worlds=worlds, meta=meta,
                                 with_plot=False, references=refs)
    assert data["runs_finished"] == 3 and data["runs_planned"] == 4
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"][1]["not_finished"] == {"2": "missing"}
    assert saved["directions"][0]["verdict"] == "not measured"  # one common seed
    md = (tmp_path / "out" / "results.md").read_text()
    assert "seed 2 missing" in md and "Runs: 3/4 finished" in md and "held-out NLL 5.4000" in md
    assert "uniform over the tokenizer 11.9300, unigram of the training responses 5.6000" in md


def test_plan_checks_and_run_reuse(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'A/kl'"):
        evidence.Plan(variants=("A/kl",), seeds=(1,), steps=1, micro_batch_size=1, ranks_per_run=1, eval_samples=0,
                      eval_every=0, log_every=1, save_every=0)
    with pytest.raises(ValueError, match="distinct seeds"):
        evidence.Plan(variants=("A/none",), seeds=(1, 1), steps=1, micro_batch_size=1, ranks_per_run=1,
                      eval_samples=0, eval_every=0, log_every=1, save_every=0)
    plan = evidence.Plan(variants=("A/none", "B/tide_shared-no_compdemo"), seeds=(1,), steps=10, micro_batch_size=4,
                         ranks_per_run=1, eval_samples=0, eval_every=5, log_every=5, save_every=5)
    worlds = {p: evidence.World(p, f"/data/{p}", f"/ckpt/{p}", 5.0) for p in "AB"}
    none, ablation = evidence.plan_jobs(plan, worlds, tmp_path)
    assert not any(a.startswith("--teacher.path") for a in none.args)
    assert "--teacher.path=/ckpt/B" in ablation.args and "--distill.comp_demo=false" in ablation.args
    assert "--distill.pipeline=B" in ablation.args and "--train.seed=1" in ablation.args
    evidence.check_reusable(none, plan)  # nothing there yet
    none.run_dir.mkdir(parents=True)
    (none.run_dir / evidence.SPEC_FILE).write_text(json.dumps(evidence._spec(none, plan)))
    evidence.check_reusable(none, plan)  # the same plan: reused
    longer = evidence.Plan(**{**plan.__dict__, "steps": 20})
    with pytest.raises(ValueError, match=r"another plan \(differing: .*max_steps"):
        evidence.check_reusable(evidence.plan_jobs(longer, worlds, tmp_path)[0], longer)
    # the same plan started from another checkout (absolute recipe path there) is reused here
    other = {**evidence._spec(none, plan), "args": [a.replace("--recipe=", "--recipe=/elsewhere/tide-ds/") for a in none.args]}
    (none.run_dir / evidence.SPEC_FILE).write_text(json.dumps(other))
    evidence.check_reusable(none, plan)
    (ablation.run_dir).mkdir(parents=True)
    (ablation.run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="not a run of this experiment"):
        evidence.check_reusable(ablation, plan)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    summaries = report.summarize(synthetic(tmp_path), labels=LABELS, references=REFS)
    path = report.plot({"P": summaries}, tmp_path / "e.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_context_free_references(tmp_path):
    datasets = pytest.importorskip("datasets")
    # training responses: token 0 three times, token 1 once (-100 = prompt); held out: tokens 0 and 2
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"labels": [[-100, 0, 0, 1], [-100, -100, 0, -100]]}),
        "heldout": datasets.Dataset.from_dict({"labels": [[-100, 0, 2]]}),
    }).save_to_disk(str(tmp_path / "ds"))
    ref = evidence.context_free_references(tmp_path / "ds", vocab_size=4, smoothing=1.0)
    p0, p2 = (3 + 1) / (4 + 4), (0 + 1) / (4 + 4)
    assert ref["unigram_nll"] == pytest.approx(-(math.log(p0) + math.log(p2)) / 2)
    assert ref["uniform_nll"] == pytest.approx(math.log(4))
    assert (ref["heldout_maskable_tokens"], ref["heldout_samples"]) == (2, 1)


def test_runner_skips_a_finished_run_and_one_locked_by_another_invocation(tmp_path):
    import fcntl

    plan = evidence.Plan(variants=("A/none",), seeds=(1, 2), steps=STEPS, micro_batch_size=4, ranks_per_run=1,
                         eval_samples=0, eval_every=20, log_every=10, save_every=20)
    worlds = {"A": evidence.World("A", "/data/a", "/ckpt/a", 5.0)}
    finished, locked = evidence.plan_jobs(plan, worlds, tmp_path / "runs")
    fake_run(finished.run_dir, nll=9.0)
    runner = evidence.Runner(plan, parallel=1, threads_per_rank=1)
    runner._launch = lambda job: pytest.fail(f"launched {job.run_dir}")  # neither run may start a trainer
    assert runner.run(finished).final_nll == 9.0
    (tmp_path / "runs" / ".locks").mkdir(parents=True, exist_ok=True)
    with open(tmp_path / "runs" / ".locks" / "A-none-seed2.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert runner.run(locked).status == "missing"


def test_evidence_world_plan_args_and_baselines(tmp_path):
    """--world=evidence: the evidence recipe, the world's tokenizer and dataset per data setting, B's shared vocabulary,
    and pipeline B compared with A's no-distillation run when both pipelines' student data are identical."""
    variants = ("A/none", "A/tide_cross", "B/kl", "A/none@full", "B/tide_shared@full")
    plan = evidence.Plan(variants=variants, seeds=(1,), steps=10, micro_batch_size=4, ranks_per_run=1, eval_samples=0,
                         eval_every=5, log_every=5, save_every=5, world="evidence", lr=1e-3)
    common = dict(teacher_nll=3.0, student_vocab=2006, student_tokenizer="/w/student-tokenizer", heldout_tokens=10,
                  heldout_bytes=30, shared_vocab_size=2005, student_init="/w/student-init")
    worlds = {"A": evidence.World("A", "/w/a-limited", "/w/teacher-a", **common),
              "A@full": evidence.World("A", "/w/a-full", "/w/teacher-a", **common),
              "B": evidence.World("B", "/w/b-limited", "/w/teacher-b", same_student_data_as_a=True, **common),
              "B@full": evidence.World("B", "/w/b-full", "/w/teacher-b", same_student_data_as_a=True, **common)}
    jobs = {j.variant.key: j for j in evidence.plan_jobs(plan, worlds, tmp_path)}
    assert "--recipe=launch/recipes/evidence.yaml" in jobs["A/none"].args
    assert "--data.dataset=/w/a-limited" in jobs["A/none"].args and "--data.dataset=/w/a-full" in jobs["A/none@full"].args
    assert "--model.tokenizer=/w/student-tokenizer" in jobs["B/kl"].args
    for key in variants:  # every variant and seed starts from the world's student, none from random weights
        assert "--model.path=/w/student-init" in jobs[key].args and "--train.lr=0.001" in jobs[key].args, key
    assert evidence.parse_args(["--world", "evidence"]).lr is None  # main() then takes EVIDENCE_LR
    with pytest.raises(ValueError, match="--lr=-1"):
        evidence.Plan(**{**plan.__dict__, "lr": -1.0})
    assert "--distill.shared_vocab_size=2005" in jobs["B/kl"].args  # every id but the mask token and "--teacher.path=/w/teacher-b" in jobs["B/kl"].args
    assert not any(a.startswith("--distill.shared_vocab_size") for a in jobs["A/tide_cross"].args)
    assert jobs["A/none@full"].run_dir == tmp_path / "A" / "none@full" / "seed1"
    planned = set(variants)
    assert evidence.baseline_of("B/kl", planned, worlds) == "A/none"
    assert evidence.baseline_of("B/tide_shared@full", planned, worlds) == "A/none@full"
    assert evidence.baseline_of("A/tide_cross", planned, worlds) == "A/none"
    different = {**worlds, "B": evidence.World("B", "/w/b-limited", "/w/teacher-b", **common)}
    assert evidence.baseline_of("B/kl", planned, different) is None  # other student data: no stand-in
    with pytest.raises(ValueError, match="only in --world=evidence"):
        evidence.Plan(variants=("A/none@full",), seeds=(1,), steps=1, micro_batch_size=1, ranks_per_run=1,
                      eval_samples=0, eval_every=0, log_every=1, save_every=0)
