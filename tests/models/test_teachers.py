"""Teacher registry and the dense teachers (WeDLM, LLaDA, Dream) against the plain-PyTorch references.

docs/models.md §4-§6, §10; docs/method.md §3. The LLaDA2 MoE teacher has its own file
(``test_teacher_llada2_moe.py``); the bidirectional-mask tests below cover it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.models import reference_impls as ref
from tide_ds.models import dream, llada, wedlm
from tide_ds.models.hf_weights import INDEX_NAME, load_safetensors_checkpoint, save_safetensors_checkpoint
from tide_ds.models.teachers import FAMILIES, detect_family, get_family, load_teacher, teacher_family

B, L, K = 2, 16, 4
BIDIRECTIONAL = [name for name, family in FAMILIES.items() if family.bidirectional]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {name: family.write_tiny_checkpoint(root / name, seed=0) for name, family in FAMILIES.items()}


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "config.json").read_text()), load_safetensors_checkpoint(path)


def _ids(generator: torch.Generator, batch: int = B, length: int = L) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, length), generator=generator)


def _padding(batch: int = B, length: int = L) -> torch.Tensor:
    valid = torch.ones(batch, length, dtype=torch.long)
    valid[1, length - 5 :] = 0
    return valid


def _forward(name: str, model, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    family = get_family(name)
    if name == "wedlm":
        return family.forward_hidden(model, ids, x_0_BL=ids, block_size=K, attention_mask_BL=valid)
    return family.forward_hidden(model, ids, attention_mask_BL=valid)


# ------------------------------------------------------------------------------------------ registry


def test_detect_and_load_every_family(tiny_dirs: dict[str, Path]) -> None:
    for name, path in tiny_dirs.items():
        assert detect_family(path) == name
        model = load_teacher(path)
        assert isinstance(model, FAMILIES[name].native_class) and teacher_family(model).name == name
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert model.config.is_causal is (name == "wedlm")


def test_wrong_family_is_a_clear_error(tiny_dirs: dict[str, Path]) -> None:
    wrong = r"teacher.family='llada' but .*model_type='llada2_moe', a 'llada2_moe' checkpoint"
    with pytest.raises(ValueError, match=wrong):
        load_teacher(tiny_dirs["llada2_moe"], family="llada")
    with pytest.raises(ValueError, match=r"model_type='Dream' .* not a llada checkpoint"):
        llada.load_llada(tiny_dirs["dream"])
    with pytest.raises(ValueError, match=r"model_type='llada' .* not a wedlm checkpoint"):
        wedlm.load_wedlm(tiny_dirs["llada"])
    with pytest.raises(ValueError, match=r"teacher.family='bert' is not a known teacher family"):
        load_teacher(tiny_dirs["dream"], family="bert")
    with pytest.raises(ValueError, match="teacher.attn_implementation='flash_attention_2'"):
        load_teacher(tiny_dirs["dream"], attn_implementation="flash_attention_2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tiny_dirs["dream"] / "nope")


def test_plain_qwen3_needs_an_explicit_family(tmp_path: Path) -> None:
    path = wedlm.write_tiny_wedlm_checkpoint(tmp_path, seed=0, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    with pytest.raises(ValueError, match=r"model_type='qwen3'.*pass family='wedlm'"):
        load_teacher(path)
    assert teacher_family(load_teacher(path, family="wedlm")).name == "wedlm"


def test_mask_token_id_from_config_or_tokenizer(tmp_path: Path) -> None:
    path = dream.write_tiny_dream_checkpoint(tmp_path, seed=0)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["mask_token_id"]
    (path / "config.json").write_text(json.dumps(cfg))
    added = {"added_tokens_decoder": {"1010": {"content": "<|mask|>", "special": True}}}
    (path / "tokenizer_config.json").write_text(json.dumps(added))
    assert load_teacher(path).config.mask_token_id == 1010
    (path / "config.json").write_text(json.dumps({**cfg, "mask_token_id": 1011}))
    with pytest.raises(ValueError, match=r"mask_token_id=1011 but the tokenizer maps '<\|mask\|>' to 1010"):
        load_teacher(path)


# ------------------------------------------------------------------------------ parity with references


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", [{}, {"weight_tying": True}, {"n_kv_heads": 2}], ids=["untied", "tied", "gqa"])
def test_llada_matches_reference(tmp_path: Path, variant: dict, shard: bool, generator: torch.Generator) -> None:
    path = llada.write_tiny_llada_checkpoint(tmp_path, seed=3, shard=shard, **variant)
    assert (path / INDEX_NAME).is_file() is shard
    if variant.get("weight_tying"):
        assert "model.transformer.ff_out.weight" not in load_safetensors_checkpoint(path)
    model = llada.load_llada(path)
    cfg, state = _read(path)
    ids, valid = _ids(generator), _padding()
    got = llada.teacher_forward_hidden(model, ids, attention_mask_BL=valid) @ llada.lm_head_weight(model).T
    want = ref.llada_hidden(cfg, state, ids, keep=ref.padding_keep(valid)) @ ref.llada_head(cfg, state).T
    torch.testing.assert_close(got[valid.bool()], want[valid.bool()], atol=1e-5, rtol=0)
    if variant.get("weight_tying"):
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dream_matches_reference_and_shifts(tmp_path: Path, tied: bool, generator: torch.Generator) -> None:
    path = dream.write_tiny_dream_checkpoint(tmp_path, seed=4, shard=tied, tie_word_embeddings=tied)
    model = dream.load_dream(path)
    cfg, state = _read(path)
    ids, valid = _ids(generator), _padding()
    raw = dream.teacher_forward_hidden(model, ids, attention_mask_BL=valid, right_shift=False)
    want = ref.qwen_hidden(cfg, state, ids, keep=ref.padding_keep(valid), qk_norm=False) @ ref.qwen_head(cfg, state).T
    got = raw @ dream.lm_head_weight(model).T
    torch.testing.assert_close(got[valid.bool()], want[valid.bool()], atol=1e-5, rtol=0)
    shifted = dream.teacher_forward_hidden(model, ids, attention_mask_BL=valid)
    assert torch.equal(shifted[:, 1:], raw[:, :-1]) and torch.equal(shifted[:, 0], raw[:, 0])


@pytest.mark.parametrize("concat_order", ["x0_xt", "xt_x0"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_wedlm_bd3lm_matches_reference(
    tiny_dirs: dict[str, Path], concat_order: str, padded: bool, generator: torch.Generator
) -> None:
    path = tiny_dirs["wedlm"]
    model = wedlm.load_wedlm(path)
    cfg, state = _read(path)
    x_0 = _ids(generator)
    masked = torch.rand(B, L, generator=generator) < 0.5
    x_t = torch.where(masked, torch.full_like(x_0, model.config.mask_token_id), x_0)
    valid = _padding() if padded else None
    got = wedlm.teacher_forward_hidden(
        model, x_t, x_0_BL=x_0, block_size=K, attention_mask_BL=valid, concat_order=concat_order
    ) @ wedlm.lm_head_weight(model).T
    clean_first = concat_order == "x0_xt"
    keep = ref.bd3lm_keep(L, K, clean_first=clean_first)
    if valid is not None:
        keep = keep & ref.padding_keep(valid.repeat(1, 2))
    ids = torch.cat([x_0, x_t] if clean_first else [x_t, x_0], dim=1)
    hidden = ref.qwen_hidden(cfg, state, ids, keep=keep, positions=torch.arange(L).repeat(2)[None], qk_norm=True)
    want = (hidden[:, L:] if clean_first else hidden[:, :L]) @ ref.qwen_head(cfg, state).T
    rows = torch.ones(B, L, dtype=torch.bool) if valid is None else valid.bool()
    torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=0)


def test_wedlm_xt_half_depends_only_on_allowed_keys(tiny_dirs: dict[str, Path], generator: torch.Generator) -> None:
    """x_t block b sees x_t block b and x_0 blocks < b (transitively nothing else), docs/method.md §2.3."""
    model = wedlm.load_wedlm(tiny_dirs["wedlm"])
    x_0, x_t = _ids(generator), _ids(generator)
    base = wedlm.teacher_forward_hidden(model, x_t, x_0_BL=x_0, block_size=K)
    b = 2
    rows = slice(b * K, (b + 1) * K)

    def changed(x_t_new: torch.Tensor, x_0_new: torch.Tensor) -> bool:
        out = wedlm.teacher_forward_hidden(model, x_t_new, x_0_BL=x_0_new, block_size=K)
        return not torch.allclose(out[:, rows], base[:, rows], atol=1e-6, rtol=0)

    def edit(x: torch.Tensor, cols: slice) -> torch.Tensor:
        y = x.clone()
        y[:, cols] = (y[:, cols] + 7) % 1000
        return y

    assert not changed(x_t, edit(x_0, slice(b * K, L)))  # clean blocks >= b
    assert not changed(edit(x_t, slice(0, b * K)), x_0)  # other noisy blocks
    assert not changed(edit(x_t, slice((b + 1) * K, L)), x_0)
    assert changed(x_t, edit(x_0, slice((b - 1) * K, b * K)))  # clean block b - 1
    assert changed(edit(x_t, rows), x_0)  # own noisy block


def test_wedlm_checks_inputs(tiny_dirs: dict[str, Path]) -> None:
    model = wedlm.load_wedlm(tiny_dirs["wedlm"])
    ids = torch.zeros(1, L, dtype=torch.long)
    with pytest.raises(ValueError, match="distill.concat_order='x0_x0'"):
        wedlm.teacher_forward_hidden(model, ids, x_0_BL=ids, block_size=K, concat_order="x0_x0")
    with pytest.raises(ValueError, match="not a multiple of diffusion.block_size=5"):
        wedlm.teacher_forward_hidden(model, ids, x_0_BL=ids, block_size=5)
    with pytest.raises(ValueError, match="x_0 shape"):
        wedlm.teacher_forward_hidden(model, ids, x_0_BL=ids[:, :8], block_size=K)


# --------------------------------------------------------------------------- bidirectional mask hygiene


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_padding_gives_no_nan_and_leaves_real_rows_alone(
    tiny_dirs: dict[str, Path], name: str, generator: torch.Generator
) -> None:
    model = load_teacher(tiny_dirs[name])
    ids = _ids(generator)
    valid = _padding()
    valid[0] = 0  # a fully padded sequence too
    valid[0, 0] = 1
    hidden = _forward(name, model, ids, valid)
    assert torch.isfinite(hidden).all()
    n = int(valid[1].sum())
    alone = _forward(name, model, ids[1:, :n])
    torch.testing.assert_close(hidden[1, :n], alone[0], atol=1e-5, rtol=0)
    other_pad = ids.clone()
    other_pad[~valid.bool()] = 999
    # Not bit-exact for the MoE: other pad tokens change the experts' token batches (matmul blocking).
    torch.testing.assert_close(_forward(name, model, other_pad, valid)[1, :n], hidden[1, :n], atol=1e-5, rtol=0)
    all_pad = torch.zeros_like(valid)
    assert torch.isfinite(_forward(name, model, ids, all_pad)).all()


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_and_eager_equals_sdpa(tiny_dirs: dict[str, Path], name: str, generator: torch.Generator) -> None:
    sdpa = load_teacher(tiny_dirs[name])
    eager = load_teacher(tiny_dirs[name], attn_implementation="eager")
    ids = _ids(generator)
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 1000
    assert not torch.allclose(_forward(name, sdpa, ids)[:, 0], _forward(name, sdpa, later)[:, 0])
    valid = _padding()
    torch.testing.assert_close(_forward(name, eager, ids, valid), _forward(name, sdpa, ids, valid), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- structural mismatches


@pytest.mark.parametrize(
    ("name", "field", "value", "message"),
    [
        ("llada", "n_kv_heads", 2, r"n_kv_heads=2 but the weights imply n_kv_heads=4"),
        ("llada", "d_model", 32, r"d_model=32 but the weights imply d_model=64"),
        ("llada", "mlp_hidden_size", 256, r"mlp_hidden_size=256 but the weights imply mlp_hidden_size=128"),
        ("llada", "weight_tying", True, r"weight_tying=True but model.transformer.ff_out.weight differs from"),
        ("llada", "block_type", "sequential", r"unsupported block_type='sequential' \(expected 'llama'\)"),
        ("llada", "include_bias", True, r"unsupported include_bias=True \(expected False\)"),
        ("wedlm", "head_dim", 16, r"head_dim=16 but the weights imply head_dim=32"),
        ("wedlm", "num_key_value_heads", 4, r"num_key_value_heads=4 but the weights imply num_key_value_heads=2"),
        ("wedlm", "use_sliding_window", True, r"unsupported use_sliding_window=True \(expected False\)"),
        ("dream", "num_hidden_layers", 3, r"num_hidden_layers=3 but the weights imply num_hidden_layers=2"),
        ("dream", "intermediate_size", 96, r"intermediate_size=96 but the weights imply intermediate_size=128"),
        ("dream", "vocab_size", 2048, r"vocab_size=2048 but the weights imply vocab_size=1024"),
    ],
)
def test_structural_mismatch_is_a_clear_error(
    tiny_dirs: dict[str, Path], tmp_path: Path, name: str, field: str, value: object, message: str
) -> None:
    cfg, state = _read(tiny_dirs[name])
    save_safetensors_checkpoint(state, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=message) as info:
        load_teacher(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_field_and_bad_tied_head(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg, state = _read(tiny_dirs["llada"])
    save_safetensors_checkpoint(state, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "weight_tying"}))
    with pytest.raises(ValueError, match=r"lacks LLaDA field\(s\) \['weight_tying'\]"):
        load_teacher(tmp_path)
    cfg, state = _read(tiny_dirs["dream"])
    save_safetensors_checkpoint(state, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"tie_word_embeddings=True but lm_head.weight differs from"):
        load_teacher(tmp_path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a saved alias of a tied head is fine
    save_safetensors_checkpoint(state, tmp_path)
    assert load_teacher(tmp_path).config.tie_word_embeddings
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_safetensors_checkpoint(state, tmp_path)
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\) \['model.layers.1.self_attn.k_proj.bias'\]"):
        load_teacher(tmp_path)


def test_llada2_export_round_trip(tmp_path):
    import torch

    from tide_ds.models.hf_weights import load_safetensors_checkpoint
    from tide_ds.models.llada2_moe import (
        load_llada2_moe,
        save_llada2_moe_checkpoint,
        tiny_llada2_moe_config,
        write_tiny_llada2_moe_checkpoint,
    )

    src = write_tiny_llada2_moe_checkpoint(tmp_path / "src", seed=3)
    model = load_llada2_moe(src)
    dst = save_llada2_moe_checkpoint(model, tmp_path / "dst", tiny_llada2_moe_config(), shard=True)
    a, b = load_safetensors_checkpoint(src), load_safetensors_checkpoint(dst)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 1200, (2, 16))
    torch.testing.assert_close(load_llada2_moe(dst)(ids).logits, model(ids).logits, rtol=0, atol=0)
