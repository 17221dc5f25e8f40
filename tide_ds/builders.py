"""Build a run's parts from the config: tokenizer, data, student, teacher. All checks run before training.

Shared by the trainer, the worlds (:mod:`tide_ds.worlds`), sampling and evaluation. The data is always a
dataset directory (``data.dataset``); a world that builds one runs before (:func:`tide_ds.worlds.prepare_world`).
Anything built once and cached (the offline Qwen3 tokenizer, a world) is built by rank 0 while the others
wait at a barrier, then read by every rank (:func:`rank0_first`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tide_ds import dist
from tide_ds.config import RunConfig
from tide_ds.data.loader import TrainBatches, eval_batches
from tide_ds.data.tokenizers import SpecialIds, ensure_qwen3_tokenizer, load_tokenizer, resolve_special_ids
from tide_ds.errors import ConfigError

if TYPE_CHECKING:
    from tide_ds.teacher.engine import TeacherEngine

logger = logging.getLogger(__name__)

#: Embedding rows of the real Qwen3 models (the tokenizer has 151,670 entries; rows are padded).
QWEN3_EMBEDDING_ROWS = 151936


def rank0_first(fn: Callable[[], object]) -> object:
    """Run ``fn`` on rank 0, then on the others (which then find rank 0's cached result).

    The others wait in a gloo group with a long timeout (``dist.patient_group``): building a world
    takes longer than the default group's 10 minutes on a small machine.
    """
    result, error = None, None
    group = dist.patient_group()  # a collective: created before rank 0 starts the long work
    if dist.rank() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after every rank knows
            error = (isinstance(err, ConfigError), f"{type(err).__name__}: {err}")
            first = err
    error = dist.broadcast_object(error, group=group)
    if error is not None:
        if dist.rank() == 0:
            raise first
        user_error, text = error
        # A user error is reported on every rank as one line; a bug keeps its traceback on rank 0.
        raise (ConfigError if user_error else RuntimeError)(f"rank 0 failed while building shared inputs: {text}")
    if dist.rank() != 0:
        result = fn()
    return result


def build_tokenizer(cfg: RunConfig) -> tuple[Path, SpecialIds]:
    if cfg.model.tokenizer == "qwen3":
        path = Path(rank0_first(ensure_qwen3_tokenizer))  # type: ignore[arg-type]
    else:
        path = Path(cfg.model.tokenizer)
        if not path.is_dir():
            raise ConfigError(
                f"model.tokenizer={cfg.model.tokenizer!r} is neither 'qwen3' nor an existing tokenizer directory"
            )
    special = resolve_special_ids(load_tokenizer(path))
    logger.info("tokenizer %s: %d entries, mask=%d eos=%d pad=%d", path, special.vocab_size, special.mask_id, special.eos_id, special.pad_id)
    return path, special


@dataclass
class RunData:
    train: TrainBatches
    eval_batches: Callable[[], Iterator[dict[str, torch.Tensor]]]
    num_train: int
    num_eval: int


def _check_split(ds: Any, *, name: str, option: str, cfg: RunConfig) -> None:
    for column in ("input_ids", "labels"):
        if column not in ds.column_names:
            raise ConfigError(f"{option}: split {name!r} has no column {column!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ConfigError(f"{option}: split {name!r} is empty")
    length = len(ds[0]["input_ids"])
    if length != cfg.data.seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} but split {name!r} of data.dataset holds sequences of length "
            f"{length}; set --data.seq_len={length} or rebuild the dataset with seq_len {cfg.data.seq_len}"
        )


def build_data(cfg: RunConfig, *, rank: int, world_size: int) -> RunData:
    """The train batches of this rank and the held-out batches of ``data.dataset``, checked against the config."""
    import datasets

    path = Path(cfg.data.dataset)
    if not cfg.data.dataset or not path.exists():
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} is not an existing dataset directory; give one saved with datasets' "
            "save_to_disk, or leave it empty and launch through launch/run.py, which builds the world of world.name"
        )
    try:
        splits = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ConfigError(f"data.dataset={str(path)!r} could not be loaded with datasets.load_from_disk: {err}") from None
    for option, name in (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split)):
        if name not in splits:
            raise ConfigError(f"{option}={name!r} is not a split of {path}; splits: {list(splits)}")
        _check_split(splits[name], name=name, option=option, cfg=cfg)
    columns = ["input_ids", "labels"]
    spec = cfg.distill.objective
    if spec.uses_chunks or spec.aligned:
        from tide_ds.trainer.objectives import ALIGN_COLUMNS, CHUNK_COLUMNS

        needed, kind = (CHUNK_COLUMNS, "A") if spec.uses_chunks else (ALIGN_COLUMNS, "B")
        what = "teacher tokens and alignment chunks" if kind == "A" else "teacher tokens and aligned position pairs"
        for name in (cfg.data.train_split, cfg.data.eval_split):
            missing = [c for c in needed if c not in splits[name].column_names]
            if missing:
                raise ConfigError(
                    f"distill mode {spec.mode!r} needs a pipeline-{kind} dataset ({what}), but split {name!r} of "
                    f"data.dataset={str(path)!r} lacks the columns {missing}; build one with "
                    f"`python -m tide_ds.data.preprocess --pipeline {kind} ...`"
                    + ("" if kind == "A" else ", or use a non-aligned mode (--distill.mode=kl, reverse_kl, taid)")
                )
        columns += list(needed)
    train_ds = splits[cfg.data.train_split].with_format("numpy", columns=columns)
    eval_ds = splits[cfg.data.eval_split].with_format("numpy", columns=columns)
    train = TrainBatches(
        train_ds, micro_batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world_size, seed=cfg.train.seed
    )
    max_eval = cfg.data.eval_samples or None
    logger.info("data %s: %d train / %d held-out samples of length %d", path, len(train_ds), len(eval_ds), cfg.data.seq_len)
    return RunData(
        train=train,
        eval_batches=lambda: eval_batches(
            eval_ds, micro_batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world_size, max_samples=max_eval
        ),
        num_train=len(train_ds),
        num_eval=len(eval_ds),
    )


def student_vocab_rows(cfg: RunConfig, special: SpecialIds) -> int:
    if cfg.model.tokenizer == "qwen3":
        return max(QWEN3_EMBEDDING_ROWS, special.vocab_size)
    return -(-special.vocab_size // 64) * 64


def build_student(cfg: RunConfig, *, special: SpecialIds) -> torch.nn.Module:
    """A fresh random student from the size fields, or a local checkpoint; checked against the tokenizer."""
    import transformers

    from tide_ds.models.qwen3 import BD3LMStudent, load_student
    from tide_ds.models.qwen3 import build_student as build_hf

    m = cfg.model
    if m.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "model.attn_implementation='flex_attention' cannot train on the CPU (PyTorch's FlexAttention has no "
            "CPU backward); use --model.attn_implementation=sdpa here, flex_attention on GPUs"
        )
    if m.path:
        if not Path(m.path).is_dir():
            raise ConfigError(f"model.path={m.path!r} is not a directory; give a local Hugging Face checkpoint directory")
        hf = load_student(m.path, attn_implementation=m.attn_implementation)
        rows = hf.config.vocab_size
        if special.vocab_size > rows:
            raise ConfigError(
                f"the tokenizer (model.tokenizer={m.tokenizer!r}) has {special.vocab_size} entries but the student at "
                f"model.path={m.path!r} has only {rows} embedding rows; use the tokenizer the student was trained with"
            )
        ckpt_mask = getattr(hf.config, "mask_token_id", None)
        if ckpt_mask is not None and ckpt_mask != special.mask_id:
            raise ConfigError(
                f"the student's config.json says mask_token_id={ckpt_mask} but the tokenizer's mask token has id "
                f"{special.mask_id}; use the matching tokenizer (model.tokenizer)"
            )
    else:
        config = transformers.Qwen3Config(
            vocab_size=student_vocab_rows(cfg, special),
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=max(4096, cfg.data.seq_len),
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=special.eos_id,
            pad_token_id=special.pad_id,
        )
        config.mask_token_id = special.mask_id
        config.is_causal = False
        hf = build_hf(config, attn_implementation=m.attn_implementation, seed=cfg.train.seed)
    return BD3LMStudent(hf, block_size=cfg.diffusion.block_size, attn_implementation=m.attn_implementation)


def build_teacher(cfg: RunConfig, *, device: torch.device) -> TeacherEngine:
    """The frozen teacher engine of ``teacher.*`` (placement decided and logged there)."""
    from tide_ds.losses.fused_head import resolve_loss_implementation
    from tide_ds.losses.objective import Pipeline
    from tide_ds.teacher.engine import TeacherEngine

    t = cfg.teacher
    if not Path(t.path).is_dir():
        raise ConfigError(f"teacher.path={t.path!r} is not a directory; give a local teacher checkpoint directory")
    if t.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, t.dtype)
    pipeline_b = cfg.distill.objective.pipeline is Pipeline.B
    return TeacherEngine.build(
        t.path,
        family=t.family or None,
        placement=t.placement,
        dtype=dtype,
        attn_implementation=t.attn_implementation,
        block_size=cfg.diffusion.block_size,
        concat_order=t.concat_order,
        vocab_limit=cfg.distill.shared_vocab_size if pipeline_b else None,
        mask_token_id=None if t.mask_token_id < 0 else t.mask_token_id,
        loss_implementation=resolve_loss_implementation(cfg.model.loss_implementation, device),
        device=device,
        load_concurrency=t.load_concurrency,
    )
