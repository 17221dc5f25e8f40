"""LLaDA-8B-Instruct (``GSAI-ML/LLaDA-8B-Instruct``): OLMo-style checkpoint, on transformers' Llama.

Spec: docs/models.md §5.1-§5.4. LLaDA's ``block_type="llama"`` block is a Llama decoder layer (RMSNorm, separate
q/k/v projections, SwiGLU with ``ff_proj`` as the gate, half-split RoPE, no biases), always bidirectional.
It therefore loads as ``transformers.LlamaForCausalLM`` with ``is_causal=False`` after renaming the OLMo keys
(exact in fp32, docs/models.md §2.3):

==========================================  ==========================================
checkpoint (``model.transformer.`` prefix)  native
==========================================  ==========================================
``wte`` / ``ln_f`` / ``ff_out`` (top level)  ``model.embed_tokens`` / ``model.norm`` / ``lm_head``
``blocks.{i}.attn_norm`` / ``ff_norm``        ``model.layers.{i}.input_layernorm`` / ``post_attention_layernorm``
``blocks.{i}.{q,k,v}_proj`` / ``attn_out``    ``model.layers.{i}.self_attn.{q,k,v}_proj`` / ``o_proj``
``blocks.{i}.ff_proj`` / ``up_proj`` / ``ff_out``  ``model.layers.{i}.mlp.gate_proj`` / ``up_proj`` / ``down_proj``
==========================================  ==========================================

Deviations from the reference, by design: RoPE positions can be given (the reference has no
``position_ids``; default ``arange(L)`` is the same); a 2-D padding mask lets a padded query see itself.
Known numeric difference: the reference rotates q/k in fp32 (``rope_full_precision``); Llama rotates in
the activation dtype, identical in fp32 and ~1e-2 off in bf16 logits (docs/models.md §2.1).

Legend: B batch, L sequence length, D hidden (``d_model``), V vocab.
"""

from __future__ import annotations

import os
import re
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
    layer_count,
    materialize,
    read_config_json,
    resolve_mask_token_id,
    shape_state,
    write_tiny_checkpoint,
)

__all__ = [
    "MODEL_TYPES",
    "convert_llada_state_dict",
    "llada_fields",
    "llama_config",
    "lm_head_weight",
    "plan_llada",
    "load_llada",
    "teacher_forward_hidden",
    "tiny_llada_config",
    "write_tiny_llada_checkpoint",
]

FAMILY = "llada"
MODEL_TYPES = ("llada",)
#: Tokenizer strings of the mask token (docs/models.md §5.4: ``<|mdm_mask|>``, 126336).
MASK_TOKEN_STRINGS = ("<|mdm_mask|>",)

#: Fields whose OLMo defaults differ from LLaDA's values or are uncertain: config.json must state them.
_REQUIRED = (
    "d_model",
    "n_heads",
    "n_layers",
    "vocab_size",
    "block_type",
    "activation_type",
    "layer_norm_type",
    "rope",
    "rope_theta",
    "weight_tying",
    "include_bias",
)
#: Supported values of feature switches (absent optional fields count as the value shown).
_SUPPORTED = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "attention_layer_norm": False,
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
    "clip_qkv": None,
}
_OPTIONAL_DEFAULTS = {k: v for k, v in _SUPPORTED.items() if k not in _REQUIRED}

_TINY: dict[str, Any] = {
    "architectures": ["LLaDAModelLM"],
    "model_type": "llada",
    "d_model": 64,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 2,
    "mlp_ratio": 4,
    "mlp_hidden_size": 128,
    "multi_query_attention": None,
    "block_type": "llama",
    "block_group_size": 1,
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "rms_norm_eps": 1e-5,
    "attention_layer_norm": False,
    "clip_qkv": None,
    "rope": True,
    "rope_theta": 500000.0,
    "rope_full_precision": True,
    "alibi": False,
    "flash_attention": False,
    "input_emb_norm": False,
    "scale_logits": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "vocab_size": 1024,
    "embedding_size": 1024,
    "weight_tying": False,
    "max_sequence_length": 4096,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
    "init_device": "cpu",
    "init_fn": "mitchell",
    "use_cache": False,
    "mask_token_id": 1020,
    "eos_token_id": 1001,
    "pad_token_id": 1001,
}

_TOP_LEVEL = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def llada_fields(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """config.json fields with the derived sizes resolved, after checking the supported features.

    ``n_kv_heads`` (None -> ``n_heads``, or 1 with ``multi_query_attention``), ``mlp_hidden_size``
    (None -> ``mlp_ratio * d_model``), ``embedding_size`` (None -> ``vocab_size``; the embedding rows).
    """
    missing = [name for name in _REQUIRED if name not in raw]
    if missing:
        raise ValueError(f"{path / 'config.json'} lacks LLaDA field(s) {missing}; it is not a complete LLaDA config")
    fields = {**_OPTIONAL_DEFAULTS, "rms_norm_eps": 1e-5, "max_sequence_length": 4096, **raw}
    check_values(
        path,
        fields,
        _SUPPORTED,
        why="the LLaDA adapter supports the LLaDA-8B block (block_type llama: RMSNorm, SwiGLU, RoPE, no biases)",
    )
    if fields.get("n_kv_heads") is None:
        fields["n_kv_heads"] = 1 if fields.get("multi_query_attention") else fields["n_heads"]
    if fields.get("mlp_hidden_size") is None:
        fields["mlp_hidden_size"] = int(fields.get("mlp_ratio", 4) * fields["d_model"])
    if fields.get("embedding_size") is None:
        fields["embedding_size"] = fields["vocab_size"]
    return fields


def _structure(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, Any]:
    """Config fields implied by a checkpoint in the OLMo/LLaDA key layout (only those its keys reveal)."""
    out: dict[str, Any] = {
        "n_layers": layer_count(state),
        "weight_tying": "model.transformer.ff_out.weight" not in state,
    }
    if "model.transformer.wte.weight" in state:
        out["embedding_size"], out["d_model"] = state["model.transformer.wte.weight"].shape
    block = "model.transformer.blocks.0."
    head_dim = fields["d_model"] // fields["n_heads"]
    if f"{block}k_proj.weight" in state:
        out["n_kv_heads"] = state[f"{block}k_proj.weight"].shape[0] // head_dim
    if f"{block}ff_proj.weight" in state:
        out["mlp_hidden_size"] = state[f"{block}ff_proj.weight"].shape[0]
    return out


def llama_config(fields: dict[str, Any], *, mask_token_id: int | None) -> transformers.LlamaConfig:
    """The bidirectional ``LlamaConfig`` computing the same function as the LLaDA config ``fields``."""
    config = transformers.LlamaConfig(
        vocab_size=fields["embedding_size"],
        hidden_size=fields["d_model"],
        intermediate_size=fields["mlp_hidden_size"],
        num_hidden_layers=fields["n_layers"],
        num_attention_heads=fields["n_heads"],
        num_key_value_heads=fields["n_kv_heads"],
        hidden_act="silu",
        max_position_embeddings=fields["max_sequence_length"],
        rms_norm_eps=fields["rms_norm_eps"],
        tie_word_embeddings=fields["weight_tying"],
        rope_parameters={"rope_type": "default", "rope_theta": float(fields["rope_theta"])},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=fields.get("attention_dropout", 0.0),
        pad_token_id=fields.get("pad_token_id"),
        eos_token_id=fields.get("eos_token_id"),
        bos_token_id=fields.get("bos_token_id"),
        use_cache=False,
        is_causal=False,
    )
    config.mask_token_id = mask_token_id
    config.tide_teacher_family = FAMILY
    return config


def convert_llada_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """OLMo/LLaDA keys -> Llama keys: ``(native state, native key -> checkpoint key)``. Unknown keys pass through."""
    native: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in state.items():
        m = re.match(r"^model\.transformer\.blocks\.(\d+)\.(.+)$", key)
        if m is not None and m.group(2) in _BLOCK:
            new = f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}"
        else:
            new = _TOP_LEVEL.get(key, key)
        native[new], source[new] = tensor, key
    return native, source


def plan_llada(path: str | os.PathLike) -> LoadPlan:
    """Check a local LLaDA checkpoint (config.json against the tensor shapes) and plan its load."""
    p, raw = read_config_json(path)
    check_model_type(p, raw, family=FAMILY, model_types=MODEL_TYPES)
    fields = llada_fields(p, raw)
    tied = ("weight_tying", "model.transformer.ff_out.weight", "model.transformer.wte.weight") if fields["weight_tying"] else None
    check_structure(p, fields, _structure(shape_state(p, tied_head=tied), fields))
    config = llama_config(fields, mask_token_id=resolve_mask_token_id(p, raw, token_strings=MASK_TOKEN_STRINGS))
    return LoadPlan(
        path=p, native_class=transformers.LlamaForCausalLM, config=config, convert=convert_llada_state_dict, tied_head=tied
    )


def load_llada(
    path: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.LlamaForCausalLM:
    """A frozen (eval, no grad), bidirectional ``LlamaForCausalLM`` from a local LLaDA checkpoint.

    ``path`` holds the real ``config.json`` (``model_type`` ``llada``, OLMo field names) and safetensors with the
    real ``model.transformer.*`` keys (single or sharded); tied (``weight_tying``) and untied heads.
    """
    return materialize(plan_llada(path), attn_implementation=attn_implementation, dtype=dtype)


def teacher_forward_hidden(
    model: transformers.LlamaForCausalLM,
    input_ids_BL: torch.Tensor,
    *,
    attention_mask_BL: torch.Tensor | None = None,
    position_ids_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional forward on one copy: final-normed hidden ``[B, L, D]`` (no LM head, no shift).

    Args:
        input_ids_BL: ``[B, L]`` ids, masked positions set to the mask id (``model.config.mask_token_id``).
        attention_mask_BL: ``[B, L]`` 0/1 key padding; a padded query attends to itself only. ``None`` = none.
        position_ids_BL: RoPE positions, default ``arange(L)`` (the only choice of the reference).
    """
    return bidirectional_hidden(
        model, input_ids_BL, attention_mask_BL=attention_mask_BL, position_ids_BL=position_ids_BL
    )


def lm_head_weight(model: transformers.LlamaForCausalLM) -> torch.Tensor:
    """The LM head ``[V, D]`` (``transformer.ff_out``, or the embedding when ``weight_tying``)."""
    return model.lm_head.weight


def tiny_llada_config(**overrides: Any) -> dict[str, Any]:
    """The ``tiny-llada`` config.json of docs/models.md §10 (0.213 M parameters untied); e.g. ``weight_tying=True``."""
    return {**_TINY, **overrides}


def write_tiny_llada_checkpoint(
    out_dir: str | os.PathLike, *, seed: int, shard: bool = False, **overrides: Any
) -> Path:
    """Write a random ``tiny-llada`` checkpoint in the real OLMo/LLaDA key layout (docs/models.md §5.2).

    ``overrides`` are config.json fields (``weight_tying=True`` for the tied variant, ``n_kv_heads=2``, ...).
    """
    cfg = tiny_llada_config(**overrides)
    f = llada_fields(Path(out_dir), cfg)
    init = TinyInit(seed)
    d, inter = f["d_model"], f["mlp_hidden_size"]
    kv_rows = f["n_kv_heads"] * (d // f["n_heads"])
    state: dict[str, torch.Tensor] = {"model.transformer.wte.weight": init.embedding(f["embedding_size"], d)}
    for i in range(f["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        state[f"{p}attn_norm.weight"] = init.norm(d)
        state[f"{p}q_proj.weight"] = init.linear(d, d)
        state[f"{p}k_proj.weight"] = init.linear(kv_rows, d)
        state[f"{p}v_proj.weight"] = init.linear(kv_rows, d)
        state[f"{p}attn_out.weight"] = init.linear(d, d)
        state[f"{p}ff_norm.weight"] = init.norm(d)
        state[f"{p}ff_proj.weight"] = init.linear(inter, d)
        state[f"{p}up_proj.weight"] = init.linear(inter, d)
        state[f"{p}ff_out.weight"] = init.linear(d, inter)
    state["model.transformer.ln_f.weight"] = init.norm(d)
    if not f["weight_tying"]:
        state["model.transformer.ff_out.weight"] = init.linear(f["embedding_size"], d)
    return write_tiny_checkpoint(out_dir, cfg, state, shard=shard)
