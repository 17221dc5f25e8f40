"""LLaDA2.0-mini (``inclusionAI/LLaDA2.0-mini``, Bailing-MoE-v2): the pipeline-A teacher, on transformers' Glm4Moe.

Spec: docs/models.md §3 (config, keys, routing, forward contract), docs/method.md §3.1. The reference
``LLaDA2MoeModelLM`` does not import under transformers 5.24; its numerics are those of
``transformers.Glm4MoeForCausalLM`` with ``is_causal=False`` (docs/models.md §2.3, fp32 diff ~1e-7):

* routing (docs/models.md §3.3): fp32 router logits, sigmoid scores, ``expert_bias`` (Glm4Moe's
  ``e_score_correction_bias``) added for *selection only*, group score = sum of the top-2 biased scores
  per group, ``topk_group`` groups kept, the rest set to ``-inf``, top-k, unbiased weights renormalised
  (whenever top_k > 1) and multiplied by ``routed_scaling_factor``, plus the unweighted shared experts;
  the router weight and bias stay fp32 whatever the model dtype (``_keep_in_fp32_modules_strict``);
* the experts are one module holding fused ``[E, 2I, D]`` / ``[E, D, I]`` tensors, so the submodules
  called do not depend on the routing (rank-invariant under ZeRO-3, docs/models.md §8.2-§8.3);
* partial RoPE (``partial_rotary_factor``, half-split), QK-norm before RoPE, dense layers
  ``< first_k_dense_replace``.

This file holds only what differs: the config mapping, the key conversion from the real checkpoint
names (``attention.query_key_value`` split into q/k/v, per-expert weights fused, ``expert_bias`` renamed),
structural checks, the bidirectional padding mask, and a tiny checkpoint writer in the real layout.

Legend: B batch, L sequence length, D hidden, E routed experts, I expert width, V vocab.
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
    "ZERO3_LEAF_MODULES",
    "convert_llada2_state_dict",
    "llada2_expert_slab",
    "export_llada2_state_dict",
    "save_llada2_moe_checkpoint",
    "glm4moe_config",
    "llada2_fields",
    "lm_head_weight",
    "plan_llada2_moe",
    "load_llada2_moe",
    "teacher_forward_hidden",
    "tiny_llada2_moe_config",
    "write_tiny_llada2_moe_checkpoint",
]

FAMILY = "llada2_moe"
MODEL_TYPES = ("llada2_moe",)
#: Tokenizer strings of the mask token (docs/models.md §3.5: ``<|mask|>``, 156895 in LLaDA2.0-mini).
MASK_TOKEN_STRINGS = ("<|mask|>",)
#: The sparse block (router + fused experts + shared experts) to mark as a ZeRO-3 leaf (docs/models.md §8.3).
ZERO3_LEAF_MODULES = ("Glm4MoeMoE",)

#: ``LLaDA2MoeConfig`` class defaults (docs/models.md §3.1), used when config.json omits a field.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30592,
    "hidden_size": 1024,
    "intermediate_size": None,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 0,
    "head_dim": None,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": True,
    "use_qk_norm": True,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "partial_rotary_factor": 0.5,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_shared_experts": 0,
    "moe_intermediate_size": None,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 0,
    "attention_dropout": 0.1,
    "num_nextn_predict_layers": 0,
    "score_function": "sigmoid",
    "pad_token_id": 126081,
    "eos_token_id": None,
    "bos_token_id": None,
}

_TINY: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "vocab_size": 1280,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": False,
    "use_qk_norm": True,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
    "rope_theta": 600000.0,
    "rope_scaling": None,
    "partial_rotary_factor": 0.5,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "moe_intermediate_size": 32,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "router_dtype": "fp32",
    "embedding_dropout": 0.0,
    "attention_dropout": 0.0,
    "output_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "norm_head": False,
    "num_nextn_predict_layers": 0,
    "pad_token_id": 1200,
    "eos_token_id": 1200,
    "mask_token_id": 1203,
}

_EXPERT_KEY = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_RENAMES = {
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "attention.query_layernorm.weight": "self_attn.q_norm.weight",
    "attention.key_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.gate.expert_bias": "mlp.gate.e_score_correction_bias",
}


def llada2_fields(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """config.json fields with class defaults filled in, after checking the supported values.

    Accepts the legacy top-level ``rope_theta`` / ``partial_rotary_factor`` and a newer ``rope_parameters``.
    """
    fields = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in _DEFAULTS}}
    rope = raw.get("rope_parameters") or {}
    fields["rope_theta"] = float(rope.get("rope_theta", fields["rope_theta"]))
    fields["partial_rotary_factor"] = rope.get("partial_rotary_factor", fields["partial_rotary_factor"])
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    if fields["head_dim"] is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    check_values(
        path,
        fields,
        {"hidden_act": "silu", "use_bias": False, "score_function": "sigmoid", "rope_scaling": None},
        why="the LLaDA2 adapter supports SwiGLU experts, sigmoid routing, no attention-output bias and "
        "plain RoPE (the released LLaDA2.0-mini config)",
    )
    experts, groups, top_groups = fields["num_experts"], fields["n_group"], fields["topk_group"]
    if fields["num_key_value_heads"] <= 0:
        raise ValueError(f"{path / 'config.json'}: num_key_value_heads is missing or 0; it must be > 0")
    if experts % groups or experts // groups < 2 or not 0 < top_groups <= groups:
        raise ValueError(
            f"{path / 'config.json'}: num_experts={experts}, n_group={groups}, topk_group={top_groups} do not "
            "form a valid group-limited router (need num_experts divisible by n_group with >= 2 experts per "
            "group, and 0 < topk_group <= n_group)"
        )
    if fields["num_experts_per_tok"] > top_groups * (experts // groups):
        raise ValueError(
            f"{path / 'config.json'}: num_experts_per_tok={fields['num_experts_per_tok']} exceeds the "
            f"{top_groups * (experts // groups)} experts of the topk_group={top_groups} kept groups"
        )
    return fields


def _structure(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, Any]:
    """Config fields implied by a checkpoint in the real LLaDA2 key layout (only those its keys reveal)."""
    out: dict[str, Any] = {"tie_word_embeddings": "lm_head.weight" not in state}
    if "model.word_embeddings.weight" in state:
        out["vocab_size"], out["hidden_size"] = state["model.word_embeddings.weight"].shape
    out["num_hidden_layers"] = layer_count(state) - fields["num_nextn_predict_layers"]
    head_dim = fields["head_dim"]
    attn = "model.layers.0.attention."
    if f"{attn}query_layernorm.weight" in state:
        out["head_dim"] = state[f"{attn}query_layernorm.weight"].shape[0]
    out["use_qk_norm"] = f"{attn}query_layernorm.weight" in state
    out["use_qkv_bias"] = f"{attn}query_key_value.bias" in state
    out["use_bias"] = f"{attn}dense.bias" in state
    if f"{attn}dense.weight" in state and f"{attn}query_key_value.weight" in state:
        heads = state[f"{attn}dense.weight"].shape[1] // head_dim
        out["num_attention_heads"] = heads
        out["num_key_value_heads"] = (state[f"{attn}query_key_value.weight"].shape[0] // head_dim - heads) // 2
    n_layers = fields["num_hidden_layers"]
    dense = [i for i in range(n_layers) if f"model.layers.{i}.mlp.gate_proj.weight" in state]
    out["first_k_dense_replace"] = len(dense)
    if dense:
        out["intermediate_size"] = state["model.layers.0.mlp.gate_proj.weight"].shape[0]
    moe = f"model.layers.{len(dense)}.mlp."
    if f"{moe}gate.weight" in state:
        out["num_experts"] = state[f"{moe}gate.weight"].shape[0]
    if f"{moe}experts.0.gate_proj.weight" in state:
        width = state[f"{moe}experts.0.gate_proj.weight"].shape[0]
        out["moe_intermediate_size"] = width
        shared = state.get(f"{moe}shared_experts.gate_proj.weight")
        out["num_shared_experts"] = 0 if shared is None else shared.shape[0] // width
    return out


def glm4moe_config(fields: dict[str, Any], *, mask_token_id: int | None) -> transformers.Glm4MoeConfig:
    """The ``Glm4MoeConfig`` computing the same function as the LLaDA2 config ``fields`` (bidirectional)."""
    top_k = fields["num_experts_per_tok"]
    config = transformers.Glm4MoeConfig(
        vocab_size=fields["vocab_size"],
        hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"] or fields["hidden_size"],
        num_hidden_layers=fields["num_hidden_layers"],
        num_attention_heads=fields["num_attention_heads"],
        num_key_value_heads=fields["num_key_value_heads"],
        head_dim=fields["head_dim"],
        hidden_act="silu",
        max_position_embeddings=fields["max_position_embeddings"],
        rms_norm_eps=fields["rms_norm_eps"],
        tie_word_embeddings=fields["tie_word_embeddings"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": fields["rope_theta"],
            "partial_rotary_factor": fields["partial_rotary_factor"],
        },
        attention_bias=fields["use_qkv_bias"],  # Glm4Moe: q/k/v bias only, o_proj never has one
        attention_dropout=fields["attention_dropout"],
        moe_intermediate_size=fields["moe_intermediate_size"] or fields["hidden_size"],
        num_experts_per_tok=top_k,
        n_shared_experts=fields["num_shared_experts"],
        n_routed_experts=fields["num_experts"],
        routed_scaling_factor=fields["routed_scaling_factor"],
        n_group=fields["n_group"],
        topk_group=fields["topk_group"],
        first_k_dense_replace=fields["first_k_dense_replace"],
        norm_topk_prob=top_k > 1,  # the reference renormalises iff top_k > 1, whatever norm_topk_prob says
        use_qk_norm=fields["use_qk_norm"],
        num_mtp_layers=0,
        pad_token_id=fields["pad_token_id"],
        eos_token_id=fields["eos_token_id"],
        bos_token_id=fields["bos_token_id"],
        use_cache=False,
        is_causal=False,
    )
    config.mask_token_id = mask_token_id
    config.tide_teacher_family = FAMILY
    return config


def convert_llada2_state_dict(
    state: dict[str, torch.Tensor], fields: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Real LLaDA2 keys -> Glm4Moe keys: ``(native state, native key -> checkpoint key)``.

    Drops MTP layers (index >= num_hidden_layers). Fuses ``mlp.experts.{e}.{gate,up,down}_proj`` into
    ``mlp.experts.gate_up_proj [E, 2I, D]`` (gate rows first) and ``mlp.experts.down_proj [E, D, I]``.
    """
    heads, kv_heads, head_dim = fields["num_attention_heads"], fields["num_key_value_heads"], fields["head_dim"]
    split = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    native: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    top_level = {"model.word_embeddings.weight": "model.embed_tokens.weight"}
    for key, tensor in state.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
        if m is None:
            new = top_level.get(key, key)
            native[new], source[new] = tensor, key
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i >= fields["num_hidden_layers"]:
            continue  # multi-token-prediction layers (num_nextn_predict_layers > 0) are not used
        if (e := _EXPERT_KEY.match(rest)) is not None:
            experts.setdefault(i, {})[(int(e.group(1)), e.group(2))] = tensor
            continue
        prefix = f"model.layers.{i}."
        if rest.startswith("attention.query_key_value."):
            kind = rest.rsplit(".", 1)[1]
            if tensor.shape[0] == sum(split):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), torch.split(tensor, split, dim=0)):
                    native[f"{prefix}self_attn.{name}.{kind}"] = part
                    source[f"{prefix}self_attn.{name}.{kind}"] = key
                continue
        new = prefix + _RENAMES.get(rest, rest)
        native[new], source[new] = tensor, key
    for i, parts in experts.items():
        prefix = f"model.layers.{i}.mlp.experts."
        missing = [
            f"{prefix}{e}.{p}.weight"
            for e in range(fields["num_experts"])
            for p in ("gate_proj", "up_proj", "down_proj")
            if (e, p) not in parts
        ]
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} expert tensor(s), e.g. {missing[:3]}")
        n = fields["num_experts"]
        gate_up = [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], dim=0) for e in range(n)]
        native[f"{prefix}gate_up_proj"] = torch.stack(gate_up)
        native[f"{prefix}down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
        source[f"{prefix}gate_up_proj"] = f"{prefix}{{0..{n - 1}}}.{{gate,up}}_proj.weight"
        source[f"{prefix}down_proj"] = f"{prefix}{{0..{n - 1}}}.down_proj.weight"
        if fields["num_shared_experts"] == 0:  # Glm4Moe always builds the shared MLP; width 0 adds nothing
            d, shared = fields["hidden_size"], f"model.layers.{i}.mlp.shared_experts."
            native[f"{shared}gate_proj.weight"] = torch.zeros(0, d)
            native[f"{shared}up_proj.weight"] = torch.zeros(0, d)
            native[f"{shared}down_proj.weight"] = torch.zeros(d, 0)
    return native, source


def llada2_expert_slab(key: str, fields: dict[str, Any]) -> tuple[str, tuple[int | slice, ...]] | None:
    """Where one per-expert checkpoint tensor lies in the fused tensors of :func:`convert_llada2_state_dict`.

    ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` is ``gate_up_proj[e, :I]``, ``up_proj`` is
    ``gate_up_proj[e, I:]`` and ``down_proj`` is ``down_proj[e]``; ``None`` for any other key (and for the
    dropped multi-token-prediction layers).
    """
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", key)
    if m is None or int(m.group(1)) >= fields["num_hidden_layers"]:
        return None
    e = _EXPERT_KEY.match(m.group(2))
    if e is None:
        return None
    prefix, expert = f"model.layers.{m.group(1)}.mlp.experts.", int(e.group(1))
    width = fields["moe_intermediate_size"] or fields["hidden_size"]  # as glm4moe_config
    return {
        "gate_proj": (f"{prefix}gate_up_proj", (expert, slice(0, width))),
        "up_proj": (f"{prefix}gate_up_proj", (expert, slice(width, 2 * width))),
        "down_proj": (f"{prefix}down_proj", (expert,)),
    }[e.group(2)]


def plan_llada2_moe(path: str | os.PathLike) -> LoadPlan:
    """Check a local LLaDA2 checkpoint (config.json against the tensor shapes) and plan its load."""
    p, raw = read_config_json(path)
    check_model_type(p, raw, family=FAMILY, model_types=MODEL_TYPES)
    fields = llada2_fields(p, raw)
    tied = ("tie_word_embeddings", "lm_head.weight", "model.word_embeddings.weight") if fields["tie_word_embeddings"] else None
    check_structure(p, fields, _structure(shape_state(p, tied_head=tied), fields))
    config = glm4moe_config(fields, mask_token_id=resolve_mask_token_id(p, raw, token_strings=MASK_TOKEN_STRINGS))
    return LoadPlan(
        path=p,
        native_class=transformers.Glm4MoeForCausalLM,
        config=config,
        convert=lambda state: convert_llada2_state_dict(state, fields),
        tied_head=tied,
        slab=lambda key: llada2_expert_slab(key, fields),
    )


def load_llada2_moe(
    path: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.Glm4MoeForCausalLM:
    """A frozen (eval, no grad), bidirectional ``Glm4MoeForCausalLM`` from a local LLaDA2 checkpoint.

    ``path`` holds the real ``config.json`` (``model_type`` ``llada2_moe``) and safetensors with the real key
    names (single file or sharded). Structural fields are checked against the weights; ``config.mask_token_id``
    comes from config.json or the tokenizer files. Router weight and ``expert_bias`` stay fp32.
    """
    return materialize(plan_llada2_moe(path), attn_implementation=attn_implementation, dtype=dtype)


def teacher_forward_hidden(
    model: transformers.Glm4MoeForCausalLM,
    input_ids_BL: torch.Tensor,
    *,
    attention_mask_BL: torch.Tensor | None = None,
    position_ids_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional forward on one copy (docs/method.md §3.1): final-normed hidden ``[B, L, D]``, no LM head.

    Args:
        input_ids_BL: ``[B, L]`` teacher ids, masked positions already set to the teacher's mask id.
        attention_mask_BL: ``[B, L]`` 0/1 key padding; a padded query attends to itself only (finite, ignore
            it). ``None`` = no padding.
        position_ids_BL: RoPE positions, default ``arange(L)`` (what TIDE uses).

    Returns:
        ``[B, L, D]`` in the model dtype; logits are ``hidden @ lm_head_weight(model).T`` (the reference
        upcasts them to fp32).
    """
    return bidirectional_hidden(
        model, input_ids_BL, attention_mask_BL=attention_mask_BL, position_ids_BL=position_ids_BL
    )


def lm_head_weight(model: transformers.Glm4MoeForCausalLM) -> torch.Tensor:
    """The LM head ``[V, D]`` (the embedding itself when tied)."""
    return model.lm_head.weight


def tiny_llada2_moe_config(**overrides: Any) -> dict[str, Any]:
    """The ``tiny-llada2-moe`` config.json of docs/models.md §10 (0.474 M parameters), with ``overrides`` applied."""
    unknown = sorted(set(overrides) - set(_TINY) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown LLaDA2 config field(s) {unknown}; known: {sorted(set(_TINY) | set(_DEFAULTS))}")
    return {**_TINY, **overrides}


def write_tiny_llada2_moe_checkpoint(
    out_dir: str | os.PathLike, *, seed: int, shard: bool = False, **overrides: Any
) -> Path:
    """Write a random ``tiny-llada2-moe`` checkpoint in the real LLaDA2 layout (keys of docs/models.md §3.2).

    ``expert_bias ~ N(0, 0.05)`` (non-zero, some negative). ``overrides`` are config.json fields.
    """
    cfg = tiny_llada2_moe_config(**overrides)
    f = llada2_fields(Path(out_dir), cfg)
    init = TinyInit(seed)
    d, hd = f["hidden_size"], f["head_dim"]
    qkv_rows = (f["num_attention_heads"] + 2 * f["num_key_value_heads"]) * hd
    state: dict[str, torch.Tensor] = {"model.word_embeddings.weight": init.embedding(f["vocab_size"], d)}
    for i in range(f["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[f"{p}input_layernorm.weight"] = init.norm(d)
        state[f"{p}attention.query_key_value.weight"] = init.linear(qkv_rows, d)
        if f["use_qkv_bias"]:
            state[f"{p}attention.query_key_value.bias"] = init.bias(qkv_rows)
        if f["use_qk_norm"]:
            state[f"{p}attention.query_layernorm.weight"] = init.norm(hd)
            state[f"{p}attention.key_layernorm.weight"] = init.norm(hd)
        state[f"{p}attention.dense.weight"] = init.linear(d, f["num_attention_heads"] * hd)
        state[f"{p}post_attention_layernorm.weight"] = init.norm(d)
        if i < f["first_k_dense_replace"]:
            _mlp(state, f"{p}mlp.", init, d, f["intermediate_size"])
            continue
        state[f"{p}mlp.gate.weight"] = init.linear(f["num_experts"], d)
        state[f"{p}mlp.gate.expert_bias"] = init.normal(f["num_experts"], std=0.05)
        for e in range(f["num_experts"]):
            _mlp(state, f"{p}mlp.experts.{e}.", init, d, f["moe_intermediate_size"])
        if f["num_shared_experts"]:
            _mlp(state, f"{p}mlp.shared_experts.", init, d, f["moe_intermediate_size"] * f["num_shared_experts"])
    state["model.norm.weight"] = init.norm(d)
    if not f["tie_word_embeddings"]:
        state["lm_head.weight"] = init.linear(f["vocab_size"], d)
    return write_tiny_checkpoint(out_dir, cfg, state, shard=shard)


def _mlp(state: dict[str, torch.Tensor], prefix: str, init: TinyInit, d: int, width: int) -> None:
    state[f"{prefix}gate_proj.weight"] = init.linear(width, d)
    state[f"{prefix}up_proj.weight"] = init.linear(width, d)
    state[f"{prefix}down_proj.weight"] = init.linear(d, width)


def export_llada2_state_dict(native: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Glm4Moe keys -> the real LLaDA2 keys: the inverse of :func:`convert_llada2_state_dict`.

    Fuses ``q/k/v_proj`` into ``attention.query_key_value``, splits the fused experts back into
    ``mlp.experts.{e}.{gate,up,down}_proj``, drops the zero-width shared MLP Glm4Moe builds when the
    checkpoint has no shared experts, and drops a tied head.
    """
    inverse = {v: k for k, v in _RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in native.items():
        tensor = tensor.detach().cpu().contiguous()
        if key == "model.embed_tokens.weight":
            out["model.word_embeddings.weight"] = tensor
            continue
        if key == "lm_head.weight" and fields["tie_word_embeddings"]:
            continue
        m = re.match(r"^(model\.layers\.\d+\.)(.+)$", key)
        if m is None:
            out[key] = tensor
            continue
        prefix, rest = m.groups()
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            kind = rest.rsplit(".", 1)[1]
            if rest.startswith("self_attn.q_proj."):
                parts = [native[f"{prefix}self_attn.{n}.{kind}"].detach().cpu() for n in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}attention.query_key_value.{kind}"] = torch.cat(parts, dim=0).contiguous()
            continue
        if rest == "mlp.experts.gate_up_proj":
            width = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = tensor[e, :width].clone()
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = tensor[e, width:].clone()
            continue
        if rest == "mlp.experts.down_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = tensor[e].clone()
            continue
        if rest.startswith("mlp.shared_experts.") and fields["num_shared_experts"] == 0:
            continue
        out[prefix + inverse.get(rest, rest)] = tensor
    return out


def save_llada2_moe_checkpoint(
    model: transformers.Glm4MoeForCausalLM, out_dir: str | os.PathLike, config_json: dict[str, Any], *, shard: bool = False
) -> Path:
    """Write ``model`` as a real-layout LLaDA2 checkpoint with ``config_json`` (the fields it was built from)."""
    fields = llada2_fields(Path(out_dir), config_json)
    state = export_llada2_state_dict(model.state_dict(), fields)
    return write_tiny_checkpoint(out_dir, config_json, state, shard=shard)
