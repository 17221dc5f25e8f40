"""WeDLM-8B-Instruct (``tencent/WeDLM-8B-Instruct``): the pipeline-B teacher, on transformers' Qwen3.

Spec: docs/models.md §4, docs/method.md §3.2-§3.4. WeDLM is a Qwen3-8B derivative (initialised from it, same
module tree and key names [M: verify on the first real download, docs/models.md §11 item 4]), so it loads as
``transformers.Qwen3ForCausalLM`` with identical keys. The model itself is causal; TIDE runs it on the
BD3LM concatenation ``[x_0 ; x_t]`` (``concat_order="x0_xt"``) under the block-diffusion mask, with
positions ``[0..L-1 ; 0..L-1]``, and reads the ``x_t`` half (unshifted: the hidden state at a masked
position predicts that position's token). The explicit per-layer-type mask dict bypasses transformers'
causal-mask creation (docs/models.md §2.2), so ``config.is_causal`` is left as saved.

This file holds only what differs: config/model-type adapter, structural checks, the BD3LM mask with
optional padding, and a tiny checkpoint writer.

Legend: B batch, L length of one copy, K block size, D hidden, V vocab.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from tide_ds.models import tide_attention
from tide_ds.models.adapter_glue import (
    LoadPlan,
    TinyInit,
    check_input_ids,
    check_model_type,
    check_structure,
    check_values,
    identity_convert,
    materialize,
    padding_keep_mask,
    qwen_structure,
    read_config_json,
    resolve_mask_token_id,
    shape_state,
    to_additive,
    write_tiny_checkpoint,
)
from tide_ds.models.block_mask import additive_bd3lm_mask, dense_bd3lm_mask
from tide_ds.models.tide_attention import TIDE_BD3LM, BD3LMMaskSpec

__all__ = [
    "CONCAT_ORDERS",
    "MODEL_TYPES",
    "lm_head_weight",
    "plan_wedlm",
    "load_wedlm",
    "qwen3_config",
    "teacher_forward_hidden",
    "tiny_wedlm_config",
    "write_tiny_wedlm_checkpoint",
]

FAMILY = "wedlm"
#: ``model_type`` values that identify a WeDLM checkpoint when detecting the family.
MODEL_TYPES = ("wedlm",)
#: Also accepted when the family is requested explicitly: WeDLM is a Qwen3 architecture.
COMPATIBLE_MODEL_TYPES = ("wedlm", "qwen3")
#: Tokenizer strings tried for the mask token when config.json has no ``mask_token_id`` [M: TIDE uses 151665].
MASK_TOKEN_STRINGS = ("<|mask|>",)
CONCAT_ORDERS = ("x0_xt", "xt_x0")
_EMBED = "model.embed_tokens.weight"

_TINY: dict[str, Any] = {
    "architectures": ["WeDLMForCausalLM"],
    "model_type": "wedlm",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "bos_token_id": 1000,
    "eos_token_id": 1002,
    "pad_token_id": 1000,
    "mask_token_id": 1008,
}


def qwen3_config(path: Path, raw: dict[str, Any], *, mask_token_id: int | None) -> transformers.Qwen3Config:
    """``Qwen3Config`` from a WeDLM config.json (``model_type``/``architectures``/``auto_map`` dropped)."""
    check_values(
        path,
        {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None, **raw},
        {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None},
        why="the WeDLM adapter supports the Qwen3-8B layout: SwiGLU, full attention in every layer, plain RoPE",
    )
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    config = transformers.Qwen3Config.from_dict(fields)
    config.is_causal = True  # WeDLM is causal; teacher_forward_hidden always passes explicit BD3LM masks
    config.use_cache = False
    config.mask_token_id = mask_token_id
    config.tide_teacher_family = FAMILY
    return config


def plan_wedlm(path: str | os.PathLike) -> LoadPlan:
    """Check a local wedlm checkpoint (config.json against the tensor shapes) and plan its load."""
    p, raw = read_config_json(path)
    check_model_type(p, raw, family=FAMILY, model_types=COMPATIBLE_MODEL_TYPES)
    config = qwen3_config(p, raw, mask_token_id=resolve_mask_token_id(p, raw, token_strings=MASK_TOKEN_STRINGS))
    tied = ("tie_word_embeddings", "lm_head.weight", _EMBED) if config.tie_word_embeddings else None
    state = shape_state(p, tied_head=tied)
    q_norm = state.get("model.layers.0.self_attn.q_norm.weight")
    head_dim = config.head_dim if q_norm is None else q_norm.shape[0]
    implied = {**qwen_structure(state, head_dim=head_dim), "head_dim": head_dim}
    check_structure(p, {name: getattr(config, name) for name in implied}, implied)
    return LoadPlan(path=p, native_class=transformers.Qwen3ForCausalLM, config=config, convert=identity_convert, tied_head=tied)


def load_wedlm(
    path: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.Qwen3ForCausalLM:
    """A frozen (eval, no grad) ``Qwen3ForCausalLM`` from a local WeDLM checkpoint (Qwen3 key names).

    ``model_type`` must be ``wedlm`` (or ``qwen3``). Structural fields are checked against the weights;
    ``config.mask_token_id`` comes from config.json or the tokenizer files.
    """
    return materialize(plan_wedlm(path), attn_implementation=attn_implementation, dtype=dtype)


def teacher_forward_hidden(
    model: transformers.Qwen3ForCausalLM,
    input_ids_BL: torch.Tensor,
    *,
    x_0_BL: torch.Tensor,
    block_size: int,
    attention_mask_BL: torch.Tensor | None = None,
    concat_order: str = "x0_xt",
) -> torch.Tensor:
    """BD3LM teacher forward (docs/method.md §3.2-§3.3): hidden states of the ``x_t`` half ``[B, L, D]``.

    Runs ``[x_0 ; x_t]`` (``concat_order="x0_xt"``, the WeDLM default; ``"xt_x0"`` puts ``x_t`` first) with
    positions ``[0..L-1 ; 0..L-1]`` under the BD3LM mask of block size K, as an additive mask in the model
    dtype (``finfo.min`` where blocked). The LM head is not applied.

    Args:
        input_ids_BL: ``[B, L]`` noisy teacher ids ``x_t`` (masked positions = the teacher's mask id).
        x_0_BL: ``[B, L]`` clean ids.
        block_size: K; L must be a multiple of it.
        attention_mask_BL: ``[B, L]`` 0/1 padding of the teacher sequence (aligned modes); padded rows and
            columns are blocked in both halves, a padded query attends to itself only (finite, ignore it).
        concat_order: ``"x0_xt"`` or ``"xt_x0"``.
    """
    check_input_ids(input_ids_BL, attention_mask_BL)
    if x_0_BL.shape != input_ids_BL.shape:
        raise ValueError(
            f"x_0 shape {tuple(x_0_BL.shape)} differs from x_t shape {tuple(input_ids_BL.shape)}; "
            "pass the clean and the noisy copy of the same [B, L] sequence"
        )
    if concat_order not in CONCAT_ORDERS:
        raise ValueError(f"distill.concat_order={concat_order!r} is not supported; use one of {list(CONCAT_ORDERS)}")
    seq_len, device = input_ids_BL.shape[1], input_ids_BL.device
    clean_first = concat_order == "x0_xt"
    halves = (x_0_BL, input_ids_BL) if clean_first else (input_ids_BL, x_0_BL)
    ids_B2L = torch.cat(halves, dim=1)
    dtype = model.get_input_embeddings().weight.dtype
    if model.config._attn_implementation == TIDE_BD3LM and (attention_mask_BL is None or bool(attention_mask_BL.all())):
        # The kernel computes the BD3LM mask from indices; a padded batch takes the dense mask below (SDPA).
        mask = BD3LMMaskSpec(seq_len, block_size, clean_first=clean_first, implementation=tide_attention.kernel_implementation(device))
    elif attention_mask_BL is None:  # cached per (L, K, order, dtype, device): built once per run
        mask = additive_bd3lm_mask(seq_len, block_size, clean_first=clean_first, dtype=dtype, device=device)
    else:
        keep = dense_bd3lm_mask(seq_len, block_size, clean_first=clean_first, device=device)  # [1, 1, 2L, 2L]
        mask = to_additive(keep & padding_keep_mask(attention_mask_BL.to(device).repeat(1, 2)), dtype)
    # A dict of per-layer-type masks bypasses Qwen3's own causal-mask creation (docs/models.md §2.2).
    masks = {layer_type: mask for layer_type in set(model.config.layer_types)}
    positions_12L = torch.arange(seq_len, device=device).repeat(2)[None]
    out = model.model(input_ids=ids_B2L, attention_mask=masks, position_ids=positions_12L, use_cache=False)
    hidden_B2LD = out.last_hidden_state
    return hidden_B2LD[:, seq_len:] if clean_first else hidden_B2LD[:, :seq_len]


def lm_head_weight(model: transformers.Qwen3ForCausalLM) -> torch.Tensor:
    """The LM head ``[V, D]`` (the embedding itself when tied)."""
    return model.lm_head.weight


def tiny_wedlm_config(**overrides: Any) -> dict[str, Any]:
    """The ``tiny-wedlm`` config.json of docs/models.md §10 (Qwen3 fields, untied, 0.230 M parameters)."""
    return {**_TINY, **overrides}


def write_tiny_wedlm_checkpoint(
    out_dir: str | os.PathLike, *, seed: int, shard: bool = False, **overrides: Any
) -> Path:
    """Write a random ``tiny-wedlm`` checkpoint with Qwen3 key names (docs/models.md §4.2); ``overrides`` are config fields.

    With ``tie_word_embeddings`` true no ``lm_head.weight`` is written.
    """
    cfg = tiny_wedlm_config(**overrides)
    init = TinyInit(seed)
    d, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": init.embedding(cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[f"{p}input_layernorm.weight"] = init.norm(d)
        for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            state[f"{p}self_attn.{name}.weight"] = init.linear(rows, d)
            if cfg["attention_bias"]:
                state[f"{p}self_attn.{name}.bias"] = init.bias(rows)
        state[f"{p}self_attn.o_proj.weight"] = init.linear(d, heads * hd)
        if cfg["attention_bias"]:
            state[f"{p}self_attn.o_proj.bias"] = init.bias(d)
        state[f"{p}self_attn.q_norm.weight"] = init.norm(hd)
        state[f"{p}self_attn.k_norm.weight"] = init.norm(hd)
        state[f"{p}post_attention_layernorm.weight"] = init.norm(d)
        state[f"{p}mlp.gate_proj.weight"] = init.linear(inter, d)
        state[f"{p}mlp.up_proj.weight"] = init.linear(inter, d)
        state[f"{p}mlp.down_proj.weight"] = init.linear(d, inter)
    state["model.norm.weight"] = init.norm(d)
    if not cfg["tie_word_embeddings"]:
        state["lm_head.weight"] = init.linear(cfg["vocab_size"], d)
    return write_tiny_checkpoint(out_dir, cfg, state, shard=shard)
