"""``--model.loss_implementation=triton`` against ``pytorch`` in the trainer: 2 CPU ranks, Triton's interpreter.

One pipeline-A run (TIDE-Cross: CE + Reverse CALM, a tiny LLaDA2 teacher) per implementation, on the same
data and seeds. The Triton run goes through every wired kernel path: the student's fused CE + Reverse CALM
(training steps), the fused CE alone (held-out evaluation) and the teacher's target log-probs. The two
runs must log the same losses, step by step.

Why a byte-level student tokenizer (258 entries) and not the Qwen3 tokenizer of the other trainer tests:
the interpreter executes every tile program in Python, and its cost grows with the vocabulary (one
16-wide tile per 16 entries): at V = 151,670 one step takes hours, at V = 258 about a second.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    # Skipped before the trainer imports: a bare GPU image (run_gpu_checks.sh) lacks datasets and DeepSpeed.
    pytest.skip("an interpreter test (the GPU checks run the compiled kernels)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from pipeline_a_data import build_pipeline_a_dataset  # noqa: E402
from test_train_e2e import _run  # noqa: E402

pytestmark = pytest.mark.slow

SEQ_LEN, BLOCK, BYTE_EOS, BYTE_MASK = 32, 16, 256, 257


def _byte_tokenizer(out: Path) -> Path:
    """A byte-level BPE without merges: 256 byte tokens (GPT-2 alphabet), ``<|endoftext|>``, ``<|mask|>``."""
    from transformers import PreTrainedTokenizerFast

    from tide_ds.data.tokenizers import MASK_TOKEN, QWEN2_PATTERN, tiktoken_backend

    ranks = out.parent / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    backend = tiktoken_backend(ranks, pattern=QWEN2_PATTERN, regular_vocab=256,
                               added_tokens=((BYTE_EOS, "<|endoftext|>", True),), mask_id=BYTE_MASK, name="bytes")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", mask_token=MASK_TOKEN)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def byte_world(tmp_path_factory):
    from tide_ds.data.corpus import ensure_code_corpus
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint

    root = tmp_path_factory.mktemp("byte_world")
    tok = _byte_tokenizer(root / "tokenizer")
    corpus = ensure_code_corpus(tok, root / "cache", seq_len=SEQ_LEN, block_size=BLOCK, heldout_fraction=0.05,
                                max_files=8, max_train_samples=64, max_heldout_samples=8)
    # Teacher ids are bytes, so its vocabulary needs only the 256 bytes and its pad/mask tokens.
    data = build_pipeline_a_dataset(corpus, tok, root / "data", teacher_len=SEQ_LEN, teacher_pad=BYTE_EOS, max_samples=64)
    teacher = write_tiny_llada2_moe_checkpoint(root / "teacher", seed=0, vocab_size=272, pad_token_id=BYTE_EOS,
                                               eos_token_id=BYTE_EOS, mask_token_id=BYTE_MASK)
    return tok, data, teacher


def _records(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in rows if r["kind"] == "train"}, {r["step"]: r for r in rows if r["kind"] == "eval"})


def test_triton_loss_implementation_matches_reference_on_two_ranks(byte_world, tmp_path):
    tok, data, teacher = byte_world
    runs = {}
    for implementation in ("pytorch", "triton"):
        out = tmp_path / implementation
        proc = _run(out, f"--model.tokenizer={tok}", f"--data.dataset={data}", f"--data.seq_len={SEQ_LEN}",
                    f"--diffusion.block_size={BLOCK}", "--data.eval_samples=8", f"--teacher.path={teacher}",
                    "--teacher.placement=replicate", "--distill.preset=tide_cross", "--distill.pipeline=A",
                    "--train.max_steps=3", "--train.eval_every=0", f"--model.loss_implementation={implementation}")
        assert proc.returncode == 0
        assert f"LM-head losses (student loss, teacher log-probs): {implementation} implementation" in proc.stdout + proc.stderr
        runs[implementation] = _records(out)
    (ref_train, ref_eval), (tri_train, tri_eval) = runs["pytorch"], runs["triton"]
    assert sorted(ref_train) == sorted(tri_train) == [1, 2, 3]
    assert sorted(ref_eval) == sorted(tri_eval) == [0, 3]
    for step in ref_train:
        for key in ("loss", "ce", "calm_rev", "active_chunks", "grad_norm"):
            ref, tri = ref_train[step][key], tri_train[step][key]
            # fp32 on both sides; the kernels sum in another order (tiles, atomics): last-bit differences,
            # amplified a little by the optimizer steps in between.
            assert tri == pytest.approx(ref, rel=1e-4, abs=1e-6), f"step {step} {key}: triton {tri} vs reference {ref}"
        assert ref_train[step]["calm_rev"] > 0 and ref_train[step]["active_chunks"] > 0
    for step in ref_eval:
        for key in ("nll", "masked_ce"):
            assert tri_eval[step][key] == pytest.approx(ref_eval[step][key], rel=1e-4), f"eval step {step} {key}"
