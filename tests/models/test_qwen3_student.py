"""BD3LM student on transformers' Qwen3 (docs/models.md §7, §10 tiny-qwen3-bd3lm; docs/method.md §2.2-§2.5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from tide_ds.models.block_mask import dense_bd3lm_mask
from tide_ds.models.hf_weights import INDEX_NAME, SINGLE_NAME, list_checkpoint_keys
from tide_ds.models.qwen3 import BD3LMStudent, build_student, load_student, save_student, tiny_student_config

L, K, B = 64, 8, 2  # 2L = 128: FlexAttention on CPU needs >= 128 tokens (docs/models.md §2.2)


def _ids(generator: torch.Generator, batch: int = B, length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    x_0 = torch.randint(0, 1000, (batch, length), generator=generator)
    x_t = torch.where(torch.rand(batch, length, generator=generator) < 0.5, torch.full_like(x_0, 1010), x_0)
    return x_t, x_0


def _student(*, attn: str = "sdpa", tied: bool = True, seed: int = 0) -> BD3LMStudent:
    config = tiny_student_config()
    config.tie_word_embeddings = tied
    return BD3LMStudent(build_student(config, attn_implementation=attn, seed=seed), block_size=K)


def test_tiny_student_config() -> None:
    config = tiny_student_config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (1024, 64, 128)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (2, 4, 2)
    assert config.head_dim == 32 and config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-6
    assert config.tie_word_embeddings and config.is_causal is False
    ids = (config.mask_token_id, config.eos_token_id, config.pad_token_id, config.bos_token_id)
    assert ids == (1010, 1002, 1000, None)
    hf = build_student(config)
    assert sum(p.numel() for p in hf.parameters()) == 164_288  # 0.164 M (docs/models.md §10)


def test_build_student_seed_and_errors() -> None:
    config = tiny_student_config()
    rng_before = torch.random.get_rng_state()
    a, b = build_student(config, seed=3), build_student(config, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.is_causal is False and a.lm_head.weight is a.model.embed_tokens.weight
    assert build_student(config, dtype=torch.bfloat16).model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2'"):
        build_student(config, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="model.attn_implementation='eager' but the model was built with 'sdpa'"):
        BD3LMStudent(a, block_size=K, attn_implementation="eager")


def test_forward_checks_inputs(generator: torch.Generator) -> None:
    student = _student()
    x_t, x_0 = _ids(generator)
    with pytest.raises(ValueError, match="same shape"):
        student(x_t, x_0[:, :K])
    with pytest.raises(ValueError, match="same shape"):
        student(x_t[0], x_0[0])
    with pytest.raises(ValueError, match="diffusion.block_size=8"):
        student(x_t[:, :12], x_0[:, :12])


def test_forward_matches_hf_4d_mask_route(generator: torch.Generator) -> None:
    """The dict-of-masks call equals transformers' own handling of a 4-D mask; the x_t half is first."""
    student = _student()
    x_t, x_0 = _ids(generator)
    with torch.no_grad():
        hidden = student(x_t, x_0)
        ref = student.hf.model(
            input_ids=torch.cat([x_t, x_0], 1),
            attention_mask=dense_bd3lm_mask(L, K),
            position_ids=torch.arange(L).repeat(2)[None],
            use_cache=False,
        ).last_hidden_state
    assert hidden.shape == (B, L, 64)
    torch.testing.assert_close(hidden, ref[:, :L], atol=0, rtol=0)
    logits = student.logits(hidden)
    assert logits.shape == (B, L, 1024)
    assert student.lm_head_weight is student.hf.model.embed_tokens.weight


@pytest.mark.slow  # ~30 s on 2 CPU cores: FlexAttention compiles its CPU kernel
def test_backends_agree(generator: torch.Generator) -> None:
    x_t, x_0 = _ids(generator)
    out = {}
    for attn in ("sdpa", "eager", "flex_attention"):
        student = _student(attn=attn).eval()  # FlexAttention has no CPU backward: forward only
        with torch.no_grad():
            out[attn] = student(x_t, x_0)
    torch.testing.assert_close(out["eager"], out["sdpa"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["flex_attention"], out["sdpa"], atol=1e-5, rtol=0)


def _changed_blocks(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per block of the x_t half, whether any hidden state moved."""
    diff = (a - b).abs().amax(dim=-1)[0]  # [L]
    return (diff.view(-1, K) > 1e-6).any(dim=1).tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bd3lm_semantics(attn: str, generator: torch.Generator) -> None:
    student = _student(attn=attn)
    x_t, x_0 = _ids(generator, batch=1)
    n_blocks, beta = L // K, 3
    pos = beta * K + K - 1  # last token of block beta
    with torch.no_grad():
        base = student(x_t, x_0)
        # x_0 token in block beta: only x_t blocks > beta see it (offset block-causal).
        x_0b = x_0.clone()
        x_0b[0, pos] = (x_0b[0, pos] + 1) % 1000
        changed = _changed_blocks(base, student(x_t, x_0b))
        assert changed == [b > beta for b in range(n_blocks)]
        # x_t token in block beta: only block beta sees it, and every position of it (bidirectional).
        x_tb = x_t.clone()
        x_tb[0, pos] = (x_tb[0, pos] + 7) % 1000
        moved = student(x_tb, x_0)
    assert _changed_blocks(base, moved) == [b == beta for b in range(n_blocks)]
    block_diff = (moved - base).abs().amax(dim=-1)[0, beta * K : (beta + 1) * K]
    assert torch.all(block_diff > 1e-6), "the first position of the block must see its last token (non-causal)"


def test_student_trains(generator: torch.Generator) -> None:
    student = _student(seed=1)
    x_t, x_0 = _ids(generator)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        logits = student.logits(student(x_t, x_0))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x_0.flatten())

    before = loss()
    before.backward()
    optimizer.step()
    assert student.lm_head_weight.grad is not None and student.lm_head_weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert loss() < before.detach() - 1e-3


def _hidden_and_logits(student: BD3LMStudent, x_t: torch.Tensor, x_0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        hidden = student(x_t, x_0)
        return hidden, student.logits(hidden)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("max_shard_bytes", [None, 100_000], ids=["single", "sharded"])
def test_save_load_round_trip(
    tmp_path: Path, generator: torch.Generator, tied: bool, max_shard_bytes: int | None
) -> None:
    student = _student(tied=tied)
    x_t, x_0 = _ids(generator)
    save_student(student, tmp_path, max_shard_bytes=max_shard_bytes)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["is_causal"] is False and config["mask_token_id"] == 1010
    assert config["tie_word_embeddings"] is tied
    keys = list_checkpoint_keys(tmp_path)
    assert ("lm_head.weight" in keys) is not tied
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_norm.weight", "model.layers.1.mlp.down_proj.weight"} <= set(keys)
    assert len(keys) == 24 + (not tied)
    assert (tmp_path / INDEX_NAME).is_file() is (max_shard_bytes is not None)
    if max_shard_bytes is None:
        with safe_open(str(tmp_path / SINGLE_NAME), framework="pt") as fh:
            assert fh.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [128, 64]

    loaded = load_student(tmp_path)
    assert isinstance(loaded, transformers.Qwen3ForCausalLM) and loaded.config.is_causal is False
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    assert loaded.config.mask_token_id == 1010
    for got, want in zip(_hidden_and_logits(BD3LMStudent(loaded, block_size=K), x_t, x_0),
                         _hidden_and_logits(student, x_t, x_0)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    # transformers' own loader reads the same files (interoperability of the layout).
    native = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
    for key, value in student.hf.state_dict().items():
        assert torch.equal(native.state_dict()[key], value), key


def test_load_a2d_model_type_and_dtype(tmp_path: Path) -> None:
    save_student(_student(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # As dllm's converter writes it from a Qwen3 config.json: legacy rope_theta, torch_dtype, no is_causal.
    del config["rope_parameters"], config["dtype"], config["is_causal"]
    config.update(model_type="a2d-qwen3", auto_map={"AutoModel": "modeling_a2d.A2DQwen3Model"},
                  architectures=["A2DQwen3LMHeadModel"], rope_theta=1e6, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_student(tmp_path, attn_implementation="eager", dtype=torch.bfloat16)
    assert loaded.config.model_type == "qwen3" and loaded.config.is_causal is False
    assert loaded.config._attn_implementation == "eager"
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.config.rope_parameters["rope_theta"] == 1e6


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_load_student_errors(tmp_path: Path) -> None:
    from tide_ds.models.hf_weights import load_safetensors_checkpoint, save_safetensors_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_student(tmp_path / "missing")
    good = tmp_path / "good"
    save_student(_student(), good)

    bad = tmp_path / "llama"
    save_student(_student(), bad)
    _edit_config(bad, model_type="llama")
    with pytest.raises(ValueError, match=r"llama.*model_type='llama'"):
        load_student(bad)
    _edit_config(bad, model_type="qwen3", head_dim=None)
    with pytest.raises(ValueError, match=r"lacks structural field\(s\) \['head_dim'\]"):
        load_student(bad)

    state = load_safetensors_checkpoint(good)
    missing = tmp_path / "missing_key"
    save_student(_student(), missing)
    save_safetensors_checkpoint({k: v for k, v in state.items() if k != "model.norm.weight"}, missing)
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['model.norm.weight'\], 0 unexpected"):
        load_student(missing)

    extra = tmp_path / "extra_key"
    save_student(_student(), extra)
    save_safetensors_checkpoint({**state, "model.layers.2.mlp.up_proj.weight": torch.ones(2)}, extra)
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) \['model.layers.2.mlp.up_proj.weight'\]"):
        load_student(extra)

    shape = tmp_path / "shape"
    save_student(_student(), shape)
    _edit_config(shape, intermediate_size=96)
    with pytest.raises(ValueError, match="wrong shape.*mlp"):
        load_student(shape)

    head = tmp_path / "bad_tied_head"
    save_student(_student(), head)
    save_safetensors_checkpoint({**state, "lm_head.weight": torch.zeros(1024, 64)}, head)
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
        load_student(head)
    # An lm_head alias equal to the embedding (as older savers write it) is accepted and tied.
    save_safetensors_checkpoint({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, head)
    loaded = load_student(head)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
