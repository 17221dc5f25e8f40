"""Run configuration: one typed dataclass per concern, composed into :class:`RunConfig`.

A run is configured in three layers, later ones winning:

1. the dataclass defaults below (together they are the embedded demo recipe of ``deepspeed launch/run.py``);
2. a YAML recipe (``--recipe launch/recipes/<name>.yaml``) with one mapping per section;
3. command-line overrides ``--section.field=value``.

Every mistake is reported before any work starts, naming the option, the value seen and the fix:
unknown sections or fields suggest the closest valid name, values are converted to the field's
declared type (a failed conversion names the expected type; a ``Literal`` type is the option's one list
of choices), and cross-field rules live in each dataclass's ``__post_init__``. Every mistake raises
:class:`~tide_ds.errors.ConfigError`. Each field's help text (its ``option(default, help)`` metadata) is
the option reference; the README's option table is generated from it by :func:`option_table`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import signal
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from tide_ds import validate
from tide_ds.choices import (
    AttnImplementation,
    ConcatOrder,
    LossImplementation,
    LossNormType,
    LossWeightType,
    PipelineChoice,
    ResumeMode,
    Schedule,
    TeacherAttnImplementation,
    TeacherDtype,
    TeacherFamilyName,
    TeacherPlacement,
    TidalAxis,
    TidalGrowth,
    TidalTimestepWeight,
    World,
    choices,
)
from tide_ds.errors import ConfigError
from tide_ds.losses.objective import Preset

if TYPE_CHECKING:
    from tide_ds.losses.objective import ObjectiveSpec

ATTN_IMPLEMENTATIONS = choices(AttnImplementation)
LOSS_IMPLEMENTATIONS = choices(LossImplementation)
SCHEDULES = choices(Schedule)
LOSS_WEIGHT_TYPES = choices(LossWeightType)
LOSS_NORM_TYPES = choices(LossNormType)
PRESETS = choices(Preset)
RESUME_MODES = choices(ResumeMode)
WORLDS = choices(World)


def option(default: Any, help: str) -> Any:  # noqa: A002 - the field's help text
    """A config field with its default and its help text (the option reference and README table)."""
    return field(default=default, metadata={"help": help})


def _check_choices(section: object, name: str) -> None:
    """Every ``Literal``-typed field of ``section`` (named ``name``) holds one of its choices."""
    for f, tp in _field_types(type(section)).items():
        if typing.get_origin(tp) is Literal:
            _choice(f"{name}.{f}", getattr(section, f), choices(tp))


def _choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{option}={value!r} is not one of {list(valid)}{hint}")


def parse_signals(option: str, spec: str) -> list[signal.Signals]:
    """``"USR1,TERM"`` -> ``[SIGUSR1, SIGTERM]``; empty -> ``[]``. A name that is no catchable signal fails."""
    out: list[signal.Signals] = []
    for raw in spec.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        full = name if name.startswith("SIG") else f"SIG{name}"
        if full in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"{option}: {raw.strip()!r} cannot be caught; use USR1, USR2, TERM or INT")
        if full not in signal.Signals.__members__:
            raise ConfigError(f"{option}: {raw.strip()!r} is not a signal name; use a comma-separated list such as USR1,TERM")
        if signal.Signals[full] not in out:
            out.append(signal.Signals[full])
    return out


def _positive(option: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{option}={value!r} must be {need}")


@dataclass(kw_only=True)
class ModelArgs:
    """The student model (a Qwen3 BD3LM; docs/models.md §7)."""

    path: str = option(
        "",
        "Local Hugging Face checkpoint directory of the student; empty builds a fresh random student from the "
        "size fields below.",
    )
    tokenizer: str = option(
        "qwen3",
        'Tokenizer: "qwen3" builds the real Qwen3 tokenizer offline into the cache; otherwise a local tokenizer '
        'directory.',
    )
    attn_implementation: AttnImplementation = option(
        "sdpa",
        "Attention backend of the student: sdpa (dense boolean mask), flex_attention (cached BlockMask), eager, "
        "or tide_bd3lm (our Triton kernel on GPUs, its PyTorch reference elsewhere).",
    )
    hidden_size: int = option(64, "Hidden size of a fresh student (ignored with model.path).")
    intermediate_size: int = option(192, "MLP width of a fresh student (ignored with model.path).")
    num_layers: int = option(2, "Number of transformer layers of a fresh student (ignored with model.path).")
    num_heads: int = option(4, "Query heads of a fresh student (ignored with model.path).")
    num_kv_heads: int = option(
        2,
        "Key/value heads of a fresh student (grouped-query attention; ignored with model.path).",
    )
    head_dim: int = option(
        32,
        "Head dimension of a fresh student (may differ from hidden_size / num_heads, as in Qwen3; ignored with "
        "model.path).",
    )
    ce_chunk_rows: int = option(
        0,
        "Rows of the LM head per chunk in the plain-PyTorch fused CE (bounds the [rows, V] logits tile); 0 = "
        "automatic.",
    )
    loss_implementation: LossImplementation = option(
        "auto",
        "Fused LM-head losses (student CE and CALM family, teacher target log-probs, pipeline B's token "
        "divergences): auto (Triton kernels on GPUs, the tiled PyTorch path elsewhere), pytorch, or triton (on a "
        "CPU only under TRITON_INTERPRET=1); reference is the deprecated name of pytorch.",
    )

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.ce_chunk_rows", self.ce_chunk_rows, allow_zero=True)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs whole groups: change one of them"
            )


@dataclass(kw_only=True)
class DataArgs:
    """Training and evaluation data (tokenized offline; training never tokenizes)."""

    dataset: str = option(
        "",
        "Dataset directory saved with datasets' save_to_disk; empty: launch/run.py builds the world of world.name"
        " first and trains on its dataset.",
    )
    seq_len: int = option(
        128,
        "Student sequence length L (one copy; the model sees 2L tokens). Must be a multiple of diffusion.block_size.",
    )
    teacher_seq_len: int = option(
        0,
        "Teacher sequence length L_t that data.dataset's teacher columns must have, checked before any weight is "
        "read (0 = not checked). The instruct world's own length is world.teacher_seq_len; this option no longer "
        "sets it.",
    )
    train_split: str = option("train", "Split used for training.")
    eval_split: str = option("heldout", "Held-out split used for evaluation.")
    eval_samples: int = option(64, "Number of held-out samples evaluated each time (0 = all).")

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        _positive("data.eval_samples", self.eval_samples, allow_zero=True)
        _positive("data.teacher_seq_len", self.teacher_seq_len, allow_zero=True)


@dataclass(kw_only=True)
class WorldArgs:
    """A small self-contained world built offline before training when data.dataset is empty (tide_ds.worlds)."""

    name: World = option(
        "instruct",
        "instruct: the TIDE demo world of distill.pipeline (instruction corpus of the standard library, "
        "preprocessed dataset, a pretrained teacher; all built once into the cache); code: standard-library "
        "source as plain text (CE only, no teacher).",
    )
    teacher_seq_len: int = option(256, "Teacher sequence length L_t for the instruct world's preprocessing.")
    heldout_fraction: float = option(0.03, "Fraction of source files held out (code world; the split is by file).")
    max_files: int = option(0, "Limit of source files read for the world's corpus (0 = all).")
    teacher_steps: int = option(
        150,
        "Pretraining steps of the instruct world's teacher (built once per value and cached).",
    )
    seed: int = option(
        42,
        "Seed of the instruct world (corpus split, teacher tokenizer and pretraining); independent of train.seed,"
        " so a sweep over the student's seed reuses one teacher.",
    )
    baseline: bool = option(
        True,
        "After a distillation run of the instruct world, also train its no-distillation baseline (preset none, "
        "the same options, into <output_dir>-none) when none is recorded for the same world and rank count, so "
        "the report can say whether TIDE beat it; a recorded one is reused. The first demo run takes about twice "
        "as long; false skips it (the report then gives the command that trains it).",
    )

    def __post_init__(self) -> None:
        _check_choices(self, "world")
        _positive("world.teacher_steps", self.teacher_steps)
        _positive("world.max_files", self.max_files, allow_zero=True)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"world.heldout_fraction={self.heldout_fraction!r} must lie in (0, 1)")


@dataclass(kw_only=True)
class DiffusionArgs:
    """Masked block diffusion (docs/method.md §1–§2)."""

    block_size: int = option(32, "BD3LM block size K.")
    time_epsilon: float = option(1e-3, "Timesteps are drawn from [time_epsilon, 1); must lie in (0, 1).")
    schedule: Schedule = option("linear", "Noise schedule alpha(t): linear or cosine.")
    loss_weight_type: LossWeightType = option("scheduler", 'Per-token CE weight: "scheduler" (ELBO weight w(t)) or "uniform".')
    loss_norm_type: LossNormType = option("token", "CE normalisation: token (per maskable token), sequence or batch.")

    def __post_init__(self) -> None:
        _positive("diffusion.block_size", self.block_size)
        if not 0.0 < self.time_epsilon < 1.0:
            raise ConfigError(f"diffusion.time_epsilon={self.time_epsilon!r} must lie in (0, 1)")
        _check_choices(self, "diffusion")


@dataclass(kw_only=True)
class TeacherArgs:
    """The frozen teacher (a second DeepSpeed engine; docs/models.md §3–§6)."""

    path: str = option(
        "",
        "Local checkpoint directory of the teacher (LLaDA2.0-mini, WeDLM, LLaDA or Dream layout); empty = no "
        "teacher.",
    )
    family: TeacherFamilyName = option("", "Teacher family (llada2_moe, wedlm, llada, dream); empty detects it from config.json.")
    placement: TeacherPlacement = option(
        "auto",
        "Placement: replicate, zero3, zero3_offload, or auto (decided from bytes, world size and free memory).",
    )
    dtype: TeacherDtype = option("auto", "Teacher dtype: auto (bf16 on GPUs, fp32 on the CPU), bfloat16 or float32.")
    attn_implementation: TeacherAttnImplementation = option(
        "sdpa",
        "Attention backend of the teacher: sdpa, eager, or tide_bd3lm (our Triton kernel on GPUs: key lengths for"
        " bidirectional teachers, right padding; the BD3LM mask for WeDLM).",
    )
    concat_order: ConcatOrder = option(
        "x0_xt",
        "Order of the BD3LM teacher's two copies (WeDLM): x0_xt (WeDLM's own) or xt_x0; bidirectional teachers "
        "ignore it.",
    )
    mask_token_id: int = option(
        -1,
        "The teacher's mask token id; -1 reads it from the checkpoint (config.json or tokenizer), which is then "
        "checked.",
    )
    load_concurrency: int = option(
        0,
        "Ranks of a node reading the teacher checkpoint at once (the others wait their turn); 0 = all at once. "
        "Each wave must finish within train.dist_timeout_minutes.",
    )

    def __post_init__(self) -> None:
        _check_choices(self, "teacher")
        if self.load_concurrency < 0:
            raise ConfigError(
                f"teacher.load_concurrency={self.load_concurrency} must be >= 0 (0 = every rank of a node at once)")
        if self.mask_token_id < -1:
            raise ConfigError(f"teacher.mask_token_id={self.mask_token_id} must be -1 (from the checkpoint) or an id >= 0")


@dataclass(kw_only=True)
class DistillArgs:
    """The objective: masked-diffusion CE plus the distillation terms of a preset or mode (docs/method.md §5–§10)."""

    preset: Preset = option("tide_cross", "Paper variant: none (CE only), calm, tide_cross, tide_shared, kl (docs/method.md §9.3).")
    pipeline: PipelineChoice = option(
        "auto",
        "Pipeline: A (cross tokenizer, chunk terms), B (shared tokenizer, token terms), or auto (calm -> A, kl ->"
        " B, otherwise A).",
    )
    mode: str = option(
        "",
        "Reference mode string (e.g. reverse_alm, taid_aligned+kl_aligned); overrides the preset's mode when set.",
    )
    comp_demo: bool | None = option(
        None,
        "CompDemo (two complementary teacher passes): true or false; empty (none) follows the preset (on for "
        "tide_shared).",
    )
    demo_ratio: float = option(0.5, "Fraction of masked items revealed to the teacher in CompDemo's first pass.")
    calm_weight: float = option(1.0, "Weight of CALM / Reverse CALM / chunk TIDAL.")
    calm_temperature: float = option(
        5.0,
        "Chunk temperature T (the paper's pipeline-A script uses 5.0; the reference's Python default is 2.0).",
    )
    kl_weight: float = option(1.0, "Weight of KL / reverse KL.")
    kl_temperature: float = option(2.0, "Temperature of KL, reverse KL and token TIDAL.")
    shared_vocab_size: int = option(
        151646,
        "Pipeline B: the shared vocabulary prefix V' both logit vectors are cut to (151646 for Qwen-family pairs).",
    )
    tidal_weight: float = option(1.0, "Weight of token TIDAL.")
    tidal_lambda_init: float = option(0.1, "TIDAL lambda at the start of training.")
    tidal_lambda_max: float = option(0.9, "TIDAL lambda at the end of training.")
    tidal_growth: TidalGrowth = option("cosine", "TIDAL growth over training progress: cosine or linear.")
    tidal_axis: TidalAxis = option("both", "TIDAL axes: both, training_only or timestep_only.")
    tidal_timestep_weight: TidalTimestepWeight = option("uniform", "TIDAL timestep weight: uniform or midrange.")

    def __post_init__(self) -> None:
        _check_choices(self, "distill")
        if self.comp_demo not in (None, True, False):
            raise ConfigError(f"distill.comp_demo={self.comp_demo!r} must be true, false or empty (follow the preset)")
        if not 0.0 < self.demo_ratio < 1.0:
            raise ConfigError(f"distill.demo_ratio={self.demo_ratio!r} must lie in (0, 1)")
        _positive("distill.shared_vocab_size", self.shared_vocab_size)
        for name in ("calm_temperature", "kl_temperature"):
            _positive(f"distill.{name}", getattr(self, name))
        for name in ("calm_weight", "kl_weight", "tidal_weight"):
            _positive(f"distill.{name}", getattr(self, name), allow_zero=True)
        self.objective  # parsed once, now: a bad preset/mode/pipeline fails before any work  # noqa: B018

    @functools.cached_property
    def resolved_pipeline(self) -> str:
        """"A" or "B": the explicit choice, else the preset's only pipeline, else A (the paper's best, TIDE-Cross)."""
        if self.pipeline != "auto":
            return self.pipeline
        if self.mode:
            from tide_ds.losses.objective import parse_mode

            spec = parse_mode(self.mode)
            return spec.pipeline.value if spec.pipeline is not None else "A"
        from tide_ds.losses.objective import preset_pipelines

        pipelines = preset_pipelines(self.preset)
        return pipelines[0] if len(pipelines) == 1 else "A"

    @functools.cached_property
    def objective(self) -> ObjectiveSpec:
        """The typed objective, parsed once per config (sections are replaced, never mutated)."""
        from tide_ds.losses.objective import parse_mode, preset_objective

        if self.mode:  # the mode replaces the preset's; CompDemo follows distill.comp_demo, else the preset
            if self.comp_demo is not None:
                comp = self.comp_demo
            else:
                try:
                    comp = preset_objective(self.preset, pipeline=self.resolved_pipeline).comp_demo
                except ValueError:  # the preset has no form on the mode's pipeline
                    comp = False
            spec = parse_mode(self.mode, comp_demo=comp)
        else:
            spec = preset_objective(self.preset, pipeline=self.resolved_pipeline)
        if not self.mode and self.comp_demo is not None:
            spec = parse_mode(spec.mode, comp_demo=self.comp_demo) if spec.terms else spec
        if self.pipeline != "auto" and spec.pipeline is not None and spec.pipeline.value != self.pipeline:
            raise ConfigError(
                f"distill.mode={spec.mode!r} belongs to pipeline {spec.pipeline.value}, but distill.pipeline="
                f"{self.pipeline!r}; drop one of them"
            )
        return spec


@dataclass(kw_only=True)
class TrainArgs:
    """Optimisation, cadence and run-directory handling."""

    output_dir: str = option("runs/demo", "Run directory: logs, metrics, TensorBoard events and checkpoints go here.")
    ds_config: str = option(
        "ds_configs/zero2.json",
        "DeepSpeed engine config (engine settings only: ZeRO stage, precision, offload).",
    )
    micro_batch_size: int = option(8, "Samples per rank per micro-step.")
    gradient_accumulation_steps: int = option(1, "Micro-steps per optimizer step.")
    max_steps: int = option(100, "Number of optimizer steps.")
    lr: float = option(3e-3, "Peak learning rate (AdamW).")
    warmup_ratio: float = option(
        0.1,
        "Warm-up length as a fraction of max_steps (linear warm-up, then cosine decay to min_lr_ratio * lr).",
    )
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of the peak.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    grad_clip: float = option(1.0, "Gradient clipping by global norm (0 disables).")
    seed: int = option(
        42,
        "Seed of model init, data order and every noise generator (noise is seeded per (seed, step, rank)).",
    )
    log_every: int = option(
        10,
        "Steps between log lines / metrics records (the only host synchronisation of the loop).",
    )
    eval_every: int = option(50, "Steps between held-out evaluations (0 = only at the end).")
    eval_seed: int = option(1234, "Seed of the evaluation noise, fixed so numbers are comparable across steps.")
    save_every: int = option(0, "Steps between checkpoints (0 = only at the end).")
    keep_last: int = option(2, "Number of most recent checkpoints kept.")
    resume: ResumeMode = option(
        "never",
        '"auto" continues from the last complete checkpoint of output_dir; "never" requires a fresh output_dir.',
    )
    overwrite: bool = option(
        False,
        "Move an existing output_dir aside (renamed with a timestamp, never deleted) and start fresh.",
    )
    preempt_signals: str = option(
        "USR1,TERM",
        "Signals that ask for a checkpoint at the next step boundary and an exit with code 75 for a requeue "
        "(comma-separated; empty disables).",
    )
    max_nonfinite_steps: int = option(
        5,
        "Stop the run (exit code 65) after this many consecutive steps with a NaN/inf loss or gradient norm "
        "(0 = never).",
    )
    tensorboard: bool = option(
        True,
        "Write TensorBoard scalars (deprecated: leave tensorboard out of report_to instead; false still turns it off).",
    )
    report_to: str = option(
        "tensorboard,jsonl",
        "Where metrics go, comma-separated: tensorboard, jsonl, wandb (wandb needs the wandb extra); "
        "metrics.jsonl is always written.",
    )
    wandb_project: str = option(
        "", "Weights & Biases project when report_to has wandb (empty: $WANDB_PROJECT, else tide-ds)."
    )
    progress_bar: bool = option(True, "Show a progress bar on rank 0.")
    global_batch_size: int = option(
        0,
        "Global batch (samples per optimizer step, all ranks); 0 = micro_batch_size x gradient_accumulation_steps x "
        "world size. When set, the gradient accumulation is derived from it, so the global batch stays fixed when "
        "the node count changes.",
    )
    epochs: float = option(
        0.0,
        "Passes over the training split; when > 0, max_steps = ceil(epochs x train rows / global batch) (counted "
        "from data.dataset, or from the world's dataset once it is built).",
    )
    dist_timeout_minutes: float = option(
        60.0,
        "Timeout of every collective (the default group, DeepSpeed's groups and the gloo groups), in minutes; "
        "long enough for a teacher load between two collectives.",
    )

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "lr", "log_every", "keep_last"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("eval_every", "save_every", "grad_clip", "weight_decay", "adam_eps", "max_nonfinite_steps"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must lie in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)!r} must lie in [0, 1)")
        _check_choices(self, "train")
        parse_signals("train.preempt_signals", self.preempt_signals)
        from tide_ds.trainer.reporters import parse_report_to  # train.report_to (issue 19)

        parse_report_to(self.report_to)
        for name in ("global_batch_size", "epochs"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.dist_timeout_minutes", self.dist_timeout_minutes)
        if self.resume == "auto" and self.overwrite:
            raise ConfigError(
                "train.resume=auto and train.overwrite=true contradict each other: "
                "resume continues the run in output_dir, overwrite moves it aside; pick one"
            )


@dataclass(kw_only=True)
class RunConfig:
    """One training run: every section of the configuration."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    world: WorldArgs = field(default_factory=WorldArgs)
    diffusion: DiffusionArgs = field(default_factory=DiffusionArgs)
    teacher: TeacherArgs = field(default_factory=TeacherArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        validate.reject_non_finite(self)  # NaN/inf in any float option (tide_ds/validate.py)
        if self.data.seq_len % self.diffusion.block_size:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is not a multiple of diffusion.block_size="
                f"{self.diffusion.block_size}; BD3LM blocks must tile the sequence: change one of them"
            )

        if not self.data.dataset and self.data.teacher_seq_len:
            self._check_world_teacher_seq_len()

        spec = self.distill.objective
        world_teacher = not self.data.dataset and self.world.name == "instruct"  # the world pretrains one
        if spec.terms and not self.teacher.path and not world_teacher:
            where = "" if self.data.dataset else f" (world.name={self.world.name!r} builds no teacher)"
            raise ConfigError(
                f"distill.preset={self.distill.preset!r} (mode {spec.mode!r}) distils from a teacher, but "
                f"teacher.path is empty{where}; set --teacher.path=<checkpoint dir> or use --distill.preset=none"
            )

    def _check_world_teacher_seq_len(self) -> None:
        """``data.teacher_seq_len`` checks a dataset's teacher length; a world builds its own (``world.teacher_seq_len``).

        Before the ``world.*`` section, ``data.teacher_seq_len`` also set the demo's length. That meaning is gone
        (one name, one meaning), so a value that would have set the world's length is refused with the fix.
        """
        n, w = self.data.teacher_seq_len, self.world
        if w.name == "instruct" and n == w.teacher_seq_len:
            return  # the check agrees with what the world builds
        built = (f"the instruct world builds its teacher columns with world.teacher_seq_len={w.teacher_seq_len}"
                 if w.name == "instruct" else f"world.name={w.name!r} builds no teacher columns")
        raise ConfigError(
            f"data.teacher_seq_len={n} checks the teacher length of a prebuilt data.dataset (0 = not checked), but "
            f"data.dataset is empty and {built}; to set the world's teacher length use --world.teacher_seq_len={n} "
            "(data.teacher_seq_len no longer sets it), and leave data.teacher_seq_len at 0"
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building a RunConfig from dicts, YAML recipes and --section.field=value overrides


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(kind: str, name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return ConfigError(f"unknown {kind} {name!r} in {where}; {hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def convert_value(option: str, value: Any, tp: Any, *, source: str) -> Any:
    """Convert ``value`` (a YAML scalar or a command-line string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # optional: empty, none or null is None ("not set")
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return convert_value(option, value, args[0], source=source)
    if origin is Literal:  # a choice: the type is the list
        if isinstance(value, (dict, list, bool)):
            value = repr(value)
        _choice(option, str(value), choices(tp))
        return str(value)
    article = "an" if _type_name(tp)[0] in "aeiou" else "a"
    bad = ConfigError(f"{option}={value!r} ({source}) is not {article} {_type_name(tp)}; expected {article} {_type_name(tp)} value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{option}={value!r} ({source}) is not a bool; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip().replace("_", "")):
            return int(value.strip().replace("_", ""))
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise TypeError(f"internal: unsupported field type {tp!r} for {option}")


#: Options that moved, old name -> new name (the old names keep working, with a deprecation message).
RENAMED_OPTIONS = {
    ("data", "heldout_fraction"): ("world", "heldout_fraction"),
    ("data", "max_files"): ("world", "max_files"),
    ("data", "demo_teacher_steps"): ("world", "teacher_steps"),
    ("data", "demo_seed"): ("world", "seed"),
}
#: Old values of data.dataset that named a world, -> world.name.
WORLD_DATASETS = {"demo": "instruct", "stdlib": "code"}


def _deprecated(old: str, new: str, source: str) -> None:
    warnings.warn(f"{old} ({source}) is deprecated; use {new}", FutureWarning, stacklevel=3)


def renamed_option(section: str, key: str, value: Any, *, source: str) -> list[tuple[str, str, Any]]:
    """``[(section, key, value)]`` under the current names for one setting (old names and values mapped)."""
    if (section, key) in RENAMED_OPTIONS:
        new_section, new_key = RENAMED_OPTIONS[(section, key)]
        _deprecated(f"{section}.{key}", f"{new_section}.{new_key}", source)
        return [(new_section, new_key, value)]
    if (section, key) == ("data", "dataset") and isinstance(value, str) and value in WORLD_DATASETS:
        _deprecated(f"data.dataset={value}", f"an empty data.dataset with world.name={WORLD_DATASETS[value]}", source)
        return [("data", "dataset", ""), ("world", "name", WORLD_DATASETS[value])]
    return [(section, key, value)]


def _with_current_names(data: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            out[section] = values
            continue
        out.setdefault(section, {})
        for key, value in values.items():
            for new_section, new_key, new_value in renamed_option(section, key, value, source=source):
                target = out.setdefault(new_section, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"section {new_section!r} in {source} must be a mapping of fields, got {target!r}")
                target[new_key] = new_value
    return out


def config_from_dict(data: dict[str, Any], *, source: str = "recipe") -> RunConfig:
    """Build and validate a :class:`RunConfig` from ``{section: {field: value}}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of sections to mappings, got {type(data).__name__}")
    data = _with_current_names(data, source)
    sections = _sections()
    built: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            raise _unknown("section", name, list(sections), source)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {name!r} in {source} must be a mapping of fields, got {values!r}")
        types_ = _field_types(sections[name])
        kwargs = {}
        for key, value in values.items():
            if key not in types_:
                raise _unknown("field", f"{name}.{key}", [f"{name}.{k}" for k in types_], source)
            kwargs[key] = convert_value(f"{name}.{key}", value, types_[key], source=source)
        built[name] = sections[name](**kwargs)
    return RunConfig(**built)


def parse_override(arg: str) -> tuple[str, str, str]:
    """Split ``--section.field=value`` into its parts."""
    match = re.fullmatch(r"--([A-Za-z_]\w*)\.([A-Za-z_]\w*)=(.*)", arg, flags=re.S)
    if not match:
        raise ConfigError(
            f"cannot parse argument {arg!r}; overrides are written --section.field=value, "
            "e.g. --train.max_steps=100"
        )
    return match.group(1), match.group(2), match.group(3)


#: The checkout holding ``ds_configs/`` and ``launch/recipes/`` (relative paths fall back to it).
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_repo_path(path: str | Path) -> Path:
    """A relative path as given if it exists from the working directory, else from the checkout root.

    So ``--recipe launch/recipes/demo.yaml`` and the default ``train.ds_config=ds_configs/zero2.json`` work
    from any directory (a Slurm job's, a notebook's), while a user's own relative file still wins.
    """
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else path


def load_recipe(path: str | Path) -> dict[str, Any]:
    given = path
    path = resolve_repo_path(path)
    if not path.is_file():
        raise ConfigError(
            f"--recipe={str(given)!r} does not exist (looked in {Path.cwd()} and {REPO_ROOT}); recipes live in "
            "launch/recipes/"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):  # a list or a scalar at the top
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, data:, train:, ...) at its top "
                          f"level, got a {type(data).__name__}")
    return data or {}


def build_config(*, recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the recipe, then the overrides; validated as a whole."""
    merged: dict[str, dict[str, Any]] = {}
    if recipe is not None:
        for section, values in load_recipe(recipe).items():
            merged[section] = dict(values or {}) if isinstance(values, dict) else values
        merged = _with_current_names(merged, f"recipe {recipe}")
        config_from_dict(merged, source=f"recipe {recipe}")
    sections = _sections()
    for arg in overrides:
        for section, key, value in renamed_option(*parse_override(arg), source="command line"):
            if section not in sections:
                raise _unknown("section", section, list(sections), f"override {arg!r}")
            types_ = _field_types(sections[section])
            if key not in types_:
                raise _unknown("option", f"{section}.{key}", [f"{section}.{k}" for k in types_], f"override {arg!r}")
            merged.setdefault(section, {})[key] = convert_value(
                f"{section}.{key}", value, types_[key], source="command line"
            )
    return config_from_dict(merged, source="recipe and overrides")


def option_table() -> str:
    """A markdown table of every option with its default and help text (for the README)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append(f"| `{section}.{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
