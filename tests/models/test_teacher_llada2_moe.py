"""LLaDA2.0-mini teacher on Glm4Moe (docs/models.md §3, §10 tiny-llada2-moe) against the plain-PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models import reference_impls as ref
from tide_ds.models.hf_weights import INDEX_NAME, load_safetensors_checkpoint, save_safetensors_checkpoint
from tide_ds.models.llada2_moe import (
    ZERO3_LEAF_MODULES,
    load_llada2_moe,
    teacher_forward_hidden,
    tiny_llada2_moe_config,
    write_tiny_llada2_moe_checkpoint,
)

B, L = 2, 12

VARIANTS = {
    "tiny": {},
    "ratio": {"num_experts": 32, "n_group": 8, "topk_group": 4, "num_shared_experts": 2},  # docs/models.md §10 optional
    "tied-qkv-bias": {"tie_word_embeddings": True, "use_qkv_bias": True},
    "no-shared-top1": {"num_shared_experts": 0, "num_experts_per_tok": 1, "first_k_dense_replace": 0},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llada2_moe_checkpoint(tmp_path_factory.mktemp("llada2") / "tiny", seed=0)


def _reference_logits(
    path: Path, ids: torch.Tensor, keep: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    state = load_safetensors_checkpoint(path)
    hidden = ref.llada2_hidden(cfg, state, ids, keep=keep, positions=positions)
    head = state["model.word_embeddings.weight"] if cfg["tie_word_embeddings"] else state["lm_head.weight"]
    return hidden @ head.T


def _logits(
    model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    hidden = teacher_forward_hidden(model, ids, attention_mask_BL=attention_mask, position_ids_BL=positions)
    return hidden @ model.lm_head.weight.T


def test_tiny_config_size_and_real_keys(tiny_dir: Path) -> None:
    state = load_safetensors_checkpoint(tiny_dir)
    assert state["model.layers.1.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 32, 64)
    assert state["model.layers.1.mlp.gate.expert_bias"].shape == (16,)
    assert (state["model.layers.1.mlp.gate.expert_bias"] < 0).any()
    assert "model.layers.0.mlp.gate_proj.weight" in state and "model.layers.0.mlp.gate.weight" not in state
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in state
    model = load_llada2_moe(tiny_dir)
    assert sum(p.numel() for p in model.parameters()) == 473_728  # 0.474 M (docs/models.md §10)
    assert model.config.is_causal is False and model.config.mask_token_id == 1203
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {type(m).__name__ for m in model.modules()} >= set(ZERO3_LEAF_MODULES)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, state["model.layers.1.mlp.gate.expert_bias"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference(tmp_path: Path, variant: str, generator: torch.Generator) -> None:
    path = write_tiny_llada2_moe_checkpoint(tmp_path / variant, seed=1, shard=variant == "ratio", **VARIANTS[variant])
    model = load_llada2_moe(path)
    ids = torch.randint(0, 1280, (B, L), generator=generator)
    torch.testing.assert_close(_logits(model, ids), _reference_logits(path, ids), atol=1e-5, rtol=0)
    shifted = torch.arange(L)[None] + 5  # RoPE follows position_ids (partial rotary: first head_dim/2 dims)
    torch.testing.assert_close(
        _logits(model, ids, positions=shifted), _reference_logits(path, ids, positions=shifted), atol=1e-5, rtol=0
    )
    valid = torch.ones(B, L, dtype=torch.long)
    valid[1, 7:] = 0
    got = _logits(model, ids, valid)
    want = _reference_logits(path, ids, ref.padding_keep(valid))
    torch.testing.assert_close(got[valid.bool()], want[valid.bool()], atol=1e-5, rtol=0)


def test_sharded_equals_single(tmp_path: Path, generator: torch.Generator) -> None:
    single = write_tiny_llada2_moe_checkpoint(tmp_path / "single", seed=2)
    sharded = write_tiny_llada2_moe_checkpoint(tmp_path / "sharded", seed=2, shard=True)
    assert (sharded / INDEX_NAME).is_file() and not (single / INDEX_NAME).exists()
    a, b = load_llada2_moe(single), load_llada2_moe(sharded)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_router_matches_reference_with_negative_bias(tiny_dir: Path, generator: torch.Generator) -> None:
    """Group-limited selection where out-of-group experts must be -inf, not 0, and the bias changes the choice."""
    model = load_llada2_moe(tiny_dir)
    router = model.model.layers[1].mlp.gate
    cfg = tiny_llada2_moe_config()
    kw = {k: cfg[k] for k in ("n_group", "topk_group", "routed_scaling_factor")}
    x = torch.randn(64, 64, generator=generator)
    bias = torch.full((16,), -0.8) + 0.3 * torch.randn(16, generator=generator)  # most biased scores < 0
    router.e_score_correction_bias.copy_(bias)
    _, weights, idx = router(x)
    chosen, want_w = ref.llada2_route(x, router.weight, bias, top_k=4, **kw)
    for t in range(x.shape[0]):
        got = dict(zip(idx[t].tolist(), weights[t].tolist()))
        assert sorted(got) == sorted(chosen[t])
        for e, w in zip(chosen[t], want_w[t]):
            assert got[e] == pytest.approx(w, abs=1e-6)
    # The case is sharp: filling excluded groups with 0.0 (DeepSeek-style) would select other experts.
    scores = torch.sigmoid(x.float() @ router.weight.float().T) + bias
    group = scores.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group).scatter_(1, group.topk(2, dim=-1).indices, 1).bool()
    zero_filled = scores.masked_fill(~keep.repeat_interleave(4, dim=1), 0.0).topk(4, dim=-1).indices
    assert any(sorted(zero_filled[t].tolist()) != sorted(chosen[t]) for t in range(x.shape[0]))
    # ... and the expert bias changes the selection (it is used for choosing, not weighting).
    unbiased, _ = ref.llada2_route(x, router.weight, torch.zeros(16), top_k=4, **kw)
    assert any(sorted(u) != sorted(c) for u, c in zip(unbiased, chosen))


def test_router_stays_fp32_in_bf16(tiny_dir: Path, generator: torch.Generator) -> None:
    model = load_llada2_moe(tiny_dir, dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1280, (B, L), generator=generator)
    hidden = teacher_forward_hidden(model, ids)
    want = teacher_forward_hidden(load_llada2_moe(tiny_dir), ids)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()
    # Loose: bf16 activations, and near-tie routing flips are possible.
    assert (hidden.float() - want).abs().mean() < 0.05


def test_mtp_layers_are_ignored(tmp_path: Path, tiny_dir: Path, generator: torch.Generator) -> None:
    state = load_safetensors_checkpoint(tiny_dir)
    extra = {k.replace("model.layers.2.", "model.layers.3."): v for k, v in state.items() if "layers.2." in k}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_safetensors_checkpoint({**state, **extra}, tmp_path)
    cfg = {**tiny_llada2_moe_config(), "num_nextn_predict_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 1280, (B, L), generator=generator)
    torch.testing.assert_close(_logits(load_llada2_moe(tmp_path), ids), _logits(load_llada2_moe(tiny_dir), ids))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_key_value_heads", 1, r"num_key_value_heads=1 but the weights imply num_key_value_heads=2"),
        ("num_experts", 8, r"num_experts=8 but the weights imply num_experts=16"),
        ("first_k_dense_replace", 2, r"first_k_dense_replace=2 but the weights imply first_k_dense_replace=1"),
        ("num_hidden_layers", 2, r"num_hidden_layers=2 but the weights imply num_hidden_layers=3"),
        ("head_dim", 16, r"head_dim=16 but the weights imply head_dim=32"),
        ("tie_word_embeddings", True, r"tie_word_embeddings=True but lm_head.weight differs from model.word_emb"),
        ("use_bias", True, r"unsupported use_bias=True \(expected False\)"),
        ("score_function", "softmax", r"unsupported score_function='softmax' \(expected 'sigmoid'\)"),
        ("n_group", 3, r"n_group=3, topk_group=2 do not form a valid group-limited router"),
    ],
)
def test_structural_mismatch_is_a_clear_error(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = write_tiny_llada2_moe_checkpoint(tmp_path / "ckpt", seed=0)
    (path / "config.json").write_text(json.dumps({**tiny_llada2_moe_config(), field: value}))
    with pytest.raises(ValueError, match=message) as info:
        load_llada2_moe(path)
    assert str(path) in str(info.value)


def test_missing_expert_is_a_clear_error(tmp_path: Path, tiny_dir: Path) -> None:
    state = load_safetensors_checkpoint(tiny_dir)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_safetensors_checkpoint(state, tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_llada2_moe(tmp_path)
