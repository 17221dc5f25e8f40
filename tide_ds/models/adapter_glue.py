"""Building blocks shared by the teacher adapters (``llada2_moe.py``, ``wedlm.py``, ``llada.py``, ``dream.py``).

Every teacher runs on a transformers-native class (docs/models.md §2.3), so no layer is re-implemented here;
what the four adapters share is the glue around those classes:

* attention masks: bidirectional key padding in which a padded query attends to itself only, so no row
  is ever fully masked and no NaN can appear (docs/models.md §2.4, docs/method.md §15 item 1);
* config.json checks that name the file, the field, the value seen and the value expected;
* strict loading of a converted state dict (missing / unexpected keys, shapes), tied heads;
* mask-token resolution from config.json or the tokenizer files (never a constant in code);
* the random tiny checkpoints of docs/models.md §10, written in each family's real key layout.

Legend: B batch, L sequence length, D hidden, V vocab.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.initialization import no_init_weights

from tide_ds.choices import TeacherAttnImplementation, choices
from tide_ds.models.hf_weights import load_safetensors_checkpoint, meta_checkpoint, save_safetensors_checkpoint
from tide_ds.models.tide_attention import TIDE_BD3LM, check_head_dim, key_lengths_mask, register_tide_attention

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "LoadPlan",
    "materialize",
    "shape_state",
    "TinyInit",
    "bidirectional_hidden",
    "check_attn_implementation",
    "check_input_ids",
    "check_model_type",
    "check_structure",
    "check_values",
    "drop_tied_head",
    "instantiate",
    "layer_count",
    "load_strict",
    "padding_keep_mask",
    "qwen_structure",
    "read_config_json",
    "resolve_mask_token_id",
    "to_additive",
    "write_tiny_checkpoint",
]

logger = logging.getLogger(__name__)

#: Backends the teacher adapters accept: sdpa and eager take the explicit 4-D masks built here; tide_bd3lm
#: (tide_attention.py) runs our Triton kernels: key lengths for the bidirectional teachers, the BD3LM mask
#: for WeDLM.
ATTN_IMPLEMENTATIONS = choices(TeacherAttnImplementation)
assert TIDE_BD3LM in ATTN_IMPLEMENTATIONS
_LAYER_KEY = re.compile(r"^(?:model\.layers|model\.transformer\.blocks)\.(\d+)\.")


def check_attn_implementation(attn_implementation: str) -> None:
    """Raise ``ValueError`` unless ``attn_implementation`` is one of :data:`ATTN_IMPLEMENTATIONS`."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"teacher.attn_implementation={attn_implementation!r} is not supported for teachers; "
            f"use one of {list(ATTN_IMPLEMENTATIONS)}"
        )


# ---------------------------------------------------------------------------------------------- masks


def padding_keep_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Bidirectional key-padding keep-mask ``[B, 1, L, L]`` (bool, True = may attend).

    A valid query attends to every valid key; a padded query attends to itself only, so every row has
    one allowed key and stays finite under every backend (padding outputs are meaningless, not NaN).

    Args:
        attention_mask_BL: ``[B, L]`` 0/1 (any integer or bool dtype), 1 = real token.
    """
    if attention_mask_BL.dim() != 2:
        raise ValueError(
            f"attention_mask must be a [B, L] 0/1 padding mask; got shape {tuple(attention_mask_BL.shape)}"
        )
    valid_BL = attention_mask_BL.bool()
    seq_len = valid_BL.shape[1]
    eye_LL = torch.eye(seq_len, dtype=torch.bool, device=valid_BL.device)
    keep_BLL = (valid_BL[:, :, None] & valid_BL[:, None, :]) | eye_LL
    return keep_BLL[:, None]


def to_additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool keep-mask -> additive float mask (0 allowed, ``finfo(dtype).min`` blocked), same shape.

    Additive masks work for both ``sdpa`` and ``eager`` (eager adds the mask to the scores, so a bool
    mask would be silently wrong there, docs/models.md §2.2).
    """
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=keep.device)
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), blocked)


def check_input_ids(input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless ids are ``[B, L]`` integers and the padding mask, if any, has their shape."""
    if input_ids_BL.dim() != 2 or input_ids_BL.dtype.is_floating_point:
        raise ValueError(
            f"input_ids must be [B, L] integer token ids; got shape {tuple(input_ids_BL.shape)}, "
            f"dtype {input_ids_BL.dtype}"
        )
    if attention_mask_BL is not None and attention_mask_BL.shape != input_ids_BL.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask_BL.shape)} differs from input_ids shape "
            f"{tuple(input_ids_BL.shape)}; pass the [B, L] 0/1 padding mask of these ids"
        )


def bidirectional_hidden(
    model: transformers.PreTrainedModel,
    input_ids_BL: torch.Tensor,
    *,
    attention_mask_BL: torch.Tensor | None,
    position_ids_BL: torch.Tensor | None,
) -> torch.Tensor:
    """Final-normed hidden states ``[B, L, D]`` of a bidirectional native model (``config.is_causal`` False).

    ``attention_mask_BL`` ``[B, L]`` 0/1 is key padding (:func:`padding_keep_mask`); ``None`` = all valid.
    Under the ``tide_bd3lm`` backend it becomes key lengths (padding must be trailing; padded rows come out
    as zeros before the last norm instead of a token attending to itself, meaningless either way).
    ``position_ids_BL`` defaults to ``arange(L)``. The LM head is not applied.
    """
    check_input_ids(input_ids_BL, attention_mask_BL)
    mask = None
    if model.config._attn_implementation == TIDE_BD3LM:
        # Key lengths [B, 1, 1, 1]: the kernel's bidirectional mode; right padding only (checked).
        mask = key_lengths_mask(attention_mask_BL, *input_ids_BL.shape, device=input_ids_BL.device)
    elif attention_mask_BL is not None:
        dtype = model.get_input_embeddings().weight.dtype
        mask = to_additive(padding_keep_mask(attention_mask_BL.to(input_ids_BL.device)), dtype)
    out = model.model(input_ids=input_ids_BL, attention_mask=mask, position_ids=position_ids_BL, use_cache=False)
    return out.last_hidden_state


# --------------------------------------------------------------------------------------- config.json


def read_config_json(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(directory, parsed config.json)`` of a checkpoint directory, with errors naming the path."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"teacher checkpoint directory {p} does not exist (or is not a directory)")
    config_file = p / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in teacher checkpoint directory {p}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    return p, raw


def check_model_type(path: Path, raw: Mapping[str, Any], *, family: str, model_types: Iterable[str]) -> None:
    """Raise ``ValueError`` unless config.json's ``model_type`` belongs to ``family``."""
    accepted = list(model_types)
    model_type = raw.get("model_type")
    if model_type not in accepted:
        raise ValueError(
            f"{path / 'config.json'} has model_type={model_type!r} (architectures {raw.get('architectures')}), "
            f"which is not a {family} checkpoint (expected model_type in {accepted}); point teacher.path at a "
            f"{family} checkpoint, or use tide_ds.models.teachers.load_teacher to detect the family"
        )


def check_values(path: Path, fields: Mapping[str, Any], expected: Mapping[str, Any], *, why: str) -> None:
    """Raise ``ValueError`` naming every field of ``fields`` whose value is not the supported one.

    ``expected`` maps a field to the supported value, or to a tuple of supported values.
    """
    problems = []
    for name, want in expected.items():
        seen = fields.get(name)
        allowed = want if isinstance(want, tuple) else (want,)
        if seen not in allowed:
            shown = allowed[0] if len(allowed) == 1 else f"one of {list(allowed)}"
            problems.append(f"{name}={seen!r} (expected {shown!r})")
    if problems:
        raise ValueError(f"{path / 'config.json'}: unsupported {', '.join(problems)}; {why}")


def check_structure(path: Path, config_fields: Mapping[str, Any], from_weights: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when config.json disagrees with what the weights imply, field by field.

    Args:
        config_fields: field name (as written in config.json) -> value read (defaults filled in).
        from_weights: field name -> value implied by the tensor shapes / key set of the checkpoint.
    """
    problems = [
        f"{name}={config_fields.get(name)!r} but the weights imply {name}={value!r}"
        for name, value in from_weights.items()
        if config_fields.get(name) != value
    ]
    if problems:
        raise ValueError(
            f"{path}: config.json does not match the safetensors weights: {'; '.join(problems)}; "
            "fix config.json (or use the config that was saved with these weights)"
        )


def drop_tied_head(
    path: Path, state: dict[str, torch.Tensor], *, field: str, tied: bool, head_key: str, embed_key: str
) -> None:
    """With tied embeddings (config field ``field`` true), remove a saved copy of the head if it equals the embedding.

    Some savers keep the alias; a head that differs from the embedding contradicts the config.
    """
    if not tied or head_key not in state:
        return
    if embed_key in state and not torch.equal(state[head_key], state[embed_key]):
        raise ValueError(
            f"{path}: config.json has {field}=True but {head_key} differs from {embed_key}, so the head is not "
            f"tied; set {field} to false in config.json (or drop {head_key} if the tie is intended)"
        )
    del state[head_key]


def layer_count(state: Mapping[str, torch.Tensor]) -> int:
    """Number of decoder layers in a state dict (highest ``model.layers.{i}`` / ``blocks.{i}`` index + 1)."""
    ids = [int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))]
    return max(ids) + 1 if ids else 0


def qwen_structure(state: Mapping[str, torch.Tensor], *, head_dim: int) -> dict[str, Any]:
    """Config fields implied by a Qwen2/Qwen3-layout state dict (``model.embed_tokens``, ``self_attn.*``)."""
    vocab, hidden = state["model.embed_tokens.weight"].shape
    prefix = "model.layers.0."
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layer_count(state),
        "tie_word_embeddings": "lm_head.weight" not in state,
    }
    if f"{prefix}self_attn.q_proj.weight" in state:
        fields["num_attention_heads"] = state[f"{prefix}self_attn.q_proj.weight"].shape[0] // head_dim
        fields["num_key_value_heads"] = state[f"{prefix}self_attn.k_proj.weight"].shape[0] // head_dim
    if f"{prefix}mlp.gate_proj.weight" in state:
        fields["intermediate_size"] = state[f"{prefix}mlp.gate_proj.weight"].shape[0]
    return fields


# ------------------------------------------------------------------------------------------- loading


def instantiate(
    cls: type[transformers.PreTrainedModel],
    config: transformers.PretrainedConfig,
    *,
    attn_implementation: str,
    dtype: torch.dtype,
) -> transformers.PreTrainedModel:
    """An uninitialised native model (weights are loaded next), tied if ``config.tie_word_embeddings``."""
    check_attn_implementation(attn_implementation)
    if attn_implementation == TIDE_BD3LM:
        check_head_dim(config, "teacher.attn_implementation")
        register_tide_attention()
    with no_init_weights():
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if config.tie_word_embeddings:
        model.tie_weights()  # construction under no_init_weights skips the tie
    return model


def load_strict(
    path: Path,
    model: transformers.PreTrainedModel,
    state: dict[str, torch.Tensor],
    *,
    source_key: Mapping[str, str] | None = None,
) -> None:
    """Copy ``state`` (native key names) into ``model`` after a strict key and shape check.

    With tied embeddings the model's ``lm_head.weight`` is not expected in ``state``. ``source_key`` maps
    a native key to the checkpoint's key, so that errors name the tensor as it is stored on disk.
    """
    tied = model.config.tie_word_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    src = source_key or {}
    missing = sorted(src.get(k, k) for k in set(expected) - set(state))
    unexpected = sorted(src.get(k, k) for k in set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match this config.json: {len(missing)} missing tensor(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected tensor(s) {unexpected[:4]}"
        )
    wrong = [
        f"{src.get(k, k)}: file {tuple(state[k].shape)} vs expected {tuple(shape)}"
        for k, shape in expected.items()
        if state[k].shape != shape
    ]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor(s) have the wrong shape for config.json, e.g. {wrong[:3]}")
    model.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class LoadPlan:
    """How to load one checkpoint, decided from config.json and tensor shapes alone (no tensor data read).

    The same plan loads a plain replica (:func:`materialize`) or streams the checkpoint group by group
    into ZeRO-3 partitions (``tide_ds.teacher.load``), so both paths share every check and key conversion.

    Attributes:
        path: checkpoint directory.
        native_class: the transformers class the weights load into.
        config: its config (``mask_token_id`` set).
        convert: checkpoint tensors -> ``(native tensors, native key -> checkpoint key)``; works on any subset
            that holds whole decoder layers.
        tied_head: ``(config field, head key, embedding key)`` when the head is tied, else ``None``.
        slab: for checkpoint tensors that ``convert`` would stack into a fused native tensor (per-expert weights
            of an MoE layer), ``key -> (native key, index)``: the tensor is the slab ``native[index]``, so that a
            streaming load (``tide_ds.teacher.reader``) fills it in place; ``None`` for every other key.
    """

    path: Path
    native_class: type[transformers.PreTrainedModel]
    config: transformers.PretrainedConfig
    convert: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, str]]]
    tied_head: tuple[str, str, str] | None = None
    slab: Callable[[str], tuple[str, tuple[int | slice, ...]] | None] | None = None

    def drop_tied_head(self, state: dict[str, torch.Tensor]) -> None:
        if self.tied_head is not None:
            field, head_key, embed_key = self.tied_head
            drop_tied_head(self.path, state, field=field, tied=True, head_key=head_key, embed_key=embed_key)


def shape_state(path: Path, *, tied_head: tuple[str, str, str] | None) -> dict[str, torch.Tensor]:
    """The checkpoint as meta tensors (headers only), without a saved copy of a tied head."""
    state = meta_checkpoint(path)
    if tied_head is not None:
        state.pop(tied_head[1], None)
    return state


def identity_convert(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """For checkpoints whose key names are already the native ones."""
    return state, {}


def materialize(plan: LoadPlan, *, attn_implementation: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """Load the whole checkpoint of ``plan`` into one frozen (eval, no grad) native model."""
    state = load_safetensors_checkpoint(plan.path)
    plan.drop_tied_head(state)
    native, source = plan.convert(state)
    model = instantiate(plan.native_class, plan.config, attn_implementation=attn_implementation, dtype=dtype)
    load_strict(plan.path, model, native, source_key=source)
    return model.eval().requires_grad_(False)


def _added_tokens(path: Path) -> dict[str, int]:
    """content -> id of the added/special tokens declared in tokenizer_config.json and tokenizer.json."""
    tokens: dict[str, int] = {}
    tok_config = path / "tokenizer_config.json"
    if tok_config.is_file():
        decoder = json.loads(tok_config.read_text()).get("added_tokens_decoder") or {}
        for token_id, entry in decoder.items():
            if isinstance(entry, dict) and "content" in entry:
                tokens[entry["content"]] = int(token_id)
    tok_json = path / "tokenizer.json"
    if tok_json.is_file():
        for entry in json.loads(tok_json.read_text()).get("added_tokens") or []:
            tokens.setdefault(entry["content"], int(entry["id"]))
    return tokens


def resolve_mask_token_id(path: Path, raw: Mapping[str, Any], *, token_strings: Iterable[str]) -> int | None:
    """The mask token id: config.json ``mask_token_id``, else the tokenizer's added token named in ``token_strings``.

    Raises ``ValueError`` when both sources exist and disagree; returns ``None`` (with a warning) when neither
    has one, in which case the run config must give ``teacher_mask_token_id``.
    """
    from_config = raw.get("mask_token_id")
    tokens = _added_tokens(path)
    from_tokenizer = next((tokens[s] for s in token_strings if s in tokens), None)
    if from_config is not None and from_tokenizer is not None and int(from_config) != from_tokenizer:
        raise ValueError(
            f"{path}: config.json has mask_token_id={from_config} but the tokenizer maps "
            f"{[s for s in token_strings if s in tokens][0]!r} to {from_tokenizer}; fix one of them"
        )
    if from_config is not None:
        return int(from_config)
    if from_tokenizer is None:
        logger.warning(
            "%s: no mask_token_id in config.json and no %s token in the tokenizer files; set "
            "teacher_mask_token_id explicitly",
            path,
            list(token_strings),
        )
    return from_tokenizer


# ------------------------------------------------------------------------------ tiny test checkpoints


class TinyInit:
    """Seeded random tensors for tiny checkpoints: unit-scale activations, so logit parity tests are meaningful.

    Linear weights and embeddings ``N(0, 1/fan_in)`` (``1/D`` for an embedding, so a tied head gives logits of
    the same scale as an untied one), norm weights ``1 + N(0, 0.1)``, biases
    ``N(0, 0.1)``; all float32 on CPU, drawn from one ``torch.Generator`` in call order.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std + mean

    def linear(self, out_features: int, in_features: int) -> torch.Tensor:
        return self.normal(out_features, in_features, std=in_features**-0.5)

    def embedding(self, rows: int, dim: int) -> torch.Tensor:
        return self.normal(rows, dim, std=dim**-0.5)

    def norm(self, dim: int) -> torch.Tensor:
        return self.normal(dim, std=0.1, mean=1.0)

    def bias(self, dim: int) -> torch.Tensor:
        return self.normal(dim, std=0.1)


def write_tiny_checkpoint(
    out_dir: str | os.PathLike, config_json: Mapping[str, Any], state: dict[str, torch.Tensor], *, shard: bool
) -> Path:
    """Write ``config.json`` and safetensors (one file, or about four shards plus an index when ``shard``)."""
    out = Path(out_dir)
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_safetensors_checkpoint(state, out, max_shard_bytes=total // 4 + 1 if shard else None)
    (out / "config.json").write_text(json.dumps(dict(config_json), indent=2) + "\n")
    return out
