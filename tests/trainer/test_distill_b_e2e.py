"""Pipeline-B distillation end to end: 2 CPU ranks, a tiny WeDLM teacher with the student's tokenizer.

The dataset comes from the real offline preprocessing (``--pipeline B``: Qwen3 chat format for the
student, WeDLM's for the teacher, position pairs verified by token identity). Each preset runs a few
optimizer steps on two ranks whose data differ; the distillation term must be positive and the loss
must fall.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import _run  # noqa: E402

pytestmark = pytest.mark.slow

SEQ, TEACHER_SEQ, BLOCK = 128, 256, 16
QWEN3_VOCAB_ROWS = 151680  # > every Qwen3 id (151669 = <|mask|>), like the real 151936-row embeddings


@pytest.fixture(scope="module")
def pipeline_b(tmp_path_factory):
    from tide_ds.data.instruct_corpus import build_instruct_jsonl
    from tide_ds.data.preprocess import PreprocessConfig, preprocess
    from tide_ds.data.tokenizers import ensure_qwen3_tokenizer
    from tide_ds.models.wedlm import write_tiny_wedlm_checkpoint

    root = tmp_path_factory.mktemp("pipeline_b")
    tok = ensure_qwen3_tokenizer()
    chats, _ = build_instruct_jsonl(root / "chats.jsonl", max_files=30, heldout_fraction=0.2)
    result = preprocess(PreprocessConfig(
        pipeline="B", input=chats, student_tokenizer=tok, teacher_tokenizer=tok, out=root / "data",
        seq_len=SEQ, teacher_seq_len=TEACHER_SEQ, block_size=BLOCK, heldout_fraction=0.2, limit=160,
    ))
    assert result.summary["pairs"]["total"] > 0
    # WeDLM's real ids: <|endoftext|> 151643 pads, <|im_end|> 151645 ends a turn, 151665 is its mask symbol.
    teacher = write_tiny_wedlm_checkpoint(
        root / "teacher", seed=0, vocab_size=QWEN3_VOCAB_ROWS, hidden_size=32, intermediate_size=64, head_dim=16,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, mask_token_id=151665,
    )
    return result.out, teacher


def _train_records(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in records if r["kind"] == "train"}, {r["step"]: r for r in records if r["kind"] == "eval"})


@pytest.mark.parametrize(
    "args,terms,aligned",
    [
        (["--distill.preset=kl"], ("kl",), True),
        (["--distill.preset=tide_cross", "--distill.pipeline=B", "--train.ds_config=ds_configs/zero3.json",
          "--teacher.placement=zero3"], ("kl_rev",), True),
        (["--distill.preset=tide_shared", "--distill.pipeline=B", "--distill.tidal_timestep_weight=midrange"],
         ("tidal",), True),
        (["--distill.mode=taid+kl", "--distill.comp_demo=true", "--distill.kl_weight=0.5"], ("tidal", "kl"), False),
    ],
    ids=["kl", "tide_cross_B-zero3", "tide_shared_B", "taid+kl-nonaligned-compdemo"],
)
def test_pipeline_b_presets_train_on_two_ranks(pipeline_b, tmp_path, args, terms, aligned):
    data, teacher = pipeline_b
    out = tmp_path / "run"
    proc = _run(out, f"--data.dataset={data}", f"--teacher.path={teacher}", f"--data.seq_len={SEQ}",
                f"--diffusion.block_size={BLOCK}", "--train.micro_batch_size=2", "--train.max_steps=8",
                "--train.eval_every=0", *args)
    assert proc.returncode == 0
    train, evals = _train_records(out)
    assert sorted(train) == list(range(1, 9))
    weights = {"kl": 0.5 if "--distill.kl_weight=0.5" in args else 1.0, "kl_rev": 1.0, "tidal": 1.0}
    for r in train.values():
        assert all(r[term] > 0 for term in terms), r
        assert r["distill_rows"] > 0
        expected = r["ce"] + sum(weights[t] * r[t] for t in terms)
        assert abs(r["loss"] - expected) < 1e-3 * r["loss"], r
        if aligned:
            assert r["aligned_pairs"] >= r["distill_rows"]
        else:
            assert "aligned_pairs" not in r
    assert (train[7]["loss"] + train[8]["loss"]) < (train[1]["loss"] + train[2]["loss"])
    assert evals[8]["nll"] < evals[0]["nll"]
    if "tidal" in terms:
        assert 0.1 <= train[8]["lambda_train"] <= 0.9


def test_pipeline_b_aligned_mode_needs_pairs(pipeline_b, tmp_path):
    """A non-aligned dataset (student columns only) for an aligned mode fails before training, naming the fix."""
    import datasets

    from tide_ds.builders import build_data
    from tide_ds.config import build_config

    data, teacher = pipeline_b
    plain = tmp_path / "plain"
    ds = datasets.load_from_disk(str(data))
    datasets.DatasetDict({k: v.select_columns(["input_ids", "labels"]) for k, v in ds.items()}).save_to_disk(str(plain))
    for mode, ok in (("kl_aligned", False), ("kl", True)):
        cfg = build_config(overrides=[f"--data.dataset={plain}", f"--teacher.path={teacher}", f"--data.seq_len={SEQ}",
                                      f"--diffusion.block_size={BLOCK}", f"--distill.mode={mode}"])
        if ok:  # the non-aligned modes need the student columns only
            assert build_data(cfg, rank=0, world_size=1).num_train > 0
            continue
        with pytest.raises(ValueError, match=r"needs a pipeline-B dataset .*align_student.*--pipeline B"):
            build_data(cfg, rank=0, world_size=1)
