"""Building the student from the config: a local checkpoint directory, checked against the tokenizer."""

import pytest
import torch

from tide_ds.builders import QWEN3_EMBEDDING_ROWS, build_student
from tide_ds.config import build_config
from tide_ds.data.tokenizers import SpecialIds
from tide_ds.models.qwen3 import save_student

SPECIAL = SpecialIds(mask_id=151669, eos_id=151645, pad_id=151643, vocab_size=151670)
SMALL = ["--model.hidden_size=16", "--model.intermediate_size=32", "--model.head_dim=8", "--model.num_layers=1"]


def test_fresh_student_has_real_qwen3_rows_and_mask_id():
    student = build_student(build_config(overrides=SMALL), special=SPECIAL)
    assert student.lm_head_weight.shape == (QWEN3_EMBEDDING_ROWS, 16)
    assert student.hf.config.mask_token_id == 151669 and student.hf.config.tie_word_embeddings


def test_student_loads_from_local_checkpoint_dir(tmp_path):
    torch.manual_seed(0)
    first = build_student(build_config(overrides=SMALL), special=SPECIAL)
    save_student(first, tmp_path / "ckpt", max_shard_bytes=2_000_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    again = build_student(build_config(overrides=[*SMALL, f"--model.path={tmp_path / 'ckpt'}"]), special=SPECIAL)
    x = torch.randint(0, 151000, (2, 32))
    torch.testing.assert_close(again(x, x), first(x, x), rtol=0, atol=0)


def test_checkpoint_and_tokenizer_mismatches_are_caught(tmp_path):
    student = build_student(build_config(overrides=SMALL), special=SPECIAL)
    save_student(student, tmp_path / "ckpt")
    cfg = build_config(overrides=[*SMALL, f"--model.path={tmp_path / 'ckpt'}"])
    other_mask = SpecialIds(mask_id=151668, eos_id=151645, pad_id=151643, vocab_size=151670)
    with pytest.raises(ValueError, match="mask_token_id=151669 but the tokenizer's mask token has id 151668"):
        build_student(cfg, special=other_mask)
    too_big = SpecialIds(mask_id=151669, eos_id=151645, pad_id=151643, vocab_size=200000)
    with pytest.raises(ValueError, match="has 200000 entries but the student .* has only 151936 embedding rows"):
        build_student(cfg, special=too_big)
    with pytest.raises(ValueError, match="model.path='/nonexistent' is not a directory"):
        build_student(build_config(overrides=["--model.path=/nonexistent"]), special=SPECIAL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU restriction only")
def test_flex_attention_training_rejected_on_cpu():
    with pytest.raises(ValueError, match="flex_attention' cannot train on the CPU"):
        build_student(build_config(overrides=[*SMALL, "--model.attn_implementation=flex_attention"]), special=SPECIAL)
