"""The paper's comparison on the demo worlds, rerunnable on a CPU machine:

    python -m tide_ds.experiments.evidence --out evidence/

1. Ensures both demo worlds (the trainer's own ``prepare_demo_run`` on the recipes ``demo.yaml`` and
   ``demo_b.yaml``: corpus, datasets and a pretrained teacher per pipeline; built once, cached).
2. Trains students with the same data, steps and seeds under ``none``, ``calm``, ``tide_cross`` (pipeline A)
   and ``none``, ``kl``, ``tide_shared`` (pipeline B), plus ablations of ``tide_shared`` that switch off
   TIDAL's timestep axis (``distill.tidal_axis=training_only``) and CompDemo (``distill.comp_demo=false``),
   on both pipelines, and a pipeline-A control with CALM's chunk-widened masking but no distillation gradient
   (``calm_weight=0``): 12 variants; every run is ``launch/run.py`` in its own process.
3. Writes ``results.json``, ``results.md`` (held-out NLL mean ± std over seeds per variant, paired deltas
   against no distillation, the paper's direction of effects) and ``evidence.png`` (loss curves, final numbers).

Resumable: a run whose final evaluation and checkpoint exist is reused; any other run is started again with
``--train.resume=auto`` (from its last checkpoint, written every ``--save-every`` steps). A run directory that
holds a run of another plan (other steps, seeds' data, worlds) is an error, never mixed into. Runs are ordered
seed by seed, so an interrupted experiment has every variant at its first seeds.

Budget (the defaults): 40 steps of 16 samples per run, one rank per run, two runs at a time, held-out
evaluation of all 127 held-out samples at steps 0, 20 and 40. Measured CPU time per run (one thread, on the
2-core development machine while other work shared it, load average 4-12; seconds): no distillation 97-101,
pipeline-A distillation 119-131, pipeline B KL 262, TIDE-Shared without CompDemo 280, TIDE-Shared 343-355
(the teacher's LM head over the 151,646-token shared vocabulary dominates pipeline B). The 36 runs of the
default plan thus take about 6,500 CPU-seconds: about 55 minutes on 2 idle cores, plus the demo worlds'
one-time build. Two ranks per run cost about 24 CPU-seconds more per run than one (a second process's
start-up, the launcher, the gradient all-reduce) for the same samples (measured on 10-step runs: 65 vs 42
CPU-seconds without a teacher, 71 vs 48 with one), so one rank per run, two runs at a time, is the cheaper
way to keep both cores busy.

The runs pin the world (``--data.dataset`` and ``--teacher.path``, built at ``world.seed``) and vary only
the student's seed: initial weights, data order and noise. Seeds thus measure the variance of the student's
training, not of the teacher's.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tide_ds.experiments import report
from tide_ds.utils.files import atomic_write_text

logger = logging.getLogger("tide_ds.experiments.evidence")  # not __name__: under `python -m` that is __main__

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"A": "launch/recipes/demo.yaml", "B": "launch/recipes/demo_b.yaml"}
SPEC_FILE = "evidence_run.json"
RUN_LOG = "train.log"


@dataclass(frozen=True)
class Variant:
    pipeline: str
    name: str
    preset: str
    label: str
    objective: str
    extra: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.pipeline}/{self.name}"


#: Every variant the experiment knows; DEFAULT_VARIANTS is the plan of the issue.
VARIANTS = {v.key: v for v in [
    Variant("A", "none", "none", "A: no distillation", "CE only (BD3LM baseline)"),
    Variant("A", "calm", "calm", "A: CALM", "CE + forward CALM (`alm`)"),
    Variant("A", "tide_cross", "tide_cross", "A: TIDE-Cross", "CE + Reverse CALM (`reverse_alm`)"),
    Variant("A", "tide_shared", "tide_shared", "A: TIDE-Shared", "CE + chunk TIDAL (`alm_taid`) + CompDemo"),
    Variant("A", "tide_shared-no_timestep_axis", "tide_shared", "A: TIDE-Shared, no timestep axis",
            "as TIDE-Shared, `tidal_axis=training_only`", ("--distill.tidal_axis=training_only",)),
    Variant("A", "tide_shared-no_compdemo", "tide_shared", "A: TIDE-Shared, no CompDemo",
            "as TIDE-Shared, `comp_demo=false`", ("--distill.comp_demo=false",)),
    # Every pipeline-A distillation step widens the student's mask to whole chunks (docs/method.md §4.4), so its CE
    # differs from `none`'s; this control has that masking and no distillation gradient.
    Variant("A", "chunk_masking_only", "calm", "A: chunk masking only (control)",
            "CE under CALM's chunk-widened masks, `calm_weight=0` (no gradient from the teacher)",
            ("--distill.calm_weight=0",)),
    Variant("B", "none", "none", "B: no distillation", "CE only (BD3LM baseline)"),
    Variant("B", "kl", "kl", "B: KL", "CE + forward KL on aligned rows (`kl_aligned`)"),
    Variant("B", "tide_cross", "tide_cross", "B: TIDE-Cross", "CE + reverse KL on aligned rows (`reverse_kl_aligned`)"),
    Variant("B", "tide_shared", "tide_shared", "B: TIDE-Shared", "CE + token TIDAL (`taid_aligned`) + CompDemo"),
    Variant("B", "tide_shared-no_timestep_axis", "tide_shared", "B: TIDE-Shared, no timestep axis",
            "as TIDE-Shared, `tidal_axis=training_only`", ("--distill.tidal_axis=training_only",)),
    Variant("B", "tide_shared-no_compdemo", "tide_shared", "B: TIDE-Shared, no CompDemo",
            "as TIDE-Shared, `comp_demo=false`", ("--distill.comp_demo=false",)),
]}
DEFAULT_VARIANTS = [k for k in VARIANTS if k != "B/tide_cross"]

#: The paper's direction of effects (docs/method.md §9.3, averages over 8 benchmarks; higher accuracy = lower NLL
#: expected) and the method's claims for the ablations (docs/method.md §7.2, §8; no number in docs/method.md §9.3).
EXPECTATIONS = [
    report.Expectation("A/tide_cross", "A/none", "lower", "docs/method.md §9.3: 34.20 vs 32.67"),
    report.Expectation("A/calm", "A/none", "similar", "docs/method.md §9.3: 32.25 vs 32.67"),
    report.Expectation("A/tide_cross", "A/calm", "lower", "docs/method.md §9.3: 34.20 vs 32.25"),
    report.Expectation("A/tide_shared", "A/none", "lower", "docs/method.md §9.3: 33.83 vs 32.67"),
    report.Expectation("A/tide_cross", "A/tide_shared", "lower", "docs/method.md §9.3: 34.20 vs 33.83 (TIDE-Cross best on A)"),
    report.Expectation("B/tide_shared", "B/none", "lower", "docs/method.md §9.3: 33.55 vs 32.67"),
    report.Expectation("B/kl", "B/none", "higher", "docs/method.md §9.3: 30.55 vs 32.67 (KL below no distillation)"),
    report.Expectation("B/tide_shared", "B/kl", "lower", "docs/method.md §9.3: 33.55 vs 30.55"),
    report.Expectation("B/tide_cross", "B/none", "higher", "docs/method.md §9.3: 30.79 vs 32.67"),
    report.Expectation("B/tide_shared", "B/tide_cross", "lower", "docs/method.md §9.3: 33.55 vs 30.79 (TIDE-Shared best on B)"),
    report.Expectation("A/calm", "A/chunk_masking_only", "lower", "control: the teacher's part (not in the paper)"),
    report.Expectation("A/tide_cross", "A/chunk_masking_only", "lower", "control: the teacher's part (not in the paper)"),
    report.Expectation("A/tide_shared", "A/chunk_masking_only", "lower", "control: the teacher's part (not in the paper)"),
    report.Expectation("A/tide_shared", "A/tide_shared-no_timestep_axis", "lower", "method claim (docs/method.md §7.2)"),
    report.Expectation("A/tide_shared", "A/tide_shared-no_compdemo", "lower", "method claim (docs/method.md §8)"),
    report.Expectation("B/tide_shared", "B/tide_shared-no_timestep_axis", "lower", "method claim (docs/method.md §7.2)"),
    report.Expectation("B/tide_shared", "B/tide_shared-no_compdemo", "lower", "method claim (docs/method.md §8)"),
]


@dataclass(frozen=True)
class Plan:
    """Everything that makes runs comparable; a run directory records the arguments it was started with."""

    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    micro_batch_size: int
    ranks_per_run: int
    eval_samples: int
    eval_every: int
    log_every: int
    save_every: int

    def __post_init__(self) -> None:
        for key in self.variants:
            if key not in VARIANTS:
                raise ValueError(f"unknown variant {key!r}; choose from {sorted(VARIANTS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds={list(self.seeds)} must name one or more distinct seeds")
        for name in ("steps", "micro_batch_size", "ranks_per_run", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        for name in ("eval_samples", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")

    @property
    def pipelines(self) -> list[str]:
        return sorted({VARIANTS[k].pipeline for k in self.variants})


@dataclass(frozen=True)
class World:
    pipeline: str
    dataset: str
    teacher: str
    teacher_nll: float
    student_vocab: int = 0  # entries of the student's tokenizer


@dataclass
class RunJob:
    variant: Variant
    seed: int
    run_dir: Path
    args: list[str]
    status: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Worlds and runs


def ensure_worlds(pipelines: list[str]) -> dict[str, World]:
    """Build (or reuse) each pipeline's demo world exactly as the trainer would for its recipe."""
    from tide_ds.builders import build_tokenizer
    from tide_ds.config import build_config
    from tide_ds.worlds import prepare_world

    worlds = {}
    for pipeline in pipelines:
        cfg = build_config(recipe=ROOT / RECIPES[pipeline], overrides=[f"--distill.pipeline={pipeline}"])
        _, special = build_tokenizer(cfg)
        logger.info("pipeline %s: ensuring the demo world (built once; the pipeline-B teacher takes minutes)", pipeline)
        resolved, world = prepare_world(cfg)
        assert world is not None, f"{RECIPES[pipeline]} names no world"
        worlds[pipeline] = World(pipeline=pipeline, dataset=resolved.data.dataset, teacher=resolved.teacher.path,
                                 teacher_nll=float(world.teacher_heldout_nll), student_vocab=special.vocab_size)
    return worlds


def context_free_references(dataset_dir: str | Path, *, vocab_size: int, smoothing: float = 0.1) -> dict:
    """Held-out NLL of two context-free predictors on the student's maskable (response) tokens, in the same
    units as the students': the uniform distribution over the tokenizer (ln V) and the unigram distribution
    of the training responses (add-``smoothing`` counts). A context-free predictor's masked-diffusion ELBO
    equals its cross-entropy (the linear schedule's weight 1/t cancels the masked fraction t), so these are
    exact reference points for the students' numbers."""
    import datasets
    import numpy as np

    splits = datasets.load_from_disk(str(dataset_dir))
    counts = np.zeros(vocab_size, dtype=np.float64)
    for labels in splits["train"]["labels"]:
        ids = np.asarray(labels)
        counts += np.bincount(ids[ids >= 0], minlength=vocab_size)[:vocab_size]
    logp = np.log((counts + smoothing) / (counts.sum() + smoothing * vocab_size))
    total, n = 0.0, 0
    for labels in splits["heldout"]["labels"]:
        ids = np.asarray(labels)
        ids = ids[ids >= 0]
        total -= float(logp[ids].sum())
        n += int(ids.size)
    return {"uniform_nll": float(np.log(vocab_size)), "unigram_nll": total / max(n, 1), "unigram_smoothing": smoothing,
            "heldout_maskable_tokens": n, "heldout_samples": len(splits["heldout"])}


def run_args(variant: Variant, seed: int, plan: Plan, world: World) -> list[str]:
    """The ``launch/run.py`` arguments of one run, without its output directory and resume flag."""
    args = [
        f"--recipe={RECIPES[variant.pipeline]}",  # relative: runs start in ROOT, and a runs dir moves between checkouts
        f"--data.dataset={world.dataset}",
        f"--distill.pipeline={variant.pipeline}",
        f"--distill.preset={variant.preset}",
        *variant.extra,
        f"--train.seed={seed}",
        f"--train.max_steps={plan.steps}",
        f"--train.micro_batch_size={plan.micro_batch_size}",
        f"--data.eval_samples={plan.eval_samples}",
        f"--train.eval_every={plan.eval_every}",
        f"--train.log_every={plan.log_every}",
        f"--train.save_every={plan.save_every}",
        "--train.keep_last=1",
        "--train.progress_bar=false",
        "--train.tensorboard=false",
    ]
    if variant.preset != "none":
        args.insert(2, f"--teacher.path={world.teacher}")
    return args


def plan_jobs(plan: Plan, worlds: dict[str, World], runs_dir: Path) -> list[RunJob]:
    """The runs, seed by seed, then variant by variant."""
    jobs = []
    for seed in plan.seeds:
        for key in plan.variants:
            variant = VARIANTS[key]
            run_dir = runs_dir / variant.pipeline / variant.name / f"seed{seed}"
            jobs.append(RunJob(variant, seed, run_dir, run_args(variant, seed, plan, worlds[variant.pipeline])))
    return jobs


def _spec(job: RunJob, plan: Plan) -> dict:
    return {"variant": job.variant.key, "seed": job.seed, "ranks": plan.ranks_per_run, "args": job.args}


def _normalise_spec(spec: dict) -> dict:
    """A recipe named by its absolute path in another checkout (``.../launch/recipes/demo.yaml``) is the same
    recipe as ``launch/recipes/demo.yaml`` here."""
    args = []
    for arg in spec.get("args", []):
        if isinstance(arg, str) and arg.startswith("--recipe=/") and "/launch/recipes/" in arg:
            arg = "--recipe=launch/recipes/" + arg.rsplit("/launch/recipes/", 1)[1]
        args.append(arg)
    return {**spec, "args": args}


def check_reusable(job: RunJob, plan: Plan) -> None:
    """A run directory must hold nothing or a run of this plan (same arguments); anything else is an error."""
    spec_path = job.run_dir / SPEC_FILE
    if spec_path.is_file():
        saved = _normalise_spec(json.loads(spec_path.read_text()))
        if saved != _spec(job, plan):
            changed = sorted(set(map(str, saved.get("args", []))) ^ set(job.args)) or ["ranks per run"]
            raise ValueError(
                f"{job.run_dir} holds a run of another plan (differing: {changed}); tide-ds never mixes runs. "
                "Use another --runs-dir for the new plan, or move this one away"
            )
    elif job.run_dir.is_dir() and any(job.run_dir.iterdir()):
        raise ValueError(f"{job.run_dir} holds files but no {SPEC_FILE}: not a run of this experiment; "
                         "use another --runs-dir or move it away")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(job: RunJob, plan: Plan) -> tuple[list[str], dict[str, str]]:
    """One rank: ``python launch/run.py`` with the rendezvous variables set (no launcher processes); more
    ranks: ``deepspeed --num_gpus N``. Each rank gets an equal share of the cores."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = f"{ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    args = [*job.args, f"--train.output_dir={job.run_dir}", "--train.resume=auto"]
    script = str(ROOT / "launch" / "run.py")
    if plan.ranks_per_run == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        return [sys.executable, script, *args], env
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(plan.ranks_per_run), "--master_port", str(_free_port()), script, *args], env


class Runner:
    """Runs jobs ``parallel`` at a time; each run's output goes to ``<run_dir>/train.log``."""

    def __init__(self, plan: Plan, parallel: int, threads_per_rank: int) -> None:
        self.plan, self.parallel, self.threads = plan, parallel, threads_per_rank
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.stopping = False

    def run(self, job: RunJob) -> report.RunResult:
        """Run ``job`` unless it finished meanwhile or another invocation is running it (a lock per run under
        ``<runs-dir>/.locks``), so several invocations of one plan share the work without ever running one
        run twice at a time."""
        if self.stopping:
            return self.collect(job)
        locks = job.run_dir.parents[2] / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{job.variant.pipeline}-{job.variant.name}-seed{job.seed}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("%s seed %d: running in another invocation; skipped here", job.variant.key, job.seed)
                return self.collect(job)
            result = self.collect(job)
            if result.finished:  # by another invocation since this one started
                return result
            return self._launch(job)

    def _launch(self, job: RunJob) -> report.RunResult:
        cmd, env = command(job, self.plan)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = job.run_dir / SPEC_FILE
        atomic_write_text(spec_path, json.dumps(_spec(job, self.plan), indent=1))
        (job.run_dir / report.EXIT_FILE).unlink(missing_ok=True)
        load_start = os.getloadavg()
        start = time.monotonic()
        with open(job.run_dir / RUN_LOG, "a") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            with self._lock:
                self._procs[proc.pid] = proc
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            with self._lock:
                self._procs.pop(proc.pid, None)
        info = {"exit_code": proc.returncode, "wall_s": round(time.monotonic() - start, 2),
                "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "loadavg_start": load_start,
                "loadavg_end": os.getloadavg(), "command": shlex.join(cmd)}
        atomic_write_text(job.run_dir / report.EXIT_FILE, json.dumps(info, indent=1))
        result = self.collect(job)
        logger.info("%s seed %d: %s (%.0f s wall, %.0f s CPU)%s", job.variant.key, job.seed, result.describe(),
                    info["wall_s"], info["cpu_s"],
                    f", held-out NLL {result.final_nll:.4f}" if result.final_nll is not None else
                    f"; see {job.run_dir / RUN_LOG}")
        return result

    def collect(self, job: RunJob) -> report.RunResult:
        return report.collect_run(job.run_dir, variant=job.variant.key, seed=job.seed, max_steps=self.plan.steps)

    def stop(self) -> None:
        """Ask every running trainer to stop (SIGTERM: the trainer checkpoints and exits, resumable)."""
        self.stopping = True
        with self._lock:
            for proc in self._procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------------------------------------
# Report


def git_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "tide_ds", "kernels", "launch", "ds_configs")
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "uncommitted_code_changes": [line[3:] for line in dirty.splitlines()]}


def machine_state() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_now": [round(x, 2) for x in os.getloadavg()]}


def write_report(out: Path, *, plan: Plan, jobs: list[RunJob], results: list[report.RunResult],
                 worlds: dict[str, World], meta: dict, with_plot: bool = True, references: dict | None = None) -> dict:
    """Write results.json, results.md and (with matplotlib) evidence.png into ``out``; return the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {k: VARIANTS[k].label for k in plan.variants}
    baselines = {k: f"{VARIANTS[k].pipeline}/none" for k in plan.variants if f"{VARIANTS[k].pipeline}/none" in labels}
    summaries = report.summarize(results, labels=labels, references=baselines)
    expectations = [e for e in EXPECTATIONS if e.variant in labels and e.reference in labels]
    directions = report.check_direction(summaries, expectations)
    finished = [r for r in results if r.finished]
    data = {
        **meta,
        "plan": {**plan.__dict__, "variants": list(plan.variants), "seeds": list(plan.seeds)},
        "worlds": {p: w.__dict__ for p, w in worlds.items()},
        "references": references or {},
        "runs_finished": len(finished), "runs_planned": len(results),
        "total_wall_s_of_runs": round(sum(r.wall_s or 0 for r in results), 1),
        "total_cpu_s_of_runs": round(sum(r.cpu_s or 0 for r in results), 1),
        "summary": [s.to_json() for s in summaries],
        "directions": directions,
        "runs": [r.to_json() for r in results],
    }
    atomic_write_text(out / "results.json", json.dumps(data, indent=1))
    atomic_write_text(out / "results.md", markdown(data, summaries, directions, labels))
    if with_plot:
        by_pipeline = {p: [s for s in summaries if VARIANTS[s.variant].pipeline == p] for p in plan.pipelines}
        report.plot(by_pipeline, out / "evidence.png",
                    title=f"tide-ds evidence: {plan.steps} steps, seeds {list(plan.seeds)}, commit {meta['git']['commit'][:10]}")
    return data


def markdown(data: dict, summaries: list[report.VariantSummary], directions: list[dict], labels: dict[str, str]) -> str:
    plan, git, machine = data["plan"], data["git"], data["machine"]
    dirty = git["uncommitted_code_changes"]
    lines = [
        "# Evidence: results (generated)",
        "",
        f"Generated by `{data['command']}` on {data['date']}, at commit `{git['commit']}`"
        + (f" with uncommitted changes in {', '.join(f'`{d}`' for d in dirty)}." if dirty else "."),
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model'] or 'unknown model'}), {machine['platform']}; "
        f"load average at the start {data['loadavg_start']}, at the end {data['loadavg_end']}.",
        f"Runs: {data['runs_finished']}/{data['runs_planned']} finished; their last starts took "
        f"{data['total_wall_s_of_runs']:.0f} s of wall time (summed over runs, which ran side by side) and "
        f"{data['total_cpu_s_of_runs']:.0f} s of CPU time (as recorded in each run directory).",
        f"Plan: {plan['steps']} steps, micro-batch {plan['micro_batch_size']} x {plan['ranks_per_run']} rank(s) per run, "
        f"seeds {plan['seeds']}, held-out evaluation on {plan['eval_samples'] or 'all'} samples every "
        f"{plan['eval_every'] or plan['steps']} steps (fixed noise seed).",
        "",
        "Held-out NLL: the masked-diffusion ELBO per maskable (response) token of the held-out files, in nats; "
        "lower is better. Δ: the paired difference against the pipeline's no-distillation run with the same seed "
        "(same initial weights, data order and noise), mean ± std over seeds; `*` marks |t| above the two-sided "
        "95% critical value.",
        "",
    ]
    for pipeline in sorted({s.variant.split("/")[0] for s in summaries}):
        w = data["worlds"].get(pipeline)
        sub = [s for s in summaries if s.variant.startswith(pipeline + "/")]
        lines += [f"## Pipeline {pipeline}", ""]
        lines.append(report.variant_table(sub, describe={k: VARIANTS[k].objective for k in labels}))
        ref = data["references"].get(pipeline)
        if ref:
            lines += ["", f"Context-free reference points on the same {ref['heldout_maskable_tokens']} held-out response "
                      f"tokens ({ref['heldout_samples']} samples): uniform over the tokenizer {ref['uniform_nll']:.4f}, "
                      f"unigram of the training responses {ref['unigram_nll']:.4f} (a context-free predictor's ELBO "
                      "equals its cross-entropy)."]
        if w:
            unit = ("per token of the teacher's own SentencePiece tokenizer, over every non-pad token, prompt and "
                    "response: not comparable with the student's numbers" if pipeline == "A" else
                    "per token of the shared Qwen3 tokenizer, but over every non-pad token of the WeDLM chat format, "
                    "prompt and response, not only the response: not directly comparable")
            lines += ["", f"Teacher (`{Path(w['teacher']).name}`): held-out NLL {w['teacher_nll']:.4f} ({unit})."]
        lines.append("")
    lines += ["## Direction of effects against the paper", "", report.direction_table(directions, labels=labels), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tide_ds.experiments.evidence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="evidence", help="where results.json, results.md and evidence.png go")
    p.add_argument("--runs-dir", default="runs/evidence", help="run directories (metrics, logs, checkpoints)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="P/NAME",
                   help=f"variants to run (default: all but B/tide_cross); known: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--micro-batch-size", type=int, default=16, help="samples per rank per step")
    p.add_argument("--ranks-per-run", type=int, default=1, help="DeepSpeed ranks per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads-per-rank", type=int, default=0,
                   help="OMP threads of each rank (0: the CPUs divided by parallel x ranks per run)")
    p.add_argument("--eval-samples", type=int, default=0, help="held-out samples per evaluation (0 = all)")
    p.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    p.add_argument("--log-every", type=int, default=5, help="steps between training records")
    p.add_argument("--save-every", type=int, default=20, help="steps between checkpoints (resume points)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and each run's state; run nothing")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs there are; run nothing")
    p.add_argument("--no-plot", action="store_true", help="skip evidence.png (no matplotlib needed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tide_ds.log import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    setup_logging()
    try:
        plan = Plan(variants=tuple(args.variants), seeds=tuple(args.seeds), steps=args.steps,
                    micro_batch_size=args.micro_batch_size, ranks_per_run=args.ranks_per_run,
                    eval_samples=args.eval_samples, eval_every=args.eval_every, log_every=args.log_every,
                    save_every=args.save_every)
        if args.parallel < 1:
            raise ValueError(f"--parallel={args.parallel} must be >= 1")
        if args.threads_per_rank < 0:
            raise ValueError(f"--threads-per-rank={args.threads_per_rank} must be >= 0 (0 = automatic)")
        if not args.no_plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ValueError("the plot needs matplotlib: pip install -e '.[evidence]' (or pass --no-plot)") from err
    except ValueError as err:
        print(f"evidence: error: {err}", file=sys.stderr)
        return 2
    out, runs_dir = Path(args.out).absolute(), Path(args.runs_dir).absolute()
    meta = {"command": shlex.join(["python", "-m", "tide_ds.experiments.evidence", *argv]), "parallel": args.parallel,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git": git_state(), "machine": machine_state(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    worlds = ensure_worlds(plan.pipelines)
    references = {p: context_free_references(w.dataset, vocab_size=w.student_vocab) for p, w in worlds.items()}
    jobs = plan_jobs(plan, worlds, runs_dir)
    try:
        for job in jobs:
            check_reusable(job, plan)
    except ValueError as err:
        print(f"evidence: error: {err}", file=sys.stderr)
        return 2
    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // (args.parallel * plan.ranks_per_run))
    runner = Runner(plan, args.parallel, threads)
    results = {id(j): runner.collect(j) for j in jobs}
    todo = [j for j in jobs if not results[id(j)].finished]
    for job in jobs:
        r = results[id(job)]
        logger.info("%-40s seed %d: %s%s", job.variant.key, job.seed, r.describe(),
                    "" if r.finished else " -> to run")
    if args.dry_run:
        for job in todo:
            print(shlex.join(command(job, plan)[0]))
        return 0
    if not args.report_only and todo:
        logger.info("%d of %d runs to do, %d at a time, %d rank(s) each, %d thread(s) per rank",
                    len(todo), len(jobs), args.parallel, plan.ranks_per_run, threads)
        lock = threading.Lock()

        def one(job: RunJob) -> None:
            result = runner.run(job)
            with lock:
                results[id(job)] = result
                meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
                write_report(out, plan=plan, jobs=jobs, results=[results[id(j)] for j in jobs], worlds=worlds,
                             meta=meta, with_plot=False, references=references)

        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = [pool.submit(one, j) for j in todo]
            try:
                for f in futures:
                    f.result()
            except KeyboardInterrupt:
                logger.warning("interrupted: stopping the running trainers (they checkpoint and exit); "
                               "rerun the same command to continue")
                runner.stop()
                raise
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    data = write_report(out, plan=plan, jobs=jobs, results=[results[id(j)] for j in jobs], worlds=worlds, meta=meta,
                        with_plot=not args.no_plot, references=references)
    logger.info("%d/%d runs finished; report in %s", data["runs_finished"], data["runs_planned"], out)
    return 0 if data["runs_finished"] == data["runs_planned"] else 1


if __name__ == "__main__":
    sys.exit(main())
