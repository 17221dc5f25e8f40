"""Independent plain-PyTorch reference implementations of the four teachers, written from docs/models.md.

Oracles for the adapter tests: they read the **real checkpoint key names** and config.json fields directly
(no key conversion, no transformers, nothing from ``tide_ds.models``), loop where the spec describes a loop
(MoE routing is brute force per token), and build the BD3LM mask from the predicate of docs/method.md §2.3.

Shared pieces (docs/models.md §2.1): RMSNorm in fp32 then cast, then weight; half-split RoPE with
``inv_freq[j] = theta^(-2j/rot_dim)``, rotating only dims ``[0, rot_dim)``; attention scale
``head_dim^-0.5``, GQA by head groups, softmax in fp32; SwiGLU ``down(silu(gate(x)) * up(x))``.

Every ``*_hidden`` function returns the final-normed hidden states ``[B, L, D]``; ``keep`` is a bool
``[B, 1, L, L]`` keep-mask (True = attend; ``None`` = all) and ``positions`` ``[B|1, L]`` (default arange).

Legend: B batch, L length, D hidden, H query heads, G kv heads, T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope(x_BHLd: Tensor, positions_BL: Tensor, *, rot_dim: int, theta: float, fp32: bool = False) -> Tensor:
    """Half-split RoPE on dims ``[0, rot_dim)`` of every head; the rest passes through."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    angles = positions_BL.float()[:, :, None] * inv_freq[None, None, :]  # [B, L, rot/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, L, rot]
    work = x_BHLd.float() if fp32 else x_BHLd
    cos, sin = angles.cos().to(work.dtype), angles.sin().to(work.dtype)
    rot, rest = work[..., :rot_dim], work[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = torch.cat([rot * cos + rotated * sin, rest], dim=-1)
    return out.to(x_BHLd.dtype)


def attention(q_BHLd: Tensor, k_BGLd: Tensor, v_BGLd: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax attention with GQA (query head h reads kv head ``h // (H/G)``); returns ``[B, L, H*d]``."""
    heads, groups = q_BHLd.shape[1], k_BGLd.shape[1]
    kv_of_head = torch.arange(heads) // (heads // groups)
    k, v = k_BGLd[:, kv_of_head], v_BGLd[:, kv_of_head]
    scores = (q_BHLd @ k.transpose(-1, -2)) * q_BHLd.shape[-1] ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q_BHLd.dtype)
    out = probs @ v  # [B, H, L, d]
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _mlp(x: Tensor, state: dict[str, Tensor], prefix: str) -> Tensor:
    """SwiGLU with the Qwen/Bailing names ``{prefix}{gate,up,down}_proj.weight``."""
    gate, up, down = (state[f"{prefix}{name}_proj.weight"] for name in ("gate", "up", "down"))
    return swiglu(x, gate, up, down)


def _positions(ids_BL: Tensor, positions: Tensor | None) -> Tensor:
    return torch.arange(ids_BL.shape[1])[None] if positions is None else positions


def _heads(x_BLX: Tensor, head_dim: int) -> Tensor:
    b, l, _ = x_BLX.shape
    return x_BLX.view(b, l, -1, head_dim).transpose(1, 2)


# ------------------------------------------------------------------------------------ LLaDA2 (docs/models.md §3)


def llada2_route(
    x_TD: Tensor,
    gate_weight: Tensor,
    expert_bias: Tensor,
    *,
    n_group: int,
    topk_group: int,
    top_k: int,
    routed_scaling_factor: float,
) -> tuple[list[list[int]], list[list[float]]]:
    """docs/models.md §3.3, token by token: (selected experts, their weights) per token, in selection order."""
    scores_TE = torch.sigmoid(x_TD.float() @ gate_weight.float().T)
    n_experts = scores_TE.shape[1]
    per_group = n_experts // n_group
    chosen_all, weights_all = [], []
    for scores in scores_TE:
        biased = [float(s) + float(b) for s, b in zip(scores, expert_bias.float())]
        group_score = []
        for g in range(n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(members[0] + members[1])
        kept_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in kept_groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:top_k]
        weights = [float(scores[e]) for e in chosen]  # unbiased scores
        if top_k > 1:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        chosen_all.append(chosen)
        weights_all.append([w * routed_scaling_factor for w in weights])
    return chosen_all, weights_all


def _llada2_moe(x_BLD: Tensor, state: dict[str, Tensor], prefix: str, cfg: dict[str, Any]) -> Tensor:
    x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
    chosen, weights = llada2_route(
        x_TD,
        state[f"{prefix}gate.weight"],
        state[f"{prefix}gate.expert_bias"],
        n_group=cfg["n_group"],
        topk_group=cfg["topk_group"],
        top_k=cfg["num_experts_per_tok"],
        routed_scaling_factor=cfg["routed_scaling_factor"],
    )
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for t in range(x_TD.shape[0]):
        for e, w in zip(chosen[t], weights[t]):
            out_TD[t] += w * _mlp(x_TD[t], state, f"{prefix}experts.{e}.").float()
    out = out_TD.to(x_BLD.dtype).view_as(x_BLD)
    if f"{prefix}shared_experts.gate_proj.weight" in state:
        out = out + _mlp(x_BLD, state, f"{prefix}shared_experts.")
    return out


def llada2_hidden(
    cfg: dict[str, Any],
    state: dict[str, Tensor],
    ids_BL: Tensor,
    *,
    keep: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """LLaDA2 MoE forward from the real keys (fused ``query_key_value``, per-expert weights, ``expert_bias``)."""
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, pos = cfg["rms_norm_eps"], _positions(ids_BL, positions)
    rot_dim = int(hd * cfg["partial_rotary_factor"])
    h = state["model.word_embeddings.weight"][ids_BL]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, state[f"{p}input_layernorm.weight"], eps)
        qkv_proj = state[f"{p}attention.query_key_value.weight"], state.get(f"{p}attention.query_key_value.bias")
        qkv = F.linear(x, *qkv_proj)
        qkv = qkv.view(*qkv.shape[:2], heads + 2 * kv, hd)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads : heads + kv], qkv[:, :, heads + kv :]
        if cfg["use_qk_norm"]:
            q = rms_norm(q, state[f"{p}attention.query_layernorm.weight"], eps)
            k = rms_norm(k, state[f"{p}attention.key_layernorm.weight"], eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q = rope(q, pos, rot_dim=rot_dim, theta=cfg["rope_theta"])
        k = rope(k, pos, rot_dim=rot_dim, theta=cfg["rope_theta"])
        h = h + F.linear(attention(q, k, v, keep), state[f"{p}attention.dense.weight"])
        x = rms_norm(h, state[f"{p}post_attention_layernorm.weight"], eps)
        if i < cfg["first_k_dense_replace"]:
            h = h + _mlp(x, state, f"{p}mlp.")
        else:
            h = h + _llada2_moe(x, state, f"{p}mlp.", cfg)
    return rms_norm(h, state["model.norm.weight"], eps)


# ------------------------------------------------------------------------------------- LLaDA (docs/models.md §5)


def llada_hidden(
    cfg: dict[str, Any],
    state: dict[str, Tensor],
    ids_BL: Tensor,
    *,
    keep: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """LLaDA-8B (block_type llama) forward from the OLMo keys; RoPE rotated in fp32 (``rope_full_precision``)."""
    d, heads = cfg["d_model"], cfg["n_heads"]
    hd, eps, pos = d // heads, cfg["rms_norm_eps"], _positions(ids_BL, positions)
    h = state["model.transformer.wte.weight"][ids_BL]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        x = rms_norm(h, state[f"{p}attn_norm.weight"], eps)
        q = _heads(F.linear(x, state[f"{p}q_proj.weight"]), hd)
        k = _heads(F.linear(x, state[f"{p}k_proj.weight"]), hd)
        v = _heads(F.linear(x, state[f"{p}v_proj.weight"]), hd)
        q = rope(q, pos, rot_dim=hd, theta=cfg["rope_theta"], fp32=True)
        k = rope(k, pos, rot_dim=hd, theta=cfg["rope_theta"], fp32=True)
        h = h + F.linear(attention(q, k, v, keep), state[f"{p}attn_out.weight"])
        x = rms_norm(h, state[f"{p}ff_norm.weight"], eps)
        h = h + swiglu(x, state[f"{p}ff_proj.weight"], state[f"{p}up_proj.weight"], state[f"{p}ff_out.weight"])
    return rms_norm(h, state["model.transformer.ln_f.weight"], eps)


def llada_head(cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    return state["model.transformer.wte.weight"] if cfg["weight_tying"] else state["model.transformer.ff_out.weight"]


# ------------------------------------------------------------------------ Qwen-style: WeDLM (docs/models.md §4), Dream (docs/models.md §6)


def qwen_hidden(
    cfg: dict[str, Any],
    state: dict[str, Tensor],
    ids_BL: Tensor,
    *,
    keep: Tensor | None = None,
    positions: Tensor | None = None,
    qk_norm: bool,
) -> Tensor:
    """Qwen3 (``qk_norm=True``, WeDLM) or Qwen2 (q/k/v biases, Dream) forward from the real Qwen keys."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    eps, pos = cfg["rms_norm_eps"], _positions(ids_BL, positions)
    h = state["model.embed_tokens.weight"][ids_BL]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, state[f"{p}input_layernorm.weight"], eps)
        q, k, v = (
            F.linear(x, state[f"{p}self_attn.{n}_proj.weight"], state.get(f"{p}self_attn.{n}_proj.bias"))
            for n in ("q", "k", "v")
        )
        q, k, v = (t.view(*t.shape[:2], -1, hd) for t in (q, k, v))
        if qk_norm:
            q = rms_norm(q, state[f"{p}self_attn.q_norm.weight"], eps)
            k = rms_norm(k, state[f"{p}self_attn.k_norm.weight"], eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q = rope(q, pos, rot_dim=hd, theta=cfg["rope_theta"])
        k = rope(k, pos, rot_dim=hd, theta=cfg["rope_theta"])
        o_proj = state[f"{p}self_attn.o_proj.weight"], state.get(f"{p}self_attn.o_proj.bias")
        h = h + F.linear(attention(q, k, v, keep), *o_proj)
        x = rms_norm(h, state[f"{p}post_attention_layernorm.weight"], eps)
        h = h + _mlp(x, state, f"{p}mlp.")
    return rms_norm(h, state["model.norm.weight"], eps)


def qwen_head(cfg: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    return state["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else state["lm_head.weight"]


def bd3lm_keep(seq_len: int, block_size: int, *, clean_first: bool) -> Tensor:
    """``[1, 1, 2L, 2L]`` keep-mask from docs/method.md §2.3 / docs/models.md §4.3, written element by element."""
    n = 2 * seq_len
    keep = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            q_half, k_half = q // seq_len, k // seq_len
            q_block, k_block = (q % seq_len) // block_size, (k % seq_len) // block_size
            q_clean = q_half == (0 if clean_first else 1)
            k_clean = k_half == (0 if clean_first else 1)
            same = q_block == k_block and q_half == k_half
            noisy_reads_clean_past = (not q_clean) and k_clean and k_block < q_block
            clean_reads_clean = q_clean and k_clean and k_block <= q_block
            keep[q, k] = same or noisy_reads_clean_past or clean_reads_clean
    return keep[None, None]


def padding_keep(valid_BL: Tensor) -> Tensor:
    """Key padding; a padded query keeps only itself (the rows compared in tests are the valid ones)."""
    valid = valid_BL.bool()
    return ((valid[:, :, None] & valid[:, None, :]) | torch.eye(valid.shape[1], dtype=torch.bool))[:, None]
