"""Header-only checkpoints of the paper's real sizes (docs/models.md §12), a tiny dataset of the paper's
lengths, and the tokenizer files the teachers declare their mask tokens in.

Each safetensors file holds a real header (every key of the real layout, real shapes, bf16) and a data
section made by ``truncate``: a sparse file, so a 32.5 GB LLaDA2.0-mini checkpoint costs no disk. Only
headers are ever read by the planner; reading a weight would return zeros.

    python tests/plan/real_size_world.py OUT   # builds OUT/{llada2,wedlm,student,data_a,data_b}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LLADA2_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 16384, "rope_theta": 600000.0,
    "rope_scaling": None, "partial_rotary_factor": 0.5, "num_experts": 256, "num_experts_per_tok": 8,
    "num_shared_experts": 1, "moe_intermediate_size": 512, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True, "norm_topk_prob": True, "router_dtype": "fp32", "embedding_dropout": 0.0,
    "attention_dropout": 0.0, "output_dropout": 0.0, "use_sliding_window": False, "sliding_window": 4096,
    "norm_head": False, "num_nextn_predict_layers": 0, "pad_token_id": 156892, "eos_token_id": 156892,
    "torch_dtype": "bfloat16",
}
WEDLM_CONFIG = {
    "architectures": ["WeDLMForCausalLM"], "model_type": "wedlm", "vocab_size": 151936, "hidden_size": 4096,
    "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "max_position_embeddings": 16384, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36, "bos_token_id": 151643,
    "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": None, "torch_dtype": "bfloat16",
}
STUDENT_CONFIG = {
    "model_type": "a2d-qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "max_position_embeddings": 40960, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": True,
    "use_sliding_window": False, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}


def _mlp(out: dict, prefix: str, d: int, width: int) -> None:
    out[f"{prefix}gate_proj.weight"] = [width, d]
    out[f"{prefix}up_proj.weight"] = [width, d]
    out[f"{prefix}down_proj.weight"] = [d, width]


def llada2_shapes(c: dict) -> dict[str, list[int]]:
    """Every tensor of the LLaDA2 layout (docs/models.md §3.2): per-expert keys, fused qkv, expert_bias."""
    d, hd, h, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    out: dict[str, list[int]] = {"model.word_embeddings.weight": [c["vocab_size"], d]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"{p}input_layernorm.weight"] = [d]
        out[f"{p}attention.query_key_value.weight"] = [(h + 2 * kv) * hd, d]
        out[f"{p}attention.query_layernorm.weight"] = [hd]
        out[f"{p}attention.key_layernorm.weight"] = [hd]
        out[f"{p}attention.dense.weight"] = [d, h * hd]
        out[f"{p}post_attention_layernorm.weight"] = [d]
        if i < c["first_k_dense_replace"]:
            _mlp(out, f"{p}mlp.", d, c["intermediate_size"])
            continue
        out[f"{p}mlp.gate.weight"] = [c["num_experts"], d]
        out[f"{p}mlp.gate.expert_bias"] = [c["num_experts"]]
        for e in range(c["num_experts"]):
            _mlp(out, f"{p}mlp.experts.{e}.", d, c["moe_intermediate_size"])
        _mlp(out, f"{p}mlp.shared_experts.", d, c["moe_intermediate_size"] * c["num_shared_experts"])
    out["model.norm.weight"] = [d]
    out["lm_head.weight"] = [c["vocab_size"], d]
    return out


def qwen3_shapes(c: dict) -> dict[str, list[int]]:
    """Every tensor of the Qwen3 layout (WeDLM docs/models.md §4.2, student docs/models.md §7.2); no ``lm_head.weight`` when tied."""
    d, hd, h, kv, inter = (c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"],
                           c["intermediate_size"])
    out: dict[str, list[int]] = {"model.embed_tokens.weight": [c["vocab_size"], d]}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"{p}input_layernorm.weight"] = [d]
        out[f"{p}self_attn.q_proj.weight"] = [h * hd, d]
        out[f"{p}self_attn.k_proj.weight"] = [kv * hd, d]
        out[f"{p}self_attn.v_proj.weight"] = [kv * hd, d]
        out[f"{p}self_attn.o_proj.weight"] = [d, h * hd]
        out[f"{p}self_attn.q_norm.weight"] = [hd]
        out[f"{p}self_attn.k_norm.weight"] = [hd]
        out[f"{p}post_attention_layernorm.weight"] = [d]
        _mlp(out, f"{p}mlp.", d, inter)
    out["model.norm.weight"] = [d]
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = [c["vocab_size"], d]
    return out


def write_sparse_safetensors(path: Path, shapes: dict[str, list[int]], *, dtype: str = "BF16") -> int:
    """A safetensors file with a real header and a sparse (unwritten) data section; returns the data bytes."""
    itemsize = {"BF16": 2, "F32": 4}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        n = itemsize
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


def write_checkpoint(out: Path, config: dict, shapes: dict[str, list[int]], *, shards: int = 1) -> Path:
    """config.json + one file, or ``shards`` files and a ``model.safetensors.index.json`` (keys in order)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        write_sparse_safetensors(out / "model.safetensors", shapes)
        return out
    keys = list(shapes)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: shapes[k] for k in keys[i * per:(i + 1) * per]}
        total += write_sparse_safetensors(out / name, part)
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def write_mask_token(out: Path, token_id: int, content: str = "<|mask|>") -> None:
    """The tokenizer_config.json entry a checkpoint declares its mask token in (what the loaders read)."""
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(token_id): {"content": content, "special": True}}}))


def write_dataset(out: Path, *, pipeline: str, seq_len: int, teacher_seq_len: int, rows: int = 16) -> Path:
    """A pre-tokenized dataset with the columns and lengths of a paper pipeline (ids small, valid for both vocabularies)."""
    import datasets
    import numpy as np

    def split(n: int) -> datasets.Dataset:
        rng = np.random.default_rng(n)
        cols = {"input_ids": rng.integers(0, 1000, (n, seq_len)), "labels": rng.integers(0, 1000, (n, seq_len)),
                "teacher_input_ids": rng.integers(0, 1000, (n, teacher_seq_len)),
                "teacher_attention_mask": np.ones((n, teacher_seq_len), dtype=np.int64)}
        if pipeline == "A":
            cols["student_chunk_ids"] = np.tile(np.arange(seq_len) // 4, (n, 1))
            cols["teacher_chunk_ids"] = np.tile(np.arange(teacher_seq_len) // 8, (n, 1))
        else:
            cols["align_student"] = np.tile(np.arange(seq_len), (n, 1))
            cols["align_teacher"] = np.tile(np.arange(seq_len), (n, 1))
            cols["n_aligned"] = np.full((n,), seq_len)
        return datasets.Dataset.from_dict({k: v.tolist() for k, v in cols.items()})

    datasets.DatasetDict({"train": split(rows), "heldout": split(4)}).save_to_disk(str(out))
    return out


def build_world(root: Path, *, rows: int = 16) -> dict[str, Path]:
    llada2 = write_checkpoint(root / "llada2", LLADA2_CONFIG, llada2_shapes(LLADA2_CONFIG), shards=4)
    write_mask_token(llada2, 156895)
    wedlm = write_checkpoint(root / "wedlm", WEDLM_CONFIG, qwen3_shapes(WEDLM_CONFIG))
    student = write_checkpoint(root / "student", STUDENT_CONFIG, qwen3_shapes(STUDENT_CONFIG))
    return {
        "llada2": llada2, "wedlm": wedlm, "student": student,
        "data_a": write_dataset(root / "data_a", pipeline="A", seq_len=512, teacher_seq_len=1024, rows=rows),
        "data_b": write_dataset(root / "data_b", pipeline="B", seq_len=512, teacher_seq_len=768, rows=rows),
    }


if __name__ == "__main__":
    for name, path in build_world(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
