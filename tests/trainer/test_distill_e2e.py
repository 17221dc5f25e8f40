"""Pipeline-A distillation end to end: 2 CPU ranks, a tiny LLaDA2 MoE teacher beside the student."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_a_data import build_pipeline_a_dataset  # noqa: E402
from test_train_e2e import _run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_a(tmp_path_factory):
    from tide_ds.data.corpus import ensure_code_corpus
    from tide_ds.data.tokenizers import default_tokenizer_cache, ensure_qwen3_tokenizer
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint

    root = tmp_path_factory.mktemp("pipeline_a")
    tok = ensure_qwen3_tokenizer()
    corpus = ensure_code_corpus(tok, default_tokenizer_cache(), seq_len=64, block_size=16, heldout_fraction=0.03, max_files=60)
    data = build_pipeline_a_dataset(corpus, tok, root / "data", teacher_len=192, max_samples=120)
    teacher = write_tiny_llada2_moe_checkpoint(root / "teacher", seed=0, shard=True)
    return data, teacher


@pytest.mark.parametrize(
    "preset,placement,ds_config,term",
    [
        ("tide_cross", "zero3", "ds_configs/zero2.json", "calm_rev"),
        ("calm", "replicate", "ds_configs/zero3.json", "calm"),
        ("tide_shared", "auto", "ds_configs/zero2.json", "calm_tidal"),
    ],
)
def test_pipeline_a_presets_train_on_two_ranks(pipeline_a, tmp_path, preset, placement, ds_config, term):
    data, teacher = pipeline_a
    out = tmp_path / "run"
    proc = _run(out, f"--data.dataset={data}", f"--teacher.path={teacher}", f"--teacher.placement={placement}",
                f"--distill.preset={preset}", "--distill.pipeline=A", f"--train.ds_config={ds_config}",
                "--train.max_steps=8", "--train.eval_every=0")
    assert proc.returncode == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 9))
    assert all(r[term] > 0 and r["active_chunks"] > 0 for r in train.values())
    assert all(abs(r["loss"] - r["ce"] - r[term]) < 1e-3 * r["loss"] for r in train.values())  # weight 1
    assert (train[7]["loss"] + train[8]["loss"]) < (train[1]["loss"] + train[2]["loss"])
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert evals[8]["nll"] < evals[0]["nll"]
    if preset == "tide_shared":
        assert "CompDemo True" in proc.stdout and 0.1 <= train[8]["lambda_train"] <= 0.9
