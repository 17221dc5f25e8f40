import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))


@pytest.mark.slow
def test_pretrained_teacher_learns_and_loads_as_llada2(tmp_path):
    from pipeline_a_data import build_pipeline_a_dataset

    from tide_ds.data.corpus import ensure_code_corpus
    from tide_ds.data.tokenizers import default_tokenizer_cache, ensure_qwen3_tokenizer
    from tide_ds.models.teachers import detect_family, load_teacher
    from tide_ds.worlds.pretrain import pretrain_llada2_teacher

    tok = ensure_qwen3_tokenizer()
    corpus = ensure_code_corpus(tok, default_tokenizer_cache(), seq_len=64, block_size=16, heldout_fraction=0.03, max_files=60)
    data = build_pipeline_a_dataset(corpus, tok, tmp_path / "data", teacher_len=96, max_samples=64)
    result = pretrain_llada2_teacher(data, tmp_path / "teacher", vocab_size=1280, mask_token_id=1203,
                                     eos_token_id=1200, steps=25, batch_size=4, lr=1e-2)
    assert result["heldout_nll"] < result["heldout_nll_before"] - 1.0, result
    assert detect_family(tmp_path / "teacher") == "llada2_moe"
    model = load_teacher(tmp_path / "teacher")
    assert model.config.mask_token_id == 1203
    with pytest.raises(ValueError, match="exists"):
        pretrain_llada2_teacher(data, tmp_path / "teacher", vocab_size=1280, mask_token_id=1203, eos_token_id=1200)


@pytest.mark.slow
def test_pretrained_wedlm_teacher_learns_and_loads_as_wedlm(tmp_path):
    from tide_ds.data.instruct_corpus import build_instruct_jsonl
    from tide_ds.data.preprocess import PreprocessConfig, preprocess
    from tide_ds.data.tokenizers import ensure_qwen3_tokenizer
    from tide_ds.models.teachers import detect_family, load_teacher
    from tide_ds.worlds.pretrain import pretrain_wedlm_teacher

    tok = ensure_qwen3_tokenizer()
    chats, _ = build_instruct_jsonl(tmp_path / "chats.jsonl", max_files=30, heldout_fraction=0.2)
    data = preprocess(PreprocessConfig(pipeline="B", input=chats, student_tokenizer=tok, teacher_tokenizer=tok,
                                       out=tmp_path / "data", seq_len=128, teacher_seq_len=160, block_size=16,
                                       heldout_fraction=0.2, limit=120)).out
    small = dict(hidden_size=32, intermediate_size=64, head_dim=16, tie_word_embeddings=True)
    # The teacher shares the student's tokenizer, so its mask is the tokenizer's <|mask|> (151669); the
    # loader checks config.json against the tokenizer files copied beside the weights.
    result = pretrain_wedlm_teacher(data, tmp_path / "teacher", vocab_size=151680, mask_token_id=151669,
                                    eos_token_id=151645, pad_token_id=151643, block_size=16, steps=25, batch_size=4,
                                    lr=1e-2, config=small, tokenizer_dir=tok)
    assert result["heldout_nll"] < result["heldout_nll_before"] - 1.0, result
    assert detect_family(tmp_path / "teacher") == "wedlm"
    model = load_teacher(tmp_path / "teacher")
    assert model.config.mask_token_id == 151669 and model.config.vocab_size == 151680
    assert (tmp_path / "teacher" / "tokenizer.json").is_file()
