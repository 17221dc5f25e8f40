"""A trained student for inference, from a run directory, one of its checkpoints, or an exported HF directory.

Three forms of ``--checkpoint``:

* a run directory (``<run>/checkpoints/latest``): its newest complete checkpoint;
* a checkpoint directory (``<run>/checkpoints/step_N``: DeepSpeed files, ``config.yaml``,
  ``trainer_state.json``): the ZeRO-2 or ZeRO-3 partitions are consolidated in memory with DeepSpeed's
  ``zero_to_fp32`` (the fp32 master weights), the student is rebuilt from the stored run config exactly
  as the trainer builds it, and the weights are loaded with a strict key check;
* a Hugging Face directory written by ``python -m tide_ds.export`` (or any Qwen3 / A2D-Qwen3 student
  directory with a tokenizer that has a mask token).

The model comes back non-causal, in eval mode, with ``attn_implementation`` ``sdpa`` (the sampler's
masks are dense ``[B, 1, Q, K]`` tensors; the weights are the same under every backend).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tide_ds.config import RunConfig, config_from_dict
from tide_ds.data.tokenizers import SpecialIds, load_tokenizer, resolve_special_ids

__all__ = [
    "DTYPES",
    "EXPORT_RECORD",
    "EXPORT_RUN_CONFIG",
    "InferenceModel",
    "consolidate_zero_checkpoint",
    "load_checkpoint_model",
    "load_inference_model",
    "parse_dtype",
    "resolve_checkpoint",
    "run_config_of",
]

logger = logging.getLogger(__name__)

#: Written by the exporter beside config.json: where the weights came from and the BD3LM block size.
EXPORT_RECORD = "tide_ds_export.json"
#: The run config stored beside an export (the same YAML as in every checkpoint).
EXPORT_RUN_CONFIG = "tide_ds_run_config.yaml"
_STUDENT_PREFIX = "student.hf."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class InferenceModel:
    """A student ready to sample from.

    Attributes:
        model: non-causal ``Qwen3ForCausalLM`` (eval, no grad).
        tokenizer: its tokenizer (with the mask token).
        special: mask / eos / pad ids and the tokenizer length.
        block_size: the BD3LM block size it was trained with (None if unknown, e.g. a foreign HF directory).
        run_config: the training run's config, when known.
        source: what was loaded (checkpoint or directory path).
        step: the training step of the weights, when known.
    """

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerFast
    special: SpecialIds
    block_size: int | None
    run_config: RunConfig | None
    source: Path
    step: int | None


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype={name!r} is not one of {list(DTYPES)}")
    return DTYPES[name]


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """``("hf", dir)`` or ``("deepspeed", checkpoint dir)`` for any of the three accepted forms."""
    from tide_ds.trainer.checkpoint import CKPT_SUBDIR, latest_verified_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {str(p)!r} does not exist")
    if (p / "config.json").is_file():
        return "hf", p
    if (p / "trainer_state.json").is_file() and (p / "config.yaml").is_file():
        return "deepspeed", p
    if (p / CKPT_SUBDIR).is_dir():
        ckpt, skipped = latest_verified_checkpoint(p)  # the newest whose files match its manifest
        if ckpt is None and skipped:
            raise ValueError(f"run directory {p}: no checkpoint passes its manifest check: " + "; ".join(
                f"{name}: {', '.join(issues)}" for name, issues in skipped.items()))
        if ckpt is None:
            raise ValueError(f"run directory {p} has no complete checkpoint yet (nothing in {p / CKPT_SUBDIR})")
        return "deepspeed", ckpt
    raise ValueError(
        f"--checkpoint {str(p)!r} is neither a run directory (with checkpoints/), a checkpoint directory "
        "(with trainer_state.json and config.yaml) nor a Hugging Face directory (with config.json)"
    )


def run_config_of(ckpt_dir: Path) -> RunConfig:
    """The parts of a checkpoint's run config that define the student and its data (or beside an export).

    Only ``model``, ``data``, ``world``, ``diffusion`` and ``train`` are read: the objective and the teacher do not
    change the student's architecture, so a checkpoint stays loadable when those options evolve. Fields
    the current code no longer knows are dropped with a warning.
    """
    import yaml

    from tide_ds.config import _field_types, _sections, _with_current_names

    for name in ("config.yaml", EXPORT_RUN_CONFIG):
        path = ckpt_dir / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{ckpt_dir} holds no run config (config.yaml)")
    raw = _with_current_names(yaml.safe_load(path.read_text()) or {}, str(path))  # options renamed since
    sections = _sections()
    kept: dict[str, dict] = {"distill": {"preset": "none"}}
    for section in ("model", "data", "world", "diffusion", "train"):
        known = _field_types(sections[section])
        values = raw.get(section) or {}
        dropped = sorted(set(values) - set(known))
        if dropped:
            logger.warning("%s: ignoring %s option(s) this version does not know: %s", path, section, dropped)
        kept[section] = {k: v for k, v in values.items() if k in known}
    return config_from_dict(kept, source=str(path))


def engine_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the engine computed in (bf16 / fp16 / fp32), from the DeepSpeed config stored in the checkpoint."""
    files = sorted(ckpt_dir.glob("*model_states.pt"))
    if not files:
        raise ValueError(f"{ckpt_dir} holds no DeepSpeed *model_states.pt file; is it a DeepSpeed checkpoint?")
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    ds = state.get("ds_config") or {}
    if (ds.get("bf16") or {}).get("enabled") is True:
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def consolidate_zero_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a ZeRO-2/3 checkpoint, under Hugging Face Qwen3 key names.

    DeepSpeed's ``zero_to_fp32`` merges the ranks' partitions of the fp32 master weights (lazily, one
    tensor at a time); the trainer's module wraps the student as ``student.hf.<key>``. A tied
    ``lm_head.weight`` comes back as the embedding tensor itself.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints progress to stdout, which a CLI may be using for output
    with contextlib.redirect_stdout(chatter):
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, lazy_mode=True)
    logger.info("zero_to_fp32: %s", " | ".join(line for line in chatter.getvalue().splitlines() if line.strip()))
    foreign = sorted(k for k in lazy if not k.startswith(_STUDENT_PREFIX))
    if foreign:
        raise ValueError(
            f"{ckpt_dir}: the checkpoint holds parameters outside the student ({foreign[:4]}); "
            "only checkpoints written by the tide-ds trainer can be consolidated"
        )
    state: dict[str, torch.Tensor] = {}
    materialised: dict[int, torch.Tensor] = {}
    for key, value in lazy.items():
        # Tied parameters share one lazy object: materialise it once so that they stay one tensor.
        if id(value) not in materialised:
            materialised[id(value)] = value.contiguous()
        state[key[len(_STUDENT_PREFIX):]] = materialised[id(value)]
    return state


def load_checkpoint_model(ckpt_dir: Path, *, dtype: torch.dtype | None) -> tuple[InferenceModel, torch.dtype]:
    """A DeepSpeed checkpoint's student (in ``dtype``, default the engine's) and the dtype the engine computed in."""
    from tide_ds.builders import build_student, build_tokenizer

    cfg = run_config_of(ckpt_dir)
    cfg_inf = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation="sdpa"))
    tokenizer_dir, special = build_tokenizer(cfg_inf)
    student = build_student(cfg_inf, special=special)
    model = student.hf
    state = consolidate_zero_checkpoint(ckpt_dir)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{ckpt_dir}: the consolidated weights do not match the student its config.yaml describes: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(state, strict=True)
    trained_in = engine_dtype(ckpt_dir)
    model = model.to(dtype or trained_in).eval().requires_grad_(False)
    step = json.loads((ckpt_dir / "trainer_state.json").read_text())["step"]
    loaded = InferenceModel(
        model=model, tokenizer=load_tokenizer(tokenizer_dir), special=special, block_size=cfg.diffusion.block_size,
        run_config=cfg, source=ckpt_dir, step=step,
    )
    return loaded, trained_in


def _hf_model(path: Path, *, dtype: torch.dtype | None) -> InferenceModel:
    from tide_ds.models.qwen3 import load_student

    raw = json.loads((path / "config.json").read_text())
    if dtype is None:
        dtype = DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype")), torch.float32)
    model = load_student(path, attn_implementation="sdpa", dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer(path)
    special = resolve_special_ids(tokenizer)
    if getattr(model.config, "mask_token_id", None) not in (None, special.mask_id):
        raise ValueError(
            f"{path}: config.json says mask_token_id={model.config.mask_token_id} but the tokenizer's mask token "
            f"has id {special.mask_id}; the directory mixes files of different models"
        )
    record = json.loads((path / EXPORT_RECORD).read_text()) if (path / EXPORT_RECORD).is_file() else {}
    run_config = run_config_of(path) if (path / EXPORT_RUN_CONFIG).is_file() else None
    return InferenceModel(
        model=model, tokenizer=tokenizer, special=special, block_size=record.get("block_size"),
        run_config=run_config, source=path, step=record.get("step"),
    )


def load_inference_model(
    path: str | Path, *, dtype: str | torch.dtype | None = None, device: torch.device | str = "cpu"
) -> InferenceModel:
    """Load a student from a run directory, a checkpoint directory or a Hugging Face directory.

    Args:
        dtype: ``float32``, ``bfloat16``, ``float16`` or None: the dtype the run trained in (checkpoints)
            or the one config.json records (HF directories).
        device: where the model goes.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    kind, where = resolve_checkpoint(path)
    if kind == "hf":
        loaded = _hf_model(where, dtype=dtype)
    else:
        loaded, _ = load_checkpoint_model(where, dtype=dtype)
    loaded.model.to(device)
    logger.info("loaded %s (%s, step %s, %s)", loaded.source, kind, loaded.step, loaded.model.dtype)
    return loaded
