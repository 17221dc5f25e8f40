"""Run configuration: one typed dataclass per concern, composed into :class:`RunConfig`.

A run is configured in three layers, later ones winning:

1. the dataclass defaults below (together they are the embedded demo recipe of ``deepspeed launch/run.py``);
2. a YAML recipe (``--recipe launch/recipes/<name>.yaml``) with one mapping per section;
3. command-line overrides ``--section.field=value``.

Every mistake is reported before any work starts, naming the option, the value seen and the fix:
unknown sections or fields suggest the closest valid name, values are converted to the field's
declared type (a failed conversion names the expected type), and cross-field rules live in each
dataclass's ``__post_init__``. The field docstrings (``#:`` comments) are the option reference; the
README's option table is generated from them by :func:`option_table`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ATTN_IMPLEMENTATIONS = ("sdpa", "flex_attention", "eager", "tide_bd3lm")
LOSS_IMPLEMENTATIONS = ("auto", "reference", "triton")  # tide_ds.losses.fused_head.LOSS_IMPLEMENTATIONS
SCHEDULES = ("linear", "cosine")
LOSS_WEIGHT_TYPES = ("scheduler", "uniform")
LOSS_NORM_TYPES = ("token", "sequence", "batch")
PRESETS = ("none", "calm", "tide_cross", "tide_shared", "kl")
RESUME_MODES = ("auto", "never")


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{option}={value!r} is not one of {list(choices)}{hint}")


def parse_signals(option: str, spec: str) -> list[signal.Signals]:
    """``"USR1,TERM"`` -> ``[SIGUSR1, SIGTERM]``; empty -> ``[]``. A name that is no catchable signal fails."""
    out: list[signal.Signals] = []
    for raw in spec.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        full = name if name.startswith("SIG") else f"SIG{name}"
        if full in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{option}: {raw.strip()!r} cannot be caught; use USR1, USR2, TERM or INT")
        if full not in signal.Signals.__members__:
            raise ValueError(f"{option}: {raw.strip()!r} is not a signal name; use a comma-separated list such as USR1,TERM")
        if signal.Signals[full] not in out:
            out.append(signal.Signals[full])
    return out


def _positive(option: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{option}={value!r} must be {need}")


@dataclass(kw_only=True)
class ModelArgs:
    """The student model (a Qwen3 BD3LM; spec MODELS.md §7)."""

    #: Local Hugging Face checkpoint directory of the student; empty builds a fresh random student from the size fields below.
    path: str = ""
    #: Tokenizer: "qwen3" builds the real Qwen3 tokenizer offline into the cache; otherwise a local tokenizer directory.
    tokenizer: str = "qwen3"
    #: Attention backend of the student: sdpa (dense boolean mask), flex_attention (cached BlockMask), eager, or tide_bd3lm (our Triton kernel on GPUs, its PyTorch reference elsewhere).
    attn_implementation: str = "sdpa"
    #: Hidden size of a fresh student (ignored with model.path).
    hidden_size: int = 64
    #: MLP width of a fresh student (ignored with model.path).
    intermediate_size: int = 192
    #: Number of transformer layers of a fresh student (ignored with model.path).
    num_layers: int = 2
    #: Query heads of a fresh student (ignored with model.path).
    num_heads: int = 4
    #: Key/value heads of a fresh student (grouped-query attention; ignored with model.path).
    num_kv_heads: int = 2
    #: Head dimension of a fresh student (may differ from hidden_size / num_heads, as in Qwen3; ignored with model.path).
    head_dim: int = 32
    #: Rows of the LM head per chunk in the plain-PyTorch fused CE (bounds the [rows, V] logits tile); 0 = automatic.
    ce_chunk_rows: int = 0
    #: Fused LM-head losses (student CE and CALM family, teacher target log-probs): auto (Triton kernels on GPUs, the row-tiled PyTorch reference elsewhere), reference, or triton (on a CPU only under TRITON_INTERPRET=1).
    loss_implementation: str = "auto"

    def __post_init__(self) -> None:
        _choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("model.loss_implementation", self.loss_implementation, LOSS_IMPLEMENTATIONS)
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _positive(f"model.{name}", getattr(self, name))
        _positive("model.ce_chunk_rows", self.ce_chunk_rows, allow_zero=True)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.num_kv_heads}; "
                "grouped-query attention needs whole groups: change one of them"
            )


@dataclass(kw_only=True)
class DataArgs:
    """Training and evaluation data (tokenized offline; training never tokenizes)."""

    #: "demo": the TIDE demo world of distill.pipeline (instruction corpus, preprocessed dataset, a pretrained teacher; all built once into the cache); "stdlib": standard-library source as plain text (CE only); otherwise a dataset saved with datasets' save_to_disk.
    dataset: str = "demo"
    #: Student sequence length L (one copy; the model sees 2L tokens). Must be a multiple of diffusion.block_size.
    seq_len: int = 128
    #: Teacher sequence length L_t: checked against a prebuilt dataset's teacher columns (0 = not checked); the demo's preprocessing uses it (0 = 256).
    teacher_seq_len: int = 0
    #: Split used for training.
    train_split: str = "train"
    #: Held-out split used for evaluation.
    eval_split: str = "heldout"
    #: Fraction of source files held out (demo corpus only; the split is by file).
    heldout_fraction: float = 0.03
    #: Number of held-out samples evaluated each time (0 = all).
    eval_samples: int = 64
    #: Limit of source files read for the demo corpus (0 = all).
    max_files: int = 0
    #: Pretraining steps of the demo world's teacher (data.dataset=demo; built once per value and cached).
    demo_teacher_steps: int = 150
    #: Seed of the demo world (corpus split, teacher tokenizer and pretraining); independent of train.seed, so a sweep over the student's seed reuses one teacher.
    demo_seed: int = 42

    def __post_init__(self) -> None:
        _positive("data.demo_teacher_steps", self.demo_teacher_steps)
        _positive("data.seq_len", self.seq_len)
        _positive("data.eval_samples", self.eval_samples, allow_zero=True)
        _positive("data.max_files", self.max_files, allow_zero=True)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction={self.heldout_fraction!r} must lie in (0, 1)")


@dataclass(kw_only=True)
class DiffusionArgs:
    """Masked block diffusion (spec ALGORITHMS.md §1–§2)."""

    #: BD3LM block size K.
    block_size: int = 32
    #: Timesteps are drawn from [time_epsilon, 1); must lie in (0, 1).
    time_epsilon: float = 1e-3
    #: Noise schedule alpha(t): linear or cosine.
    schedule: str = "linear"
    #: Per-token CE weight: "scheduler" (ELBO weight w(t)) or "uniform".
    loss_weight_type: str = "scheduler"
    #: CE normalisation: token (per maskable token), sequence or batch.
    loss_norm_type: str = "token"

    def __post_init__(self) -> None:
        _positive("diffusion.block_size", self.block_size)
        if not 0.0 < self.time_epsilon < 1.0:
            raise ValueError(f"diffusion.time_epsilon={self.time_epsilon!r} must lie in (0, 1)")
        _choice("diffusion.schedule", self.schedule, SCHEDULES)
        _choice("diffusion.loss_weight_type", self.loss_weight_type, LOSS_WEIGHT_TYPES)
        _choice("diffusion.loss_norm_type", self.loss_norm_type, LOSS_NORM_TYPES)


@dataclass(kw_only=True)
class TeacherArgs:
    """The frozen teacher (a second DeepSpeed engine; spec MODELS.md §3–§6)."""

    #: Local checkpoint directory of the teacher (LLaDA2.0-mini, WeDLM, LLaDA or Dream layout); empty = no teacher.
    path: str = ""
    #: Teacher family (llada2_moe, wedlm, llada, dream); empty detects it from config.json.
    family: str = ""
    #: Placement: replicate, zero3, zero3_offload, or auto (decided from bytes, world size and free memory).
    placement: str = "auto"
    #: Teacher dtype: auto (bf16 on GPUs, fp32 on the CPU), bfloat16 or float32.
    dtype: str = "auto"
    #: Attention backend of the teacher: sdpa, eager, or tide_bd3lm (our Triton kernel on GPUs: key lengths for bidirectional teachers, right padding; the BD3LM mask for WeDLM).
    attn_implementation: str = "sdpa"
    #: Order of the BD3LM teacher's two copies (WeDLM): x0_xt (WeDLM's own) or xt_x0; bidirectional teachers ignore it.
    concat_order: str = "x0_xt"
    #: The teacher's mask token id; -1 reads it from the checkpoint (config.json or tokenizer), which is then checked.
    mask_token_id: int = -1

    def __post_init__(self) -> None:
        _choice("teacher.placement", self.placement, ("replicate", "zero3", "zero3_offload", "auto"))
        _choice("teacher.concat_order", self.concat_order, ("x0_xt", "xt_x0"))
        if self.mask_token_id < -1:
            raise ValueError(f"teacher.mask_token_id={self.mask_token_id} must be -1 (from the checkpoint) or an id >= 0")
        _choice("teacher.dtype", self.dtype, ("auto", "bfloat16", "float32"))
        _choice("teacher.attn_implementation", self.attn_implementation, ("sdpa", "eager", "tide_bd3lm"))
        if self.family:
            _choice("teacher.family", self.family, ("llada2_moe", "wedlm", "llada", "dream"))


@dataclass(kw_only=True)
class DistillArgs:
    """The objective: masked-diffusion CE plus the distillation terms of a preset or mode (spec §5–§10)."""

    #: Paper variant: none (CE only), calm, tide_cross, tide_shared, kl (spec §9.3).
    preset: str = "tide_cross"
    #: Pipeline: A (cross tokenizer, chunk terms), B (shared tokenizer, token terms), or auto (calm -> A, kl -> B, otherwise A).
    pipeline: str = "auto"
    #: Reference mode string (e.g. reverse_alm, taid_aligned+kl_aligned); overrides the preset's mode when set.
    mode: str = ""
    #: CompDemo (two complementary teacher passes); empty follows the preset (on for tide_shared).
    comp_demo: str = ""
    #: Fraction of masked items revealed to the teacher in CompDemo's first pass.
    demo_ratio: float = 0.5
    #: Weight of CALM / Reverse CALM / chunk TIDAL.
    calm_weight: float = 1.0
    #: Chunk temperature T (the paper's pipeline-A script uses 5.0; the reference's Python default is 2.0).
    calm_temperature: float = 5.0
    #: Weight of KL / reverse KL.
    kl_weight: float = 1.0
    #: Temperature of KL, reverse KL and token TIDAL.
    kl_temperature: float = 2.0
    #: Pipeline B: the shared vocabulary prefix V' both logit vectors are cut to (151646 for Qwen-family pairs).
    shared_vocab_size: int = 151646
    #: Weight of token TIDAL.
    tidal_weight: float = 1.0
    #: TIDAL lambda at the start of training.
    tidal_lambda_init: float = 0.1
    #: TIDAL lambda at the end of training.
    tidal_lambda_max: float = 0.9
    #: TIDAL growth over training progress: cosine or linear.
    tidal_growth: str = "cosine"
    #: TIDAL axes: both, training_only or timestep_only.
    tidal_axis: str = "both"
    #: TIDAL timestep weight: uniform or midrange.
    tidal_timestep_weight: str = "uniform"

    def __post_init__(self) -> None:
        _choice("distill.preset", self.preset, PRESETS)
        _choice("distill.pipeline", self.pipeline, ("auto", "A", "B"))
        if self.comp_demo:
            _choice("distill.comp_demo", self.comp_demo, ("true", "false"))
        if not 0.0 < self.demo_ratio < 1.0:
            raise ValueError(f"distill.demo_ratio={self.demo_ratio!r} must lie in (0, 1)")
        _positive("distill.shared_vocab_size", self.shared_vocab_size)
        for name in ("calm_temperature", "kl_temperature"):
            _positive(f"distill.{name}", getattr(self, name))
        for name in ("calm_weight", "kl_weight", "tidal_weight"):
            _positive(f"distill.{name}", getattr(self, name), allow_zero=True)
        self.objective()  # parse once now, so a bad preset/mode/pipeline fails before any work

    @property
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

    def objective(self):
        """The typed objective (``tide_ds.losses.objective.ObjectiveSpec``)."""
        from tide_ds.losses.objective import parse_mode, preset_objective

        if self.mode:  # the mode replaces the preset's; CompDemo follows distill.comp_demo, else the preset
            if self.comp_demo:
                comp = self.comp_demo == "true"
            else:
                try:
                    comp = preset_objective(self.preset, pipeline=self.resolved_pipeline).comp_demo
                except ValueError:  # the preset has no form on the mode's pipeline
                    comp = False
            spec = parse_mode(self.mode, comp_demo=comp)
        else:
            spec = preset_objective(self.preset, pipeline=self.resolved_pipeline)
        if not self.mode and self.comp_demo:
            spec = parse_mode(spec.mode, comp_demo=self.comp_demo == "true") if spec.terms else spec
        if self.pipeline != "auto" and spec.pipeline is not None and spec.pipeline.value != self.pipeline:
            raise ValueError(
                f"distill.mode={spec.mode!r} belongs to pipeline {spec.pipeline.value}, but distill.pipeline="
                f"{self.pipeline!r}; drop one of them"
            )
        return spec


@dataclass(kw_only=True)
class TrainArgs:
    """Optimisation, cadence and run-directory handling."""

    #: Run directory: logs, metrics, TensorBoard events and checkpoints go here.
    output_dir: str = "runs/demo"
    #: DeepSpeed engine config (engine settings only: ZeRO stage, precision, offload).
    ds_config: str = "ds_configs/zero2.json"
    #: Samples per rank per micro-step.
    micro_batch_size: int = 8
    #: Micro-steps per optimizer step.
    gradient_accumulation_steps: int = 1
    #: Number of optimizer steps.
    max_steps: int = 100
    #: Peak learning rate (AdamW).
    lr: float = 3e-3
    #: Warm-up length as a fraction of max_steps (linear warm-up, then cosine decay to min_lr_ratio * lr).
    warmup_ratio: float = 0.1
    #: Final learning rate as a fraction of the peak.
    min_lr_ratio: float = 0.0
    #: AdamW weight decay.
    weight_decay: float = 0.0
    #: AdamW beta1.
    adam_beta1: float = 0.9
    #: AdamW beta2.
    adam_beta2: float = 0.999
    #: AdamW epsilon.
    adam_eps: float = 1e-8
    #: Gradient clipping by global norm (0 disables).
    grad_clip: float = 1.0
    #: Seed of model init, data order and every noise generator (noise is seeded per (seed, step, rank)).
    seed: int = 42
    #: Steps between log lines / metrics records (the only host synchronisation of the loop).
    log_every: int = 10
    #: Steps between held-out evaluations (0 = only at the end).
    eval_every: int = 50
    #: Seed of the evaluation noise, fixed so numbers are comparable across steps.
    eval_seed: int = 1234
    #: Steps between checkpoints (0 = only at the end).
    save_every: int = 0
    #: Number of most recent checkpoints kept.
    keep_last: int = 2
    #: "auto" continues from the last complete checkpoint of output_dir; "never" requires a fresh output_dir.
    resume: str = "never"
    #: Move an existing output_dir aside (renamed with a timestamp, never deleted) and start fresh.
    overwrite: bool = False
    #: Signals that ask for a checkpoint at the next step boundary and an exit with code 75 for a requeue (comma-separated; empty disables).
    preempt_signals: str = "USR1,TERM"
    #: Write TensorBoard scalars.
    tensorboard: bool = True
    #: Show a progress bar on rank 0.
    progress_bar: bool = True
    #: Global batch (samples per optimizer step, all ranks); 0 = micro_batch_size x gradient_accumulation_steps x world size. When set, the gradient accumulation is derived from it, so the global batch stays fixed when the node count changes.
    global_batch_size: int = 0
    #: Passes over the training split; when > 0, max_steps = ceil(epochs x train rows / global batch) (needs a prebuilt dataset).
    epochs: float = 0.0
    #: Timeout of every collective (the default group, DeepSpeed's groups and the gloo groups), in minutes; long enough for a teacher load between two collectives.
    dist_timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "gradient_accumulation_steps", "max_steps", "lr", "log_every", "keep_last"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("eval_every", "save_every", "grad_clip", "weight_decay", "adam_eps"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must lie in [0, 1]")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must lie in [0, 1)")
        _choice("train.resume", self.resume, RESUME_MODES)
        parse_signals("train.preempt_signals", self.preempt_signals)
        for name in ("global_batch_size", "epochs"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.dist_timeout_minutes", self.dist_timeout_minutes)
        if self.resume == "auto" and self.overwrite:
            raise ValueError(
                "train.resume=auto and train.overwrite=true contradict each other: "
                "resume continues the run in output_dir, overwrite moves it aside; pick one"
            )


@dataclass(kw_only=True)
class RunConfig:
    """One training run: every section of the configuration."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    diffusion: DiffusionArgs = field(default_factory=DiffusionArgs)
    teacher: TeacherArgs = field(default_factory=TeacherArgs)
    distill: DistillArgs = field(default_factory=DistillArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def __post_init__(self) -> None:
        if self.data.seq_len % self.diffusion.block_size:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is not a multiple of diffusion.block_size="
                f"{self.diffusion.block_size}; BD3LM blocks must tile the sequence: change one of them"
            )

        spec = self.distill.objective()
        if spec.terms and not self.teacher.path and self.data.dataset != "demo":
            raise ValueError(
                f"distill.preset={self.distill.preset!r} (mode {spec.mode!r}) distils from a teacher, but "
                "teacher.path is empty; set --teacher.path=<checkpoint dir> or use --distill.preset=none"
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


def _unknown(kind: str, name: str, valid: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
    return ValueError(f"unknown {kind} {name!r} in {where}; {hint}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def convert_value(option: str, value: Any, tp: Any, *, source: str) -> Any:
    """Convert ``value`` (a YAML scalar or a command-line string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return convert_value(option, value, args[0], source=source)
    article = "an" if _type_name(tp)[0] in "aeiou" else "a"
    bad = ValueError(f"{option}={value!r} ({source}) is not {article} {_type_name(tp)}; expected {article} {_type_name(tp)} value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{option}={value!r} ({source}) is not a bool; expected true or false")
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


def config_from_dict(data: dict[str, Any], *, source: str = "recipe") -> RunConfig:
    """Build and validate a :class:`RunConfig` from ``{section: {field: value}}``."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a mapping of sections to mappings, got {type(data).__name__}")
    sections = _sections()
    built: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            raise _unknown("section", name, list(sections), source)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"section {name!r} in {source} must be a mapping of fields, got {values!r}")
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
        raise ValueError(
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
        raise ValueError(
            f"--recipe={str(given)!r} does not exist (looked in {Path.cwd()} and {REPO_ROOT}); recipes live in "
            "launch/recipes/"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
    return data or {}


def build_config(*, recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the recipe, then the overrides; validated as a whole."""
    merged: dict[str, dict[str, Any]] = {}
    if recipe is not None:
        for section, values in load_recipe(recipe).items():
            merged[section] = dict(values or {}) if isinstance(values, dict) else values
        config_from_dict(merged, source=f"recipe {recipe}")
    sections = _sections()
    for arg in overrides:
        section, key, value = parse_override(arg)
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
    """A markdown table of every option with its default and docstring (for the README)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for section, cls in _sections().items():
        source = inspect.getsource(cls)
        docs = dict(re.findall(r"#: (.*)\n\s+(\w+):", source))
        docs = {name: doc for doc, name in docs.items()}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append(f"| `{section}.{f.name}` | `{default!r}` | {docs.get(f.name, '')} |")
    return "\n".join(rows)
