"""Teacher loading: host memory beyond the model stays below one read buffer; errors are found from headers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plan"))
MiB = 2**20

from real_size_world import LLADA2_CONFIG, WEDLM_CONFIG, llada2_shapes, qwen3_shapes, write_checkpoint  # noqa: E402

SMALL = {"hidden_size": 512, "vocab_size": 32768, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "max_window_layers": 2}


def _checkpoint(root: Path, family: str) -> Path:
    if family == "llada2_moe":
        c = {**LLADA2_CONFIG, **SMALL, "intermediate_size": 1024, "num_experts": 64, "moe_intermediate_size": 256,
             "n_group": 4, "topk_group": 2, "mask_token_id": 32000, "pad_token_id": 0, "eos_token_id": 0}
        return write_checkpoint(root / family, c, llada2_shapes(c), shards=2)
    c = {**WEDLM_CONFIG, **SMALL, "intermediate_size": 4096, "mask_token_id": 32000, "bos_token_id": 0,
         "eos_token_id": 0, "pad_token_id": 0}
    return write_checkpoint(root / family, c, qwen3_shapes(c))


@pytest.mark.parametrize("family,dtype", [("llada2_moe", "bfloat16"), ("wedlm", "float32")])
def test_replica_load_holds_no_second_copy(tmp_path, family, dtype):
    """A fresh process loads a ~100-270 MB replica on the CPU; its peak RSS over the model is below one buffer.

    bf16 reads straight into the parameters; fp32 converts through the 64 MiB read buffer. A full extra copy
    of any layer group (the MoE layer here is 25M parameters) or of the checkpoint would exceed the bound.
    """
    from tide_ds.teacher.reader import READ_BUFFER_BYTES

    ckpt = _checkpoint(tmp_path, family)
    bench = ROOT / "tests" / "benchmarks" / "bench_teacher_load_host.py"
    proc = subprocess.run([sys.executable, str(bench), "--worker", family, "load_replica", dtype, str(ckpt)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["peak_reset_ok"], r
    assert r["param_bytes"] > 100 * MiB and r["nonzero_params"] == 0, r
    over = r["peak_increase"] - r["param_bytes"]
    bound = (READ_BUFFER_BYTES if dtype == "float32" else 0) + 16 * MiB  # + allocator and Python noise
    assert over < bound, f"{family} {dtype}: {over / MiB:.1f} MiB over the model, bound {bound / MiB:.0f} MiB"
    assert r["peak_increase"] >= r["param_bytes"]  # the measurement sees the replica itself


def test_streamed_load_matches_whole_load_and_checks_headers(tmp_path):
    """Every family, sharded or not, in both dtypes: the same tensors as the whole-checkpoint load; a missing
    expert, a wrong shape and an untied saved head are errors named from the headers."""
    from safetensors.torch import load_file, save_file

    from tide_ds.models.adapter_glue import materialize
    from tide_ds.models.teachers import FAMILIES, get_family
    from tide_ds.teacher.loading import load_replica

    cpu = torch.device("cpu")
    for name in FAMILIES:
        fam = get_family(name)
        for shard in (False, True):
            ckpt = fam.write_tiny_checkpoint(tmp_path / f"{name}{shard}", seed=3, shard=shard)
            for dtype in (torch.float32, torch.bfloat16):
                whole = materialize(fam.plan(ckpt), attn_implementation="sdpa", dtype=dtype).state_dict()
                streamed = load_replica(fam.plan(ckpt), attn_implementation="sdpa", dtype=dtype, device=cpu).state_dict()
                assert whole.keys() == streamed.keys()
                for k in whole:
                    assert torch.equal(whole[k], streamed[k]), (name, shard, dtype, k)

    fam = get_family("llada2_moe")
    ckpt = fam.write_tiny_checkpoint(tmp_path / "broken", seed=0)
    state = load_file(ckpt / "model.safetensors")
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing or incomplete .*gate_up_proj \(63488 of 65536 elements\)"):
        load_replica(fam.plan(ckpt), attn_implementation="sdpa", dtype=torch.float32, device=cpu)
    bad = dict(state, **{"model.layers.1.mlp.experts.2.up_proj.weight": torch.zeros(3, 3)})
    save_file(bad, ckpt / "model.safetensors", metadata={"format": "pt"})
    plan = dataclasses.replace(fam.plan(fam.write_tiny_checkpoint(tmp_path / "good", seed=0)), path=ckpt)  # past plan()
    with pytest.raises(ValueError, match=r"experts.2.up_proj.weight has shape \(3, 3\)"):
        load_replica(plan, attn_implementation="sdpa", dtype=torch.float32, device=cpu)

    wedlm = get_family("wedlm")
    tied = wedlm.write_tiny_checkpoint(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    state = load_file(tied / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_replica(wedlm.plan(tied), attn_implementation="sdpa", dtype=torch.float32, device=cpu)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    model = load_replica(wedlm.plan(tied), attn_implementation="sdpa", dtype=torch.float32, device=cpu)
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
