"""safetensors checkpoints in the Hugging Face layout: single file, sharded with an index, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tide_ds.models.hf_weights import (
    INDEX_NAME,
    SINGLE_NAME,
    list_checkpoint_keys,
    load_safetensors_checkpoint,
    save_safetensors_checkpoint,
)


def _state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.randn(40, 8, generator=generator),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.1.mlp.down_proj.weight": torch.randn(8, 24, generator=generator).t(),  # non-contiguous
        "model.norm.weight": torch.randn(8, generator=generator),
        "step": torch.tensor(7, dtype=torch.int64),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_save_load_single_file(tmp_path: Path, generator: torch.Generator) -> None:
    state = _state(generator)
    names = save_safetensors_checkpoint(state, tmp_path / "ckpt", metadata={"source": "test"})
    assert names == [SINGLE_NAME]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [SINGLE_NAME]
    _assert_same(load_safetensors_checkpoint(tmp_path / "ckpt"), state)
    assert list_checkpoint_keys(tmp_path / "ckpt") == sorted(state)
    with safe_open(str(tmp_path / "ckpt" / SINGLE_NAME), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "source": "test"}


def test_save_load_sharded_with_index(tmp_path: Path, generator: torch.Generator) -> None:
    state = _state(generator)
    out = tmp_path / "ckpt"
    # 40x8 fp32 = 1280 bytes is larger than the limit: it gets a shard of its own.
    names = save_safetensors_checkpoint(state, out, max_shard_bytes=600)
    n = len(names)
    assert n >= 3
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"] == {"total_size": total}
    assert sorted(index["weight_map"]) == sorted(state)
    assert set(index["weight_map"].values()) == set(names)
    for name in names:
        with safe_open(str(out / name), framework="pt") as fh:
            keys = set(fh.keys())
            assert keys == {k for k, f in index["weight_map"].items() if f == name}
            size = sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in keys)
            assert size <= 600 or len(keys) == 1
    _assert_same(load_safetensors_checkpoint(out), state)
    assert list_checkpoint_keys(out) == sorted(state)


def test_resave_removes_stale_layout_and_keeps_other_files(tmp_path: Path, generator: torch.Generator) -> None:
    state = _state(generator)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    sharded = save_safetensors_checkpoint(state, out, max_shard_bytes=600)
    save_safetensors_checkpoint(state, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_NAME]
    again = save_safetensors_checkpoint(state, out, max_shard_bytes=600)
    assert again == sharded
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", INDEX_NAME, *sharded])
    _assert_same(load_safetensors_checkpoint(out), state)


def test_shared_storage_is_saved(tmp_path: Path) -> None:
    flat = torch.arange(12, dtype=torch.float32)
    state = {"a": flat[:6].view(2, 3), "b": flat[6:], "tied": flat[:6].view(2, 3)}
    save_safetensors_checkpoint(state, tmp_path)
    _assert_same(load_safetensors_checkpoint(tmp_path), {k: v.clone() for k, v in state.items()})


def test_load_errors(tmp_path: Path, generator: torch.Generator) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safetensors_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in .*empty"):
        load_safetensors_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no weights"):
        list_checkpoint_keys(tmp_path / "empty")
    out = tmp_path / "sharded"
    names = save_safetensors_checkpoint(_state(generator), out, max_shard_bytes=600)
    (out / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=names[1]):
        load_safetensors_checkpoint(out)


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty state_dict"):
        save_safetensors_checkpoint({}, tmp_path)
    with pytest.raises(ValueError, match="max_shard_bytes=0"):
        save_safetensors_checkpoint({"a": torch.ones(2)}, tmp_path, max_shard_bytes=0)
    with pytest.raises(TypeError, match="metadata"):
        save_safetensors_checkpoint({"a": torch.ones(2)}, tmp_path, metadata={"n": 3})  # type: ignore[dict-item]
