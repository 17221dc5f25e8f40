"""Dream-v0-7B (``Dream-org/Dream-v0-Instruct-7B``): a Qwen2.5 checkpoint, on transformers' Qwen2.

Spec: docs/models.md §6. ``DreamModel`` is Qwen2 (q/k/v biases, no QK-norm, half-split RoPE) with attention
hard-coded non-causal; its keys are exactly Qwen2's, so it loads as ``transformers.Qwen2ForCausalLM`` with
``is_causal=False`` (exact, docs/models.md §2.3). What differs lives here: the ``model_type="Dream"`` config
adapter, structural checks, the padding mask, and the **logit shift**: Dream keeps the autoregressive
convention (the output at position i predicts token i+1); :func:`teacher_forward_hidden` right-shifts the
hidden states by default, ``cat([h[:, :1], h[:, :-1]])``, so that row i predicts token i like every other
teacher (the LM head is row-wise, so shifting hidden states equals shifting logits).

Mask semantics differ from the reference on purpose: the reference turns a 2-D mask into a pairwise mask
whose padded rows are fully masked and casts any 4-D mask to bool (an additive mask would be inverted);
here a 2-D mask is key padding in which a padded query attends to itself, passed as an additive mask.
Unpadded rows are identical.

Legend: B batch, L sequence length, D hidden, V vocab.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from tide_ds.models.adapter_glue import (
    LoadPlan,
    TinyInit,
    bidirectional_hidden,
    check_model_type,
    check_structure,
    check_values,
    identity_convert,
    materialize,
    qwen_structure,
    read_config_json,
    resolve_mask_token_id,
    shape_state,
    write_tiny_checkpoint,
)

__all__ = [
    "MODEL_TYPES",
    "lm_head_weight",
    "plan_dream",
    "load_dream",
    "qwen2_config",
    "teacher_forward_hidden",
    "tiny_dream_config",
    "write_tiny_dream_checkpoint",
]

FAMILY = "dream"
MODEL_TYPES = ("Dream",)
#: Tokenizer strings of the mask token (docs/models.md §6.4: ``<|mask|>``, 151666).
MASK_TOKEN_STRINGS = ("<|mask|>",)
_EMBED = "model.embed_tokens.weight"

_TINY: dict[str, Any] = {
    "architectures": ["DreamModel"],
    "model_type": "Dream",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "use_cache": False,
    "mask_token_id": 1010,
    "pad_token_id": 1000,
    "bos_token_id": 1000,
    "eos_token_id": 1000,
}


def qwen2_config(path: Path, raw: dict[str, Any], *, mask_token_id: int | None) -> transformers.Qwen2Config:
    """Bidirectional ``Qwen2Config`` from a Dream config.json (minus model_type, architectures, auto_map)."""
    check_values(
        path,
        {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None, **raw},
        {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None},
        why="the Dream adapter supports the Qwen2.5 layout: SwiGLU, full attention in every layer, plain RoPE",
    )
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    config = transformers.Qwen2Config.from_dict(fields)
    config.is_causal = False
    config.use_cache = False
    config.mask_token_id = mask_token_id
    config.tide_teacher_family = FAMILY
    return config


def plan_dream(path: str | os.PathLike) -> LoadPlan:
    """Check a local dream checkpoint (config.json against the tensor shapes) and plan its load."""
    p, raw = read_config_json(path)
    check_model_type(p, raw, family=FAMILY, model_types=MODEL_TYPES)
    config = qwen2_config(p, raw, mask_token_id=resolve_mask_token_id(p, raw, token_strings=MASK_TOKEN_STRINGS))
    tied = ("tie_word_embeddings", "lm_head.weight", _EMBED) if config.tie_word_embeddings else None
    state = shape_state(p, tied_head=tied)
    head_dim = config.hidden_size // config.num_attention_heads
    implied = qwen_structure(state, head_dim=head_dim)
    check_structure(p, {name: getattr(config, name) for name in implied}, implied)
    return LoadPlan(path=p, native_class=transformers.Qwen2ForCausalLM, config=config, convert=identity_convert, tied_head=tied)


def load_dream(
    path: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.Qwen2ForCausalLM:
    """A frozen (eval, no grad), bidirectional ``Qwen2ForCausalLM`` from a local Dream checkpoint (Qwen2 keys)."""
    return materialize(plan_dream(path), attn_implementation=attn_implementation, dtype=dtype)


def teacher_forward_hidden(
    model: transformers.Qwen2ForCausalLM,
    input_ids_BL: torch.Tensor,
    *,
    attention_mask_BL: torch.Tensor | None = None,
    position_ids_BL: torch.Tensor | None = None,
    right_shift: bool = True,
) -> torch.Tensor:
    """Bidirectional forward on one copy: final-normed hidden ``[B, L, D]``, no LM head.

    Args:
        input_ids_BL: ``[B, L]`` ids, masked positions set to ``model.config.mask_token_id``.
        attention_mask_BL: ``[B, L]`` 0/1 key padding; a padded query attends to itself only. ``None`` = none.
        position_ids_BL: RoPE positions, default ``arange(L)`` (Dream's sampler uses ``cumsum(mask) - 1``
            with left padding).
        right_shift: realign Dream's autoregressive convention so that row i predicts token i
            (``out[:, 0] = h[:, 0]``, ``out[:, i] = h[:, i - 1]``); False returns the raw hidden states.
    """
    hidden_BLD = bidirectional_hidden(
        model, input_ids_BL, attention_mask_BL=attention_mask_BL, position_ids_BL=position_ids_BL
    )
    if not right_shift:
        return hidden_BLD
    return torch.cat([hidden_BLD[:, :1], hidden_BLD[:, :-1]], dim=1)


def lm_head_weight(model: transformers.Qwen2ForCausalLM) -> torch.Tensor:
    """The LM head ``[V, D]`` (the embedding itself when tied)."""
    return model.lm_head.weight


def tiny_dream_config(**overrides: Any) -> dict[str, Any]:
    """The ``tiny-dream`` config.json of docs/models.md §10 (Qwen2 fields, untied, 0.205 M parameters)."""
    return {**_TINY, **overrides}


def write_tiny_dream_checkpoint(
    out_dir: str | os.PathLike, *, seed: int, shard: bool = False, **overrides: Any
) -> Path:
    """Write a random ``tiny-dream`` checkpoint with Qwen2 key names incl. q/k/v biases (docs/models.md §6.2)."""
    cfg = tiny_dream_config(**overrides)
    init = TinyInit(seed)
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = d // heads
    state: dict[str, torch.Tensor] = {_EMBED: init.embedding(cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[f"{p}input_layernorm.weight"] = init.norm(d)
        for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            state[f"{p}self_attn.{name}.weight"] = init.linear(rows, d)
            state[f"{p}self_attn.{name}.bias"] = init.bias(rows)
        state[f"{p}self_attn.o_proj.weight"] = init.linear(d, heads * hd)
        state[f"{p}post_attention_layernorm.weight"] = init.norm(d)
        state[f"{p}mlp.gate_proj.weight"] = init.linear(inter, d)
        state[f"{p}mlp.up_proj.weight"] = init.linear(inter, d)
        state[f"{p}mlp.down_proj.weight"] = init.linear(d, inter)
    state["model.norm.weight"] = init.norm(d)
    if not cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = init.linear(cfg["vocab_size"], d)
    return write_tiny_checkpoint(out_dir, cfg, state, shard=shard)
