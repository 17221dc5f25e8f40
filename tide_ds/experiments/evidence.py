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

``--world=evidence`` (issue 18) runs the same comparison in the evidence world of :mod:`tide_ds.worlds.evidence`
(built once under ``--world-root``): a student with a small SentencePiece tokenizer (``launch/recipes/evidence.yaml``)
trained on a limited fraction of the training samples, teachers that are larger and pretrained on every training
sample plus the training files' source (pipeline A with a tokenizer of its own), seeds 1-5 and, by default, 160 steps
of 16 samples at a peak learning rate of 1e-3 that continue the world's student (1,000 CE steps of 32 on the limited
samples, built with the world: every run and seed starts from it, as the paper's students start from one pretrained
checkpoint; the seeds vary the data order and the noise), plus a second data setting with every training sample
(``@full`` variants: no distillation and each pipeline's native preset). ``B/none`` is not run there: both pipelines' student data are identical (checked), so
pipeline B is compared with ``A/none``. The report adds bits per byte (teacher and students, on the held-out
responses), the world's conditions (the no-distillation student >= 1 nat below the unigram reference, the teacher
>= 25% fewer bits per byte than that student), 95% t-intervals of the paired deltas and a task measure
(:mod:`tide_ds.experiments.task`: the students write the bodies of held-out functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import math
import os
import platform
import shlex
import signal
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
#: The evidence world's student (both pipelines; the world, tokenizer and teacher come as options).
EVIDENCE_RECIPE = "launch/recipes/evidence.yaml"
WORLDS = ("demo", "evidence")
#: Steps, samples per step and peak learning rate of an evidence-world run (the defaults with --world=evidence).
#: Every run continues the world's student (:mod:`tide_ds.worlds.evidence`: 1,000 CE steps of 32 on the limited
#: samples), which has left the plateau a fresh student sits on for its first 12,000-25,000 samples; the runs spend
#: their 2,560 samples on what the teacher adds, at a third of the starting point's learning rate.
EVIDENCE_STEPS = 160
EVIDENCE_MICRO_BATCH = 16
EVIDENCE_LR = 1e-3
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
    setting: str = "limited"  # the evidence world's student data: "limited" (a fraction) or "full"

    @property
    def key(self) -> str:
        return f"{self.pipeline}/{self.name}" + ("@full" if self.setting == "full" else "")

    @property
    def world_key(self) -> str:
        """The world (dataset, teacher) this variant trains in: the pipeline, and the data setting."""
        return self.pipeline + ("@full" if self.setting == "full" else "")

    @property
    def baseline(self) -> str:
        return f"{self.pipeline}/none" + ("@full" if self.setting == "full" else "")


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
#: The evidence world's second setting: the student sees all training samples (no distillation and each
#: pipeline's native preset), so the table shows whether distillation's effect shrinks with more data.
for _v in [
    Variant("A", "none", "none", "A: no distillation, all data", "CE only, every training sample", setting="full"),
    Variant("A", "tide_cross", "tide_cross", "A: TIDE-Cross, all data", "CE + Reverse CALM, every training sample",
            setting="full"),
    Variant("B", "none", "none", "B: no distillation, all data", "CE only, every training sample", setting="full"),
    Variant("B", "tide_shared", "tide_shared", "B: TIDE-Shared, all data",
            "CE + token TIDAL + CompDemo, every training sample", setting="full"),
]:
    VARIANTS[_v.key] = _v
#: B/none is left out: in the evidence world the student side of both pipelines' datasets is the same (checked
#: when the world is loaded, :func:`ensure_evidence_worlds`), so it would repeat A/none to the last digit; pipeline
#: B's variants are compared with A/none instead (:func:`baseline_of`).
EVIDENCE_VARIANTS = [k for k in DEFAULT_VARIANTS if k != "B/none"] + ["A/none@full", "A/tide_cross@full",
                                                                      "B/tide_shared@full"]


def baseline_of(key: str, planned: set[str], worlds: dict[str, World]) -> str | None:
    """The no-distillation run ``key`` is compared with: its pipeline's, else (pipeline B, when both pipelines'
    student data are identical) pipeline A's of the same data setting; None when neither is planned."""
    variant = VARIANTS[key]
    if variant.baseline in planned:
        return variant.baseline
    other = variant.baseline.replace("B/", "A/", 1)
    world = worlds.get(variant.world_key)
    if variant.pipeline == "B" and other in planned and world is not None and world.same_student_data_as_a:
        return other
    return None

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
    report.Expectation("A/tide_cross@full", "A/none@full", "lower", "docs/method.md §9.3 (all student data)"),
    report.Expectation("B/tide_shared@full", "B/none@full", "lower", "docs/method.md §9.3 (all student data)"),
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
    world: str = "demo"
    lr: float = 0.0  # the peak learning rate of every run (0: the recipe's)

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise ValueError(f"--world={self.world!r} must be one of {list(WORLDS)}")
        for key in self.variants:
            if key not in VARIANTS:
                raise ValueError(f"unknown variant {key!r}; choose from {sorted(VARIANTS)}")
            if VARIANTS[key].setting == "full" and self.world != "evidence":
                raise ValueError(f"variant {key!r} (all student data) exists only in --world=evidence")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds={list(self.seeds)} must name one or more distinct seeds")
        for name in ("steps", "micro_batch_size", "ranks_per_run", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.lr < 0:
            raise ValueError(f"--lr={self.lr} must be > 0 (or 0 for the recipe's)")
        for name in ("eval_samples", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")

    @property
    def pipelines(self) -> list[str]:
        return sorted({VARIANTS[k].pipeline for k in self.variants})

    @property
    def world_keys(self) -> list[str]:
        return sorted({VARIANTS[k].world_key for k in self.variants})


@dataclass(frozen=True)
class World:
    pipeline: str
    dataset: str
    teacher: str
    teacher_nll: float
    student_vocab: int = 0  # entries of the student's tokenizer
    student_tokenizer: str = ""  # the evidence world's (empty: the recipe's Qwen3 tokenizer)
    teacher_bits_per_byte: float | None = None  # on the held-out responses (the evidence world)
    heldout_tokens: int = 0  # the students' held-out response tokens and their UTF-8 bytes (evidence world)
    heldout_bytes: int = 0
    train_samples: int = 0
    same_student_data_as_a: bool = False  # pipeline B only: its student columns equal pipeline A's
    shared_vocab_size: int = 0  # pipeline B of the evidence world: the ids before the mask token (same meaning)
    full_dataset: str = ""  # the evidence world: the pipeline's dataset with every training sample
    student_init: str = ""  # the evidence world: the students' starting point (empty: random weights)
    student_init_steps: int = 0  # the CE steps that made it, on the limited student data
    student_init_nll: float | None = None  # its held-out NLL (where every run starts)


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


def ensure_evidence_worlds(world_keys: list[str], root: str | Path) -> dict[str, World]:
    """Build (or reuse) the evidence world (:mod:`tide_ds.worlds.evidence`) and describe it per pipeline and
    data setting (``A``, ``B``: the limited student data; ``A@full``, ``B@full``: all of it)."""
    import datasets

    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.worlds.evidence import build_evidence_world

    logger.info("ensuring the evidence world under %s (built once: tokenizers, datasets, two teachers)", root)
    ew = build_evidence_world(root)
    # pipeline B shares every student id but the mask token (the last special): the shared prefix ends before it
    mask_id = resolve_special_ids(load_tokenizer(ew.student_tokenizer)).mask_id
    if mask_id != ew.student_vocab_size - 1:
        raise ValueError(f"the evidence world's student mask token has id {mask_id}, not the last "
                         f"({ew.student_vocab_size - 1}): the shared prefix of pipeline B cannot exclude it")
    worlds = {}
    student_cols = ["input_ids", "labels"]
    for key in world_keys:
        pipeline, _, setting = key.partition("@")
        dataset = ew.dataset(pipeline, setting or "limited")
        teacher = ew.teacher[pipeline]
        worlds[key] = World(
            pipeline=pipeline, dataset=str(dataset), teacher=str(ew.teacher_a if pipeline == "A" else ew.teacher_b),
            teacher_nll=float(teacher["nll_per_token"]), student_vocab=ew.student_vocab_size,
            student_tokenizer=str(ew.student_tokenizer), teacher_bits_per_byte=float(teacher["bits_per_byte"]),
            heldout_tokens=int(ew.heldout["tokens"]), heldout_bytes=int(ew.heldout["bytes"]),
            train_samples=len(datasets.load_from_disk(str(dataset))["train"]), shared_vocab_size=mask_id,
            full_dataset=str(ew.dataset(pipeline, "full")),
            student_init=str(ew.student_init_path or ""),
            student_init_steps=int(ew.student_init.get("steps", 0)),
            student_init_nll=ew.student_init.get("heldout_nll"),
            same_student_data_as_a=pipeline == "B" and all(
                datasets.load_from_disk(str(dataset))[split].select_columns(student_cols)[:]
                == datasets.load_from_disk(str(ew.dataset("A", setting or "limited")))[split].select_columns(
                    student_cols)[:] for split in ("train", "heldout")))
    return worlds


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
    recipe = EVIDENCE_RECIPE if plan.world == "evidence" else RECIPES[variant.pipeline]
    args = [
        f"--recipe={recipe}",  # relative: runs start in ROOT, and a runs dir moves between checkouts
        f"--data.dataset={world.dataset}",
        f"--distill.pipeline={variant.pipeline}",
        f"--distill.preset={variant.preset}",
        *variant.extra,
        f"--train.seed={seed}",
        f"--train.max_steps={plan.steps}",
        f"--train.micro_batch_size={plan.micro_batch_size}",
        *([f"--train.lr={plan.lr:g}"] if plan.lr else []),
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
    if world.student_init:
        args.insert(2, f"--model.path={world.student_init}")
    if world.student_tokenizer:
        args.insert(2, f"--model.tokenizer={world.student_tokenizer}")
        if variant.pipeline == "B":
            args.append(f"--distill.shared_vocab_size={world.shared_vocab_size or world.student_vocab}")
    return args


def plan_jobs(plan: Plan, worlds: dict[str, World], runs_dir: Path) -> list[RunJob]:
    """The runs, seed by seed, then variant by variant."""
    jobs = []
    for seed in plan.seeds:
        for key in plan.variants:
            variant = VARIANTS[key]
            run_dir = runs_dir / variant.pipeline / (variant.name + ("@full" if variant.setting == "full" else "")) / f"seed{seed}"
            jobs.append(RunJob(variant, seed, run_dir, run_args(variant, seed, plan, worlds[variant.world_key])))
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


def command(job: RunJob, plan: Plan) -> tuple[list[str], dict[str, str]]:
    """One rank: ``python launch/run.py`` with the rendezvous variables set (no launcher processes); more
    ranks: ``deepspeed --num_gpus N``. Each rank gets an equal share of the cores."""
    from tide_ds.dist import free_port, single_rank_env

    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = f"{ROOT}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    args = [*job.args, f"--train.output_dir={job.run_dir}", "--train.resume=auto"]
    script = str(ROOT / "launch" / "run.py")
    if plan.ranks_per_run == 1:
        env.update(single_rank_env())
        return [sys.executable, script, *args], env
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(plan.ranks_per_run), "--master_port", str(free_port()), script, *args], env


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
        with open(locks / f"{job.variant.key.replace('/', '-')}-seed{job.seed}.lock", "w") as lock:
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
    baselines = {k: b for k in plan.variants if (b := baseline_of(k, set(labels), worlds)) is not None}
    summaries = report.summarize(results, labels=labels, references=baselines)
    bpb = bits_per_byte_summary(summaries, worlds)
    def stand_in(ref: str) -> str:  # B/none is A/none where both pipelines' student data are the same
        if ref in labels or not ref.startswith("B/none"):
            return ref
        world, other = worlds.get(VARIANTS[ref].world_key), ref.replace("B/", "A/", 1)
        return other if world is not None and world.same_student_data_as_a and other in labels else ref

    expectations = [dataclasses.replace(e, reference=stand_in(e.reference)) for e in EXPECTATIONS]
    expectations = [e for e in expectations if e.variant in labels and e.reference in labels]
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
        "bits_per_byte": bpb,
        "world_checks": world_checks(summaries, worlds, references or {}, bpb),
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


def task_measures(jobs: list[RunJob], results: list[report.RunResult], world_root: Path, n: int) -> dict:
    """The task measure (:mod:`tide_ds.experiments.task`) of every finished run, cached per run; per variant the
    mean over seeds of exact match, parse rate and similarity of the generated bodies of ``n`` held-out prompts."""
    from tide_ds.experiments import task
    from tide_ds.worlds.evidence import EvidenceSpec, build_evidence_world

    spec = EvidenceSpec()
    pairs = task.heldout_prompts(build_evidence_world(world_root, spec).root / "corpus.jsonl",
                                 heldout_fraction=spec.heldout_fraction, n=n)
    per_variant: dict[str, dict] = {}
    for job, result in zip(jobs, results):
        if not result.finished:
            continue
        try:
            scores = task.measure_run(job.run_dir, pairs)
        except Exception as err:  # a run whose student cannot be loaded is reported, never dropped silently
            logger.warning("task measure of %s seed %d failed: %s", job.variant.key, job.seed, err)
            continue
        logger.info("task %s seed %d: exact %.3f, parses %.3f, similarity %.3f", job.variant.key, job.seed,
                    scores["exact"], scores["parses"], scores["similarity"])
        entry = per_variant.setdefault(job.variant.key, {"by_seed": {}})
        entry["by_seed"][str(job.seed)] = {m: scores[m] for m in ("exact", "parses", "similarity")}
    for entry in per_variant.values():
        for m in ("exact", "parses", "similarity"):
            entry[m] = sum(v[m] for v in entry["by_seed"].values()) / len(entry["by_seed"])
    return {"prompts": len(pairs), "max_new_tokens": 64, "variants": per_variant}


def bits_per_byte_summary(summaries: list[report.VariantSummary], worlds: dict[str, World]) -> dict[str, dict]:
    """Per variant of the evidence world: held-out bits per byte by seed, mean and std (NLL per token x held-out
    response tokens / (ln 2 x their UTF-8 bytes)); empty for the demo worlds (no byte counts)."""
    from tide_ds.worlds.evidence import bits_per_byte

    out = {}
    for s in summaries:
        w = worlds.get(VARIANTS[s.variant].world_key)
        if w is None or not w.heldout_bytes or not s.values:
            continue
        by_seed = {seed: bits_per_byte(v * w.heldout_tokens, w.heldout_bytes) for seed, v in sorted(s.values.items())}
        mean, std = report.mean_std(by_seed.values())
        out[s.variant] = {"by_seed": {str(k): v for k, v in by_seed.items()}, "mean": mean, "std": std}
    return out


def world_checks(summaries: list[report.VariantSummary], worlds: dict[str, World], references: dict,
                 bpb: dict[str, dict]) -> dict[str, dict]:
    """The evidence world's conditions (issue 18), per world key with a no-distillation run: the student ends
    >= 1 nat per token below the unigram reference of all training responses, and the teacher has >= 25% fewer
    bits per byte than that student on the held-out responses."""
    means = {s.variant: s.mean for s in summaries}
    out = {}
    for key, w in worlds.items():
        none = f"{w.pipeline}/none" + ("@full" if key.endswith("@full") else "")
        if none not in means and w.same_student_data_as_a:
            none = none.replace("B/", "A/", 1)
        full_ref = references.get(w.pipeline + "@full")  # the unigram of all training responses
        if means.get(none) is None or w.teacher_bits_per_byte is None or none not in bpb or not full_ref:
            continue
        gap = means[none] - full_ref["unigram_nll"]
        saving = 1.0 - w.teacher_bits_per_byte / bpb[none]["mean"]
        out[key] = {"student_none_nll": means[none], "unigram_nll_all_training": full_ref["unigram_nll"],
                    "student_minus_unigram": gap, "student_beats_unigram_by_1_nat": gap <= -1.0,
                    "student_none_bits_per_byte": bpb[none]["mean"], "teacher_bits_per_byte": w.teacher_bits_per_byte,
                    "teacher_fewer_bits_fraction": saving, "teacher_25pct_better": saving >= 0.25}
    return out


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
        + (f"peak learning rate {plan['lr']:g}, " if plan.get("lr") else "") +
        f"seeds {plan['seeds']}, held-out evaluation on {plan['eval_samples'] or 'all'} samples every "
        f"{plan['eval_every'] or plan['steps']} steps (fixed noise seed).",
        "",
        "Held-out NLL: the masked-diffusion ELBO per maskable (response) token of the held-out files, in nats; "
        "lower is better. Δ: the paired difference against the pipeline's no-distillation run with the same seed "
        "(same initial weights, data order and noise), mean ± std over seeds; `*` marks |t| above the two-sided "
        "95% critical value.",
        "",
    ]
    evidence = plan.get("world") == "evidence"
    for pipeline in sorted({VARIANTS[s.variant].world_key for s in summaries}):
        w = data["worlds"].get(pipeline)
        sub = [s for s in summaries if VARIANTS[s.variant].world_key == pipeline]
        title = pipeline.replace("@full", ", all training samples")
        if evidence and "@" not in pipeline and w:
            title += f", limited student data ({w['train_samples']} training samples)"
        elif evidence and w:
            title += f" ({w['train_samples']})"
        lines += [f"## Pipeline {title}", ""]
        if w and w.get("student_init"):
            lines += [f"Every run of this table starts from the world's student (`{Path(w['student_init']).name}`: "
                      f"{w['student_init_steps']} CE steps on the limited training samples, held-out NLL "
                      f"{w['student_init_nll']:.4f}); the seeds vary the data order and the noise of the runs.", ""]
        lines.append(report.variant_table(sub, describe={k: VARIANTS[k].objective for k in labels}))
        bpb = data.get("bits_per_byte", {})
        if w and w.get("heldout_bytes") and any(s.variant in bpb for s in sub):
            lines += ["", f"Bits per byte on the held-out responses ({w['heldout_tokens']} student tokens, "
                      f"{w['heldout_bytes']} UTF-8 bytes; NLL x tokens / (ln 2 x bytes)): " + "; ".join(
                          f"{labels[s.variant]} {bpb[s.variant]['mean']:.4f}"
                          + (f" ± {bpb[s.variant]['std']:.4f}" if not math.isnan(bpb[s.variant]['std']) else "")
                          for s in sub if s.variant in bpb) + "."]
        ref = data["references"].get(pipeline)
        if ref:
            lines += ["", f"Context-free reference points on the same {ref['heldout_maskable_tokens']} held-out response "
                      f"tokens ({ref['heldout_samples']} samples): uniform over the tokenizer {ref['uniform_nll']:.4f}, "
                      f"unigram of the training responses {ref['unigram_nll']:.4f} (a context-free predictor's ELBO "
                      "equals its cross-entropy)."]
        check = data.get("world_checks", {}).get(pipeline)
        if check:
            lines += ["", f"World conditions: the no-distillation student's NLL is {check['student_minus_unigram']:+.4f} "
                      f"nats per token from the unigram of all training responses ({check['unigram_nll_all_training']:.4f}; "
                      f"needs <= -1: {'met' if check['student_beats_unigram_by_1_nat'] else 'NOT met'}); the teacher's "
                      f"{check['teacher_bits_per_byte']:.4f} bits per byte are {check['teacher_fewer_bits_fraction']:.1%} "
                      f"fewer than that student's {check['student_none_bits_per_byte']:.4f} (needs >= 25%: "
                      f"{'met' if check['teacher_25pct_better'] else 'NOT met'})."]
        if w and w.get("teacher_bits_per_byte") is not None:
            lines += ["", f"Teacher (`{Path(w['teacher']).name}`): {w['teacher_bits_per_byte']:.4f} bits per byte on the "
                      f"held-out responses (its masked-diffusion ELBO with only response positions masked, prompt "
                      f"visible; {w['teacher_nll']:.4f} nats per teacher token)."]
        elif w:
            unit = ("per token of the teacher's own SentencePiece tokenizer, over every non-pad token, prompt and "
                    "response: not comparable with the student's numbers" if pipeline == "A" else
                    "per token of the shared Qwen3 tokenizer, but over every non-pad token of the WeDLM chat format, "
                    "prompt and response, not only the response: not directly comparable")
            lines += ["", f"Teacher (`{Path(w['teacher']).name}`): held-out NLL {w['teacher_nll']:.4f} ({unit})."]
        lines.append("")
    task = data.get("task")
    if task and task.get("variants"):
        lines += ["## Task measure: writing the held-out functions' bodies", "",
                  f"The final student of each finished run writes the body of the first {task['prompts']} held-out "
                  f"functions (prompt: signature + docstring; the project's BD3LM sampler, greedy, "
                  f"{task['max_new_tokens']} new tokens). Exact match: the body equals the real one; parses: header + "
                  "body is valid Python; similarity: difflib ratio against the real body (0-1). Mean over seeds.", "",
                  "| variant | exact match | parses | similarity | seeds |", "|---|---|---|---|---|"]
        for key, entry in task["variants"].items():
            lines.append(f"| {labels.get(key, key)} | {entry['exact']:.3f} | {entry['parses']:.3f} | "
                         f"{entry['similarity']:.3f} | {len(entry['by_seed'])} |")
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
    p.add_argument("--world", default="demo", choices=WORLDS,
                   help="demo: the demo worlds of launch/recipes/demo*.yaml (Qwen3 student); evidence: the evidence "
                        "world of tide_ds/worlds/evidence.py (small tokenizers, a stronger teacher, limited and full "
                        "student data) with the student of launch/recipes/evidence.yaml")
    p.add_argument("--world-root", default="runs/evidence-world", help="where the evidence world is built and cached")
    p.add_argument("--variants", nargs="+", default=None, metavar="P/NAME",
                   help="variants to run (default: all but B/tide_cross; with --world=evidence also the all-data "
                        f"setting's none and native presets); known: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="student seeds (default: 1 2 3; evidence: 1-5)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default: 40; evidence: {EVIDENCE_STEPS})")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help=f"samples per rank per step (default: 16; evidence: {EVIDENCE_MICRO_BATCH})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of every run (default: the recipe's; evidence: {EVIDENCE_LR:g}, the "
                        "students continue the world's student)")
    p.add_argument("--ranks-per-run", type=int, default=1, help="DeepSpeed ranks per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads-per-rank", type=int, default=0,
                   help="OMP threads of each rank (0: the CPUs divided by parallel x ranks per run)")
    p.add_argument("--eval-samples", type=int, default=0, help="held-out samples per evaluation (0 = all)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default: half the steps; evidence: a quarter)")
    p.add_argument("--log-every", type=int, default=5, help="steps between training records")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: half the steps)")
    p.add_argument("--task-prompts", type=int, default=None,
                   help="held-out prompts whose bodies each finished student writes for the task measure "
                        "(tide_ds/experiments/task.py; default: 32 with --world=evidence, 0 = off)")
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
        evidence = args.world == "evidence"
        variants = args.variants or (EVIDENCE_VARIANTS if evidence else DEFAULT_VARIANTS)
        seeds = args.seeds or ([1, 2, 3, 4, 5] if evidence else [1, 2, 3])
        steps = args.steps or (EVIDENCE_STEPS if evidence else 40)
        eval_every = args.eval_every if args.eval_every is not None else (max(1, steps // 4) if evidence else 20)
        save_every = args.save_every if args.save_every is not None else (max(1, steps // 2) if evidence else 20)
        plan = Plan(variants=tuple(variants), seeds=tuple(seeds), steps=steps,
                    micro_batch_size=args.micro_batch_size or (EVIDENCE_MICRO_BATCH if evidence else 16),
                    lr=args.lr if args.lr is not None else (EVIDENCE_LR if evidence else 0.0),
                    ranks_per_run=args.ranks_per_run,
                    eval_samples=args.eval_samples, eval_every=eval_every, log_every=args.log_every,
                    save_every=save_every, world=args.world)
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
    if plan.world == "evidence":
        worlds = ensure_evidence_worlds(plan.world_keys, Path(args.world_root).absolute())
    else:
        worlds = ensure_worlds(plan.pipelines)
    references = {p: context_free_references(w.dataset, vocab_size=w.student_vocab) for p, w in worlds.items()}
    for w in list(worlds.values()):  # the evidence world's conditions use the unigram of all training responses
        if w.full_dataset and f"{w.pipeline}@full" not in references:
            references[f"{w.pipeline}@full"] = context_free_references(w.full_dataset, vocab_size=w.student_vocab)
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
    task_prompts = args.task_prompts if args.task_prompts is not None else (32 if plan.world == "evidence" else 0)
    if task_prompts and plan.world == "evidence":
        meta["task"] = task_measures(jobs, [results[id(j)] for j in jobs], Path(args.world_root).absolute(),
                                     task_prompts)
    data = write_report(out, plan=plan, jobs=jobs, results=[results[id(j)] for j in jobs], worlds=worlds, meta=meta,
                        with_plot=not args.no_plot, references=references)
    logger.info("%d/%d runs finished; report in %s", data["runs_finished"], data["runs_planned"], out)
    return 0 if data["runs_finished"] == data["runs_planned"] else 1


if __name__ == "__main__":
    sys.exit(main())
