"""The models of the deployment benchmark (tests/benchmarks/bench_deploy.py): real-size shapes and teacher decoding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from tide_ds.models import teachers
from tide_ds.sampling import SamplerConfig, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_deploy

#: Parameter counts of docs/models.md §9 (billions, tied embeddings counted once).
REAL_PARAMS_B = {"student": 0.596, "llada2_moe": 16.256, "wedlm": 8.191, "llada": 8.016, "dream": 7.616}


@pytest.mark.parametrize("name", list(REAL_PARAMS_B))
def test_real_size_shapes_match_the_published_models(name):
    config = bench_deploy.native_config(name, "real")
    cls = transformers.Qwen3ForCausalLM if name == "student" else teachers.get_family(name).native_class
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(REAL_PARAMS_B[name], abs=5e-4)
    assert config.mask_token_id < config.vocab_size


@pytest.mark.parametrize("name", ["student", *bench_deploy.TEACHERS])
def test_every_model_decodes_with_its_denoiser(name):
    model, make_denoiser = bench_deploy.build(name, "tiny", torch.device("cpu"), torch.float32)
    config = SamplerConfig(max_new_tokens=12, block_size=8, steps=6)  # blocks of 8 and 4 masks, 3 steps each
    prompt = [[3, 4, 5, 6, 7]]
    first = generate(make_denoiser(), prompt, config=config, mask_id=model.config.mask_token_id, pad_id=0)
    again = generate(make_denoiser(), prompt, config=config, mask_id=model.config.mask_token_id, pad_id=0)
    assert first.tokens == again.tokens and len(first.tokens[0]) == 12
    assert model.config.mask_token_id not in first.tokens[0]
    bd3lm = name in ("student", "wedlm")
    # BD3LM with the cache: the padded prompt once, each step on its block, block 1 once more when committed;
    # bidirectional teachers: the whole 20-position canvas at every step
    assert first.forward_calls == (1 + 3 + 1 + 3 if bd3lm else 3 + 3)
    assert first.forward_tokens == (8 + 3 * 8 + 8 + 3 * 4 if bd3lm else 6 * 20)
