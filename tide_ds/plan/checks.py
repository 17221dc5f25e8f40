"""The one pass of start checks (issue 16 item 7): everything a run checks before it reads a weight.

:func:`validate_run` runs them in this order, each check once: the batch arithmetic of the config (the recipe
itself, a top level that is not a mapping included, is checked by ``tide_ds.config.build_config``), the
engine JSON and its keys (``tide_ds.trainer.engine.load_ds_json`` with ``tide_ds.validate.check_ds_config``),
the output directory (``tide_ds.trainer.checkpoint.run_dir_error``), the dataset's schema and split sizes,
the teacher and student files (config.json, every safetensors header named on error, key layouts and shapes),
the tokenizer, mask ids and vocabularies, then the dataset's ids and teacher lengths against them. Only then
do DeepSpeed, the demo world and the weights start.

Reads only config.json files, safetensors headers, tokenizer files and the dataset's schema and first
rows; creates nothing. ``launch/run.py`` (through :func:`tide_ds.plan.prepare_run`), the planner
(``python -m tide_ds.plan``) and ``launch/slurm/submit.py`` all call :func:`validate_run`. Each failure is a
:class:`~tide_ds.errors.ConfigError` naming the option, the value seen and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tide_ds.config import RunConfig
from tide_ds.errors import ConfigError
from tide_ds.teacher.loading import Footprint, check_teacher_ids, meta_model, model_footprint, teacher_footprint

logger = logging.getLogger(__name__)

#: Rows of each split read to check ids and lengths.
ROWS_CHECKED = 8


@dataclass
class TeacherFacts:
    family: str
    bidirectional: bool
    footprint: Footprint
    mask_token_id: int
    vocab_size: int
    dtype: torch.dtype


@dataclass
class DataFacts:
    train_rows: int
    eval_rows: int
    seq_len: int
    teacher_seq_len: int  # 0 = the dataset has no teacher columns


@dataclass
class RunFacts:
    """What the checks learnt: sizes and ids the planner works with."""

    student: Footprint
    teacher: TeacherFacts | None
    data: DataFacts | None
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    max_steps: int
    notes: list[str] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # the engine JSON as checked (empty when world_built)


def resolve_batch(cfg: RunConfig, *, world_size: int) -> tuple[int, int]:
    """``(gradient_accumulation_steps, global batch)``; ``train.global_batch_size`` derives the accumulation."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if not t.global_batch_size:
        return t.gradient_accumulation_steps, per_step * t.gradient_accumulation_steps
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size * world size = "
            f"{t.micro_batch_size} * {world_size} = {per_step}; change train.global_batch_size or "
            "train.micro_batch_size"
        )
    gas = t.global_batch_size // per_step
    if t.gradient_accumulation_steps not in (1, gas):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} gives gradient accumulation {gas} on {world_size} rank(s), "
            f"but train.gradient_accumulation_steps={t.gradient_accumulation_steps}; set only one of them"
        )
    return gas, t.global_batch_size


def resolve_steps(cfg: RunConfig, *, global_batch: int, train_rows: int | None) -> int:
    """``train.max_steps``, or ``ceil(train.epochs * rows / global batch)`` when ``train.epochs`` is set and the
    dataset exists (``train_rows``)."""
    epochs = cfg.train.epochs
    if not epochs:
        return cfg.train.max_steps
    if train_rows is None:  # a world's dataset: counted once it is built (launch/run.py checks it again then)
        return cfg.train.max_steps
    return max(1, math.ceil(epochs * train_rows / global_batch))


def check_teacher(cfg: RunConfig, *, on_gpu: bool = True) -> TeacherFacts:
    from tide_ds.models.teachers import get_family, resolve_family

    t = cfg.teacher  # the directory, config.json and headers: check_checkpoint_dirs
    fam = get_family(resolve_family(t.path, t.family or None))
    plan = fam.plan(t.path)  # config.json against the headers: key layout and every shape
    spec = cfg.distill.objective
    pipeline_b = spec.pipeline is not None and spec.pipeline.value == "B"
    mask = check_teacher_ids(plan, mask_token_id=None if t.mask_token_id < 0 else t.mask_token_id,
                             vocab_limit=cfg.distill.shared_vocab_size if pipeline_b else None)
    if t.dtype == "auto":
        dtype = torch.bfloat16 if on_gpu else torch.float32
    else:
        dtype = getattr(torch, t.dtype)
    return TeacherFacts(family=fam.name, bidirectional=fam.bidirectional, footprint=teacher_footprint(plan, dtype=dtype),
                        mask_token_id=mask, vocab_size=plan.config.vocab_size, dtype=dtype)


def student_footprint(cfg: RunConfig, *, vocab_rows: int) -> Footprint:
    """The student's sizes: its checkpoint (config.json checked against the headers) or the fresh-model fields."""
    import transformers

    from tide_ds.models import qwen3
    from tide_ds.models.hf_weights import meta_checkpoint

    m = cfg.model
    if m.path:
        p = Path(m.path)  # the directory, config.json and headers: check_checkpoint_dirs
        config = qwen3._read_config(p)
        model = meta_model(transformers.Qwen3ForCausalLM, config, dtype=torch.bfloat16)
        state = {k: v for k, v in meta_checkpoint(p).items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # an alias some savers keep; its values are checked at load
        expected = {k: v.shape for k, v in model.state_dict().items()
                    if not (config.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(s)}" for k, s in expected.items()
                 if k in state and state[k].shape != s]
        if missing or unexpected or wrong:
            raise ConfigError(
                f"model.path={m.path!r}: the weights do not match its config.json: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
            )
        return model_footprint(model, checkpoint_dir=p)
    config = transformers.Qwen3Config(
        vocab_size=vocab_rows, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim, max_position_embeddings=max(4096, cfg.data.seq_len), tie_word_embeddings=True,
    )
    return model_footprint(meta_model(transformers.Qwen3ForCausalLM, config, dtype=torch.bfloat16))


def check_tokenizer(cfg: RunConfig, notes: list[str]):
    """The student tokenizer's special ids (``None`` when the built-in Qwen3 one is not built yet)."""
    from tide_ds.data.tokenizers import default_tokenizer_cache, load_tokenizer, resolve_special_ids

    if cfg.model.tokenizer == "qwen3":
        path = default_tokenizer_cache() / "qwen3"
        if not (path / "tokenizer.json").is_file():
            notes.append("model.tokenizer=qwen3 is built into the cache by the first run; ids not checked")
            return None
    else:
        path = Path(cfg.model.tokenizer)
        if not path.is_dir():
            raise ConfigError(
                f"model.tokenizer={cfg.model.tokenizer!r} is neither 'qwen3' nor an existing tokenizer directory"
            )
    return resolve_special_ids(load_tokenizer(path))


def check_output_dir(cfg: RunConfig) -> None:
    """``train.output_dir`` can be used as asked (``tide_ds.trainer.checkpoint.run_dir_error``; touches nothing).
    Rank 0 alone judges: on a fast start it may already be creating the directory another rank would look at."""
    from tide_ds.trainer import checkpoint

    if int(os.environ.get("RANK", "0")) == 0:
        error = checkpoint.run_dir_error(cfg)
        if error:
            raise ConfigError(error)


def _dataset_columns(cfg: RunConfig) -> list[str]:
    spec = cfg.distill.objective
    needed = ["input_ids", "labels"]
    if spec.uses_chunks or spec.aligned:  # other modes feed the teacher the student's own tokens
        from tide_ds.trainer.objectives import ALIGN_COLUMNS, CHUNK_COLUMNS

        needed += list(CHUNK_COLUMNS if spec.uses_chunks else ALIGN_COLUMNS)
    return needed


def check_dataset(cfg: RunConfig):
    """A saved dataset's schema and split sizes: it loads as a DatasetDict, both splits exist and hold rows, the
    columns the distill mode needs, the sequence lengths; ``(splits, teacher length)`` (0: no teacher columns).
    Ids against the vocabularies and the teacher length against the teacher: :func:`check_dataset_ids`."""
    import datasets
    import numpy as np

    path = Path(cfg.data.dataset)
    if not path.exists():
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} is not an existing dataset directory; give one saved with datasets' "
            "save_to_disk, or leave it empty and launch through launch/run.py, which builds the world of world.name"
        )
    if (path / "dataset_dict.json").is_file():  # an empty split has no data file; datasets fails on it obscurely
        try:
            names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            names = []  # reported by load_from_disk below
        for name in names:
            state = path / name / "state.json"
            try:
                empty = state.is_file() and not json.loads(state.read_text()).get("_data_files")
            except (OSError, ValueError, AttributeError):
                empty = False
            if empty:
                raise ConfigError(f"split {name!r} of data.dataset={str(path)!r} is empty (no rows); preprocess with "
                                  "more rows or another --heldout-fraction")
    try:
        splits = datasets.load_from_disk(str(path))  # memory-mapped Arrow: schema and rows on demand
    except Exception as err:  # noqa: BLE001 -- any reason it does not load is the user's to fix
        raise ConfigError(f"data.dataset={str(path)!r} could not be loaded with datasets.load_from_disk: {err}") from None
    if not isinstance(splits, datasets.DatasetDict):
        raise ConfigError(f"data.dataset={str(path)!r} is a single split; tide-ds needs a DatasetDict with "
                          f"{cfg.data.train_split!r} and {cfg.data.eval_split!r} (python -m tide_ds.data.preprocess "
                          "writes one)")
    options = (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split))
    for option, name in options:
        if name not in splits:
            raise ConfigError(f"{option}={name!r} is not a split of {path}; splits: {list(splits)}")
    for option, name in options:
        if len(splits[name]) == 0:
            raise ConfigError(f"{option}={name!r}: the split of {path} is empty; preprocess with more rows or another "
                              "--heldout-fraction")
    needed = _dataset_columns(cfg)
    lengths = {}
    for option, name in options:
        ds = splits[name]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise ConfigError(
                f"{option}={name!r} of data.dataset={str(path)!r} lacks the column(s) {missing} that distill mode "
                f"{cfg.distill.objective.mode!r} needs (columns: {ds.column_names}); rebuild it with "
                "python -m tide_ds.data.preprocess"
            )
        head = ds.select(range(min(ROWS_CHECKED, len(ds))))
        ids = np.asarray(head["input_ids"])
        if ids.shape[1] != cfg.data.seq_len:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} but split {name!r} of data.dataset holds sequences of length "
                f"{ids.shape[1]}; set --data.seq_len={ids.shape[1]} or rebuild the dataset"
            )
        lengths[name] = np.asarray(head["teacher_input_ids"]).shape[1] if "teacher_input_ids" in needed else 0
    l_t = lengths[cfg.data.train_split]
    if lengths[cfg.data.eval_split] != l_t:
        raise ConfigError(f"the teacher length of {path} differs between splits: {lengths}; rebuild the dataset")
    if l_t and cfg.data.teacher_seq_len and l_t != cfg.data.teacher_seq_len:
        raise ConfigError(
            f"data.teacher_seq_len={cfg.data.teacher_seq_len} but data.dataset={str(path)!r} holds teacher sequences "
            f"of length {l_t}; set --data.teacher_seq_len={l_t} or rebuild the dataset with --teacher-seq-len "
            f"{cfg.data.teacher_seq_len}"
        )
    return splits, l_t


def check_checkpoint_dirs(cfg: RunConfig) -> None:
    """Student and teacher checkpoint directories: a directory, config.json, and every safetensors header
    readable (each file named on error). Key layouts and shapes: :func:`check_teacher`, :func:`student_footprint`."""
    from tide_ds.models.hf_weights import check_checkpoint_files

    for option, value in (("model.path", cfg.model.path), ("teacher.path", cfg.teacher.path)):
        if not value:
            continue
        path = Path(value)
        if not path.is_dir():
            raise ConfigError(f"{option}={value!r} is not a directory; give a local Hugging Face checkpoint directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option}={value!r} has no config.json (a Hugging Face checkpoint directory is expected)")
        try:
            check_checkpoint_files(path)
        except (ValueError, FileNotFoundError, KeyError) as err:  # ConfigError is a ValueError
            raise ConfigError(f"{option}={value!r}: {err}") from None


def check_dataset_ids(cfg: RunConfig, splits, *, teacher_len: int, student_rows: int,
                      teacher: TeacherFacts | None) -> DataFacts:
    """The dataset's token ids against the student's rows and the teacher's vocabulary, its teacher length
    against the teacher's blocks and positions (the schema was checked by :func:`check_dataset`)."""
    import numpy as np

    path = Path(cfg.data.dataset)
    for name in (cfg.data.train_split, cfg.data.eval_split):
        head = splits[name].select(range(min(ROWS_CHECKED, len(splits[name]))))
        ids = np.asarray(head["input_ids"])
        if ids.max() >= student_rows:
            raise ConfigError(
                f"split {name!r} of {path} holds student token id {int(ids.max())}, but the student has {student_rows} "
                "embedding rows; the dataset was tokenized with another tokenizer than model.tokenizer"
            )
        if teacher_len and teacher is not None:
            t_ids = np.asarray(head["teacher_input_ids"])
            if t_ids.max() >= teacher.vocab_size:
                raise ConfigError(
                    f"split {name!r} of {path} holds teacher token id {int(t_ids.max())}, but the teacher has "
                    f"{teacher.vocab_size} vocabulary rows; the dataset was built for another teacher tokenizer"
                )
    if teacher_len and teacher is not None:
        if not teacher.bidirectional and teacher_len % cfg.diffusion.block_size:
            raise ConfigError(
                f"the dataset's teacher length {teacher_len} is not a multiple of diffusion.block_size="
                f"{cfg.diffusion.block_size}; the {teacher.family} teacher runs BD3LM blocks: rebuild the dataset"
            )
        max_pos = teacher.footprint.max_positions
        if max_pos and teacher_len > max_pos:
            raise ConfigError(
                f"the dataset's teacher length {teacher_len} exceeds the teacher's max_position_embeddings={max_pos}"
            )
    return DataFacts(train_rows=len(splits[cfg.data.train_split]), eval_rows=len(splits[cfg.data.eval_split]),
                     seq_len=cfg.data.seq_len, teacher_seq_len=teacher_len)


def validate_run(cfg: RunConfig, *, world_size: int, on_gpu: bool = True, world_built: bool = False) -> RunFacts:
    """The one pass of start checks, in the order of the module's docstring; the facts the planner sizes with.

    With an empty ``data.dataset`` (a world, :mod:`tide_ds.worlds`) what the world builds is not there yet: the
    dataset (and the instruct world's teacher) are checked when ``launch/run.py`` calls this again after it,
    with ``world_built=True`` (the engine JSON and the output directory, which no world changes, are not
    checked again).
    """
    from tide_ds.builders import QWEN3_EMBEDDING_ROWS, student_vocab_rows
    from tide_ds.trainer.engine import load_ds_json

    notes: list[str] = []
    gas, global_batch = resolve_batch(cfg, world_size=world_size)  # the config's batch arithmetic
    engine = {}
    if not world_built:
        engine = load_ds_json(cfg.train.ds_config)  # the engine JSON: valid JSON, known keys
        check_output_dir(cfg)
    splits, teacher_len = check_dataset(cfg) if cfg.data.dataset else (None, 0)
    check_checkpoint_dirs(cfg)
    special = check_tokenizer(cfg, notes)
    rows = student_vocab_rows(cfg, special) if special is not None else QWEN3_EMBEDDING_ROWS
    student = student_footprint(cfg, vocab_rows=rows)
    if special is not None and special.vocab_size > student.vocab:
        raise ConfigError(
            f"the tokenizer (model.tokenizer={cfg.model.tokenizer!r}) has {special.vocab_size} entries but the student "
            f"has only {student.vocab} embedding rows; use the tokenizer the student was trained with"
        )
    if student.max_positions and 2 * cfg.data.seq_len > student.max_positions and cfg.model.path:
        notes.append(f"the student sees 2L = {2 * cfg.data.seq_len} tokens; positions restart at the x_0 copy")
    spec = cfg.distill.objective
    teacher = None
    if spec.terms and cfg.teacher.path:  # empty: the instruct world pretrains one (RunConfig refuses it otherwise)
        teacher = check_teacher(cfg, on_gpu=on_gpu)
        if spec.pipeline is not None and spec.pipeline.value == "B" and cfg.distill.shared_vocab_size > student.vocab:
            raise ConfigError(
                f"distill.shared_vocab_size={cfg.distill.shared_vocab_size} exceeds the student's vocabulary "
                f"({student.vocab} rows); pipeline B needs student and teacher on the same tokenizer"
            )
    data = None
    if splits is not None:
        data = check_dataset_ids(cfg, splits, teacher_len=teacher_len, student_rows=student.vocab, teacher=teacher)
    else:
        built = "dataset and teacher" if cfg.world.name == "instruct" and not cfg.teacher.path else "dataset"
        notes.append(f"data.dataset is empty: the {cfg.world.name} world's {built} is built by the first run "
                     "(and checked then)")
        if cfg.train.epochs:
            notes.append(f"train.epochs={cfg.train.epochs:g}: the step count is derived once the world's dataset "
                         "is built")
    steps = resolve_steps(cfg, global_batch=global_batch, train_rows=data.train_rows if data else None)
    return RunFacts(student=student, teacher=teacher, data=data, micro_batch_size=cfg.train.micro_batch_size,
                    gradient_accumulation_steps=gas, global_batch_size=global_batch, max_steps=steps, notes=notes,
                    engine=engine)


def resolve_training_size(cfg: RunConfig, *, world_size: int) -> RunConfig:
    """``cfg`` with ``train.global_batch_size`` and ``train.epochs`` turned into the gradient accumulation and step
    count the trainer reads (``tide_ds.trainer.loop.build_run`` calls it, so a run built without ``launch/run.py``
    gets them too). Arithmetic plus the train split's row count; idempotent. A dataset that cannot be read is left
    to the data checks, which name the problem."""
    if not cfg.train.global_batch_size and not cfg.train.epochs:
        return cfg
    gas, global_batch = resolve_batch(cfg, world_size=world_size)
    rows = None
    if cfg.train.epochs and cfg.data.dataset and Path(cfg.data.dataset).is_dir():
        import datasets

        try:
            splits = datasets.load_from_disk(cfg.data.dataset)  # memory-mapped: the row count only
            rows = len(splits[cfg.data.train_split])
        except Exception:  # noqa: BLE001 - reported by the data checks with the path and the fix
            rows = None
    steps = resolve_steps(cfg, global_batch=global_batch, train_rows=rows)
    train = dataclasses.replace(cfg.train, gradient_accumulation_steps=gas, max_steps=steps)
    return dataclasses.replace(cfg, train=train)


def resolved_config(cfg: RunConfig, facts: RunFacts) -> RunConfig:
    """``cfg`` with the derived gradient accumulation and step count written in (what the trainer reads)."""
    train = dataclasses.replace(cfg.train, gradient_accumulation_steps=facts.gradient_accumulation_steps,
                                max_steps=facts.max_steps)
    return dataclasses.replace(cfg, train=train)
