"""Aggregation and reporting of the evidence runs: read each run's ``metrics.jsonl``, decide whether the run
finished, summarise the held-out NLL per variant over seeds (mean ± sample std), compare variants with paired
differences (same seed = same initial weights, data order and noise), and write the markdown table and the plot.

Nothing here trains or imports torch: the functions work on run directories and plain dicts, so they are
tested on synthetic metrics (``tests/experiments/test_evidence_report.py``).

A run that did not finish is never dropped silently: it stays in every table with its status (``missing``,
``unfinished at step k/N`` or ``failed (exit code c)``), and a variant's mean says over how many seeds it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tide_ds.utils.files import atomic_path

#: Written by the evidence runner beside each run's metrics: the exit code and the time the run took.
EXIT_FILE = "evidence_exit.json"

#: Two-sided 95% critical values of Student's t, by degrees of freedom (df > 30 uses 1.96).
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
             11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
             20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
             29: 2.045, 30: 2.042}


def t_crit_95(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom df={df} must be >= 1 (a paired test needs two or more seeds)")
    return T_CRIT_95.get(df, 1.96)


# ---------------------------------------------------------------------------------------------------------
# One run


def read_metrics(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """The ``train`` and ``eval`` records of a ``metrics.jsonl`` keyed by step.

    A line cut by a crash is skipped; when a step appears twice (a run restarted in its directory writes its
    step-0 evaluation again, a resumed finished run its last one), the later record wins.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    path = Path(path)
    if not path.is_file():
        return train, evals
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if record.get("kind") == "train":
            train[int(record["step"])] = record
        elif record.get("kind") == "eval":
            evals[int(record["step"])] = record
    return train, evals


def final_checkpoint_done(run_dir: str | Path, step: int) -> bool:
    """Whether the trainer's final checkpoint at ``step`` is complete (it is moved into place last)."""
    return (Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").is_file()


@dataclass
class RunResult:
    """What one (variant, seed) run left behind."""

    variant: str
    seed: int
    max_steps: int
    status: str  # finished | unfinished | failed | missing
    step: int = 0  # last training step with a record
    final_nll: float | None = None
    train_ce: list[tuple[int, float]] = field(default_factory=list)
    eval_nll: list[tuple[int, float]] = field(default_factory=list)
    exit_code: int | None = None
    wall_s: float | None = None
    cpu_s: float | None = None
    run_dir: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def describe(self) -> str:
        """The status in words, as the tables print it."""
        if self.status == "finished":
            return "finished"
        if self.status == "failed":
            return f"failed (exit code {self.exit_code}, last step {self.step}/{self.max_steps})"
        if self.status == "unfinished":
            return f"unfinished at step {self.step}/{self.max_steps}"
        return "missing"

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "seed": self.seed, "status": self.status, "status_text": self.describe(),
            "step": self.step, "max_steps": self.max_steps, "final_nll": self.final_nll,
            "exit_code": self.exit_code, "wall_s": self.wall_s, "cpu_s": self.cpu_s, "run_dir": self.run_dir,
            "train_ce": [list(p) for p in self.train_ce], "eval_nll": [list(p) for p in self.eval_nll],
        }


def collect_run(run_dir: str | Path, *, variant: str, seed: int, max_steps: int) -> RunResult:
    """Read one run directory. It is ``finished`` only when the held-out evaluation at ``max_steps`` is
    recorded and the final checkpoint is complete; a non-zero exit code recorded by the runner makes an
    unfinished run ``failed``."""
    run_dir = Path(run_dir)
    result = RunResult(variant=variant, seed=seed, max_steps=max_steps, status="missing", run_dir=str(run_dir))
    exit_info = {}
    if (run_dir / EXIT_FILE).is_file():
        try:
            exit_info = json.loads((run_dir / EXIT_FILE).read_text())
        except json.JSONDecodeError:
            exit_info = {}
    result.exit_code = exit_info.get("exit_code")
    result.wall_s = exit_info.get("wall_s")
    result.cpu_s = exit_info.get("cpu_s")
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    # a non-finite value is recorded as null (strict JSON, tide_ds.trainer.metrics): no point on the curve
    result.train_ce = [(s, float(r["ce"])) for s, r in sorted(train.items()) if r.get("ce") is not None and s <= max_steps]
    result.eval_nll = [(s, float(r["nll"])) for s, r in sorted(evals.items()) if r.get("nll") is not None and s <= max_steps]
    result.step = max([s for s in train if s <= max_steps], default=0)
    if max_steps in evals and evals[max_steps].get("nll") is not None and final_checkpoint_done(run_dir, max_steps):
        result.status = "finished"
        result.final_nll = float(evals[max_steps]["nll"])
    elif result.exit_code not in (None, 0):
        result.status = "failed"
    elif train or evals or run_dir.is_dir() and any(run_dir.iterdir()):
        result.status = "unfinished"
    return result


# ---------------------------------------------------------------------------------------------------------
# Over seeds


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for a single value). Empty input is an error."""
    values = list(values)
    if not values:
        raise ValueError("mean_std of no values: no run of this variant finished")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


@dataclass
class PairedDelta:
    """``variant - reference`` over the seeds both finished: mean, sample std, n, t statistic, resolved
    (|t| above the two-sided 95% critical value)."""

    mean: float
    std: float
    n: int
    t: float
    resolved: bool

    @property
    def ci95(self) -> tuple[float, float]:
        """The two-sided 95% t-interval of the mean paired difference: mean ± t_(n-1) * std / sqrt(n)."""
        half = t_crit_95(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "t": self.t, "resolved": self.resolved,
                "ci95": list(self.ci95)}


def paired_delta(values: dict[int, float], reference: dict[int, float]) -> PairedDelta | None:
    """The paired difference on common seeds; None with fewer than two common seeds."""
    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean, std = mean_std(diffs)
    if std == 0.0:
        t = math.inf if mean != 0 else 0.0
    else:
        t = mean / (std / math.sqrt(len(diffs)))
    return PairedDelta(mean=mean, std=std, n=len(diffs), t=t, resolved=abs(t) > t_crit_95(len(diffs) - 1))


@dataclass
class VariantSummary:
    variant: str
    label: str
    seeds: list[int]
    runs: list[RunResult]
    values: dict[int, float]
    mean: float | None
    std: float | None
    delta: PairedDelta | None = None  # against the pipeline's no-distillation run
    reference: str | None = None

    @property
    def not_finished(self) -> list[RunResult]:
        return [r for r in self.runs if not r.finished]

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "label": self.label, "seeds": self.seeds,
            "finished": len(self.values), "planned": len(self.seeds),
            "nll_by_seed": {str(s): v for s, v in sorted(self.values.items())},
            "mean": self.mean, "std": self.std,
            "not_finished": {str(r.seed): r.describe() for r in self.not_finished},
            "reference": self.reference, "delta_vs_reference": self.delta.to_json() if self.delta else None,
        }


def summarize(runs: list[RunResult], *, labels: dict[str, str], references: dict[str, str]) -> list[VariantSummary]:
    """One summary per variant (in the order of ``labels``), with every planned seed accounted for.

    ``references`` maps a variant to the one its paired delta is taken against (its pipeline's ``none``).
    """
    by_variant: dict[str, list[RunResult]] = {}
    for run in runs:
        if run.variant not in labels:
            raise ValueError(f"run of unknown variant {run.variant!r}; known: {sorted(labels)}")
        by_variant.setdefault(run.variant, []).append(run)
    summaries = []
    values_of: dict[str, dict[int, float]] = {}
    for variant, label in labels.items():
        vruns = sorted(by_variant.get(variant, []), key=lambda r: r.seed)
        values = {r.seed: r.final_nll for r in vruns if r.finished and r.final_nll is not None}
        values_of[variant] = values
        mean, std = mean_std(values.values()) if values else (None, None)
        summaries.append(VariantSummary(variant=variant, label=label, seeds=[r.seed for r in vruns], runs=vruns,
                                        values=values, mean=mean, std=std))
    for summary in summaries:
        ref = references.get(summary.variant)
        if ref is not None and ref != summary.variant:
            if ref not in values_of:
                raise ValueError(f"reference {ref!r} of {summary.variant!r} is not a planned variant")
            summary.reference = ref
            summary.delta = paired_delta(summary.values, values_of[ref])
    return summaries


# ---------------------------------------------------------------------------------------------------------
# Direction of effects


@dataclass(frozen=True)
class Expectation:
    """The paper's direction for ``variant`` against ``reference`` in held-out NLL terms: ``lower`` (better),
    ``higher`` (worse) or ``similar``; ``source`` says where the expectation comes from."""

    variant: str
    reference: str
    expected: str
    source: str


def check_direction(summaries: list[VariantSummary], expectations: list[Expectation]) -> list[dict[str, Any]]:
    """Measured paired delta and a verdict per expectation: ``agrees``, ``opposite``, ``not resolved`` (the
    95% interval of the paired delta contains 0), for an expected ``similar`` ``agrees (no resolved
    difference)`` or ``differs``, or ``not measured`` (fewer than two common finished seeds). Each row is its
    own test at 95%: over many rows some verdicts are expected to be wrong by chance."""
    values = {s.variant: s.values for s in summaries}
    rows = []
    for exp in expectations:
        if exp.expected not in ("lower", "higher", "similar"):
            raise ValueError(f"expected={exp.expected!r} must be lower, higher or similar")
        for name in (exp.variant, exp.reference):
            if name not in values:
                raise ValueError(f"expectation names {name!r}, which is not a planned variant")
        delta = paired_delta(values[exp.variant], values[exp.reference])
        if delta is None:
            verdict = "not measured"
        elif exp.expected == "similar":
            verdict = "differs" if delta.resolved else "agrees (no resolved difference)"
        elif not delta.resolved:
            verdict = "not resolved"
        else:
            verdict = "agrees" if (delta.mean < 0) == (exp.expected == "lower") else "opposite"
        rows.append({"variant": exp.variant, "reference": exp.reference, "expected": exp.expected,
                     "source": exp.source, "delta": delta.to_json() if delta else None, "verdict": verdict})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Markdown


def fmt_mean_std(mean: float | None, std: float | None, n: int, planned: int, digits: int = 4) -> str:
    if mean is None:
        return f"– (0/{planned} finished)"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and not math.isnan(std) else "")
    return text + f" ({n}/{planned})" if n != planned else text


def fmt_delta(delta: PairedDelta | None, digits: int = 4) -> str:
    if delta is None:
        return "–"
    mark = " *" if delta.resolved else ""
    lo, hi = delta.ci95
    return f"{delta.mean:+.{digits}f} ± {delta.std:.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def variant_table(summaries: list[VariantSummary], *, describe: dict[str, str] | None = None) -> str:
    """The markdown table: variant, what it is, held-out NLL mean ± std over seeds, per-seed values, paired
    delta against the reference, and every run that did not finish."""
    describe = describe or {}
    lines = [
        "| variant | objective | held-out NLL (mean ± std) | per seed | Δ vs no distillation (paired, mean ± std "
        "[95% CI]) "
        "| not finished |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        per_seed = ", ".join(f"{seed}: {s.values[seed]:.4f}" if seed in s.values else f"{seed}: –" for seed in s.seeds)
        missing = "; ".join(f"seed {r.seed} {r.describe()}" for r in s.not_finished) or "–"
        lines.append(
            f"| {s.label} | {describe.get(s.variant, '')} | {fmt_mean_std(s.mean, s.std, len(s.values), len(s.seeds))} "
            f"| {per_seed} | {fmt_delta(s.delta) if s.reference else '(reference)'} | {missing} |"
        )
    return "\n".join(lines)


def _signed(x: float) -> str:
    """Four decimals, or two significant digits for values that four decimals would show as zero."""
    return f"{x:+.4f}" if x == 0 or abs(x) >= 5e-5 else f"{x:+.1e}"


def direction_table(rows: list[dict[str, Any]], *, labels: dict[str, str]) -> str:
    lines = [
        "| comparison | paper's direction (NLL terms) | source | measured Δ NLL (paired, mean ± std [95% CI], n) "
        "| verdict |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["delta"]
        ci = d and d.get("ci95")
        measured = "–" if d is None else (f"{_signed(d['mean'])} ± {_signed(d['std'])[1:]}"
                                          + (f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "")
                                          + f" (n={d['n']}, t={d['t']:+.2f})")
        lines.append(f"| {labels[row['variant']]} vs {labels[row['reference']]} | {row['expected']} | {row['source']} "
                     f"| {measured} | {row['verdict']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Plot


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Point-wise mean over the runs that have a value at a step (runs of one plan log the same steps)."""
    acc: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            acc.setdefault(step, []).append(value)
    return [(step, sum(v) / len(v)) for step, v in sorted(acc.items())]


def plot(summaries_by_pipeline: dict[str, list[VariantSummary]], path: str | Path, *, title: str = "") -> Path:
    """Loss curves and final numbers, one row per pipeline: training CE (mean over seeds), held-out NLL over
    steps (mean over seeds), and the final held-out NLL per variant (each seed a dot, mean ± std a bar)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("the evidence plot needs matplotlib: pip install -e '.[evidence]'") from err

    path = Path(path)
    rows = len(summaries_by_pipeline)
    fig, axes = plt.subplots(rows, 3, figsize=(17, 4.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (pipeline, summaries) in enumerate(summaries_by_pipeline.items()):
        ax_ce, ax_nll, ax_final = axes[row]
        for i, s in enumerate(summaries):
            colour = colours[i % len(colours)]
            done = [r for r in s.runs if r.finished]
            ce = mean_curve([r.train_ce for r in done])
            # from the first evaluation after step 0: the random initialisation (~12 nats) would flatten the rest
            nll = [p for p in mean_curve([r.eval_nll for r in done]) if p[0] > 0]
            if ce:
                ax_ce.plot([p[0] for p in ce], [p[1] for p in ce], color=colour, label=f"{s.label} (n={len(done)})")
            if nll:
                ax_nll.plot([p[0] for p in nll], [p[1] for p in nll], color=colour, marker="o", ms=3, label=s.label)
            ys = [s.values[seed] for seed in sorted(s.values)]
            ax_final.scatter([i] * len(ys), ys, color=colour, s=18, zorder=3)
            if s.mean is not None:
                err = s.std if s.std is not None and not math.isnan(s.std) else 0.0
                ax_final.errorbar([i + 0.18], [s.mean], yerr=[err], fmt="s", color=colour, capsize=4, zorder=3)
        ax_ce.set_title(f"pipeline {pipeline}: training CE (mean over seeds)"
                        + ("\ndistillation runs mask whole chunks, 'none' single tokens" if pipeline == "A" else ""),
                        fontsize=10)
        ax_ce.set_xlabel("step")
        ax_ce.set_ylabel("masked-diffusion CE")
        ax_ce.legend(fontsize=7)
        ax_nll.set_title(f"pipeline {pipeline}: held-out NLL after step 0\n(mean over seeds)", fontsize=10)
        ax_nll.set_xlabel("step")
        ax_nll.set_ylabel("NLL per maskable token")
        ax_final.set_title(f"pipeline {pipeline}: final held-out NLL\n(dots: seeds; squares: mean ± std)", fontsize=10)
        ax_final.set_xticks(range(len(summaries)))
        ax_final.set_xticklabels([s.label for s in summaries], rotation=25, ha="right", fontsize=8)
        ax_final.set_ylabel("NLL per maskable token")
        ax_final.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
