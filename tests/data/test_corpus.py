"""The standard-library corpus: file list, split by file, sample layout, determinism, caching."""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pytest

from tide_ds.data.corpus import (
    EXCLUDED_DIRS,
    META_FILE,
    _tokenized_files,
    build_code_corpus,
    ensure_code_corpus,
    split_of,
    stdlib_root,
    stdlib_source_files,
)
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, load_tokenizer
from tide_ds.utils.files import sha256_file

SEQ_LEN, BLOCK = 64, 16
EOS, PAD = 151645, 151643


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same path as in test_tokenizers.py, so the session builds the tokenizer once."""
    return ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


@pytest.fixture(scope="session")
def corpus(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "stdlib"
    return build_code_corpus(qwen3_dir, out, seq_len=SEQ_LEN, block_size=BLOCK, heldout_fraction=0.2, max_files=10)


def _relpaths() -> list[str]:
    root = stdlib_root()
    return [p.relative_to(root).as_posix() for p in stdlib_source_files()]


def _tree_digest(path: Path) -> dict[str, str]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_stdlib_source_files() -> None:
    relpaths = _relpaths()
    assert len(relpaths) > 300 and relpaths == sorted(relpaths) and len(set(relpaths)) == len(relpaths)
    assert {"os.py", "json/decoder.py", "asyncio/base_events.py"} <= set(relpaths)
    assert all(p.endswith(".py") and not EXCLUDED_DIRS & set(p.split("/")[:-1]) for p in relpaths)
    assert not any(p.startswith(("idlelib/idle_test/", "lib2to3/tests/", "test/")) for p in relpaths)


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.2])
def test_split_is_by_file_and_deterministic(fraction: float) -> None:
    relpaths = _relpaths()
    splits = [split_of(p, heldout_fraction=fraction) for p in relpaths]
    assert splits == [split_of(p, heldout_fraction=fraction) for p in relpaths]
    heldout = splits.count("heldout")
    assert 0 < heldout < len(relpaths) and set(splits) == {"train", "heldout"}
    assert abs(heldout / len(relpaths) - fraction) < 4 * (fraction / len(relpaths)) ** 0.5 + 0.005
    # Held-out sets are nested as the fraction grows: a file never moves back to train.
    assert all(split_of(p, heldout_fraction=0.5) == "heldout" for p, s in zip(relpaths, splits) if s == "heldout")


def test_split_rejects_bad_fraction() -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"world.heldout_fraction={bad}"):
            split_of("os.py", heldout_fraction=bad)


def test_sample_layout(corpus: Path) -> None:
    splits = datasets.load_from_disk(str(corpus))
    assert set(splits) == {"train", "heldout"} and len(splits["train"]) > 0 and len(splits["heldout"]) > 0
    for name in splits:
        ds = splits[name]
        assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["labels"].feature.dtype == "int32"
        ids_NL = np.asarray(ds.with_format("numpy")["input_ids"])
        labels_NL = np.asarray(ds.with_format("numpy")["labels"])
        assert ids_NL.shape == labels_NL.shape == (len(ds), SEQ_LEN)
        for ids, labels in zip(ids_NL, labels_NL):
            n = int(np.argmax(ids == EOS))  # source tokens before the first EOS
            assert ids[n] == EOS and n >= 1 and EOS not in ids[:n] and PAD not in ids[:n]
            end = -(-(n + 1) // BLOCK) * BLOCK  # EOS block padding ends on a block boundary
            assert (ids[n:end] == EOS).all() and (ids[end:] == PAD).all()
            assert (labels[:end] == ids[:end]).all() and (labels[end:] == -100).all()


def test_samples_reassemble_each_file(corpus: Path, qwen3_dir: Path) -> None:
    tokenizer = load_tokenizer(qwen3_dir)
    splits = datasets.load_from_disk(str(corpus))
    for name in splits:
        pieces: dict[str, list[int]] = {}
        for row in splits[name]:
            ids = row["input_ids"]
            pieces.setdefault(row["source"], []).extend(ids[: ids.index(EOS)])
            assert split_of(row["source"], heldout_fraction=0.2) == name
        for source, ids in pieces.items():
            text = (stdlib_root() / source).read_text(encoding="utf-8")
            assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text), source
    # A control token's string inside a source file stays text: no EOS or mask can be injected.
    assert not {EOS, 151669} & set(_tokenized_files(tokenizer, ["x = '<|im_end|><|mask|>'"])[0])


def test_meta(corpus: Path, qwen3_dir: Path) -> None:
    meta = json.loads((corpus / META_FILE).read_text())
    splits = datasets.load_from_disk(str(corpus))
    assert (meta["seq_len"], meta["block_size"], meta["heldout_fraction"]) == (SEQ_LEN, BLOCK, 0.2)
    assert meta["tokenizer_sha256"] == sha256_file(qwen3_dir / "tokenizer.json")
    assert meta["special_ids"] == {"eos": EOS, "pad": PAD, "mask": 151669}
    for name in ("train", "heldout"):
        stats, ds = meta["splits"][name], splits[name]
        assert stats["samples"] == len(ds) and stats["files"] == len(set(ds["source"]))
        assert stats["tokens"] == sum(row.index(EOS) for row in ds["input_ids"])
        assert stats["label_tokens"] == sum(sum(x != -100 for x in row) for row in ds["labels"])
    assert meta["splits"]["train"]["files"] + meta["splits"]["heldout"]["files"] == 10
    assert meta["total_tokens"] == meta["splits"]["train"]["tokens"] + meta["splits"]["heldout"]["tokens"]


def test_build_is_deterministic(qwen3_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(seq_len=32, block_size=8, heldout_fraction=0.3, max_files=4)
    a = build_code_corpus(qwen3_dir, tmp_path / "a", **kwargs)
    b = build_code_corpus(qwen3_dir, tmp_path / "b", **kwargs)
    assert _tree_digest(a) == _tree_digest(b)
    train_a, train_b = (datasets.load_from_disk(str(p))["train"] for p in (a, b))
    assert train_a["input_ids"] == train_b["input_ids"] and train_a["source"] == train_b["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging leftovers


def test_sample_limits_and_overwrite(qwen3_dir: Path, tmp_path: Path) -> None:
    out = build_code_corpus(qwen3_dir, tmp_path / "c", seq_len=32, block_size=8, max_files=6,
                            max_train_samples=5, max_heldout_samples=2)
    splits = datasets.load_from_disk(str(out))
    assert (len(splits["train"]), len(splits["heldout"])) == (5, 2)
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        build_code_corpus(qwen3_dir, out, seq_len=32, block_size=8, max_files=6)
    with pytest.raises(ValueError, match="heldout split .* would be empty"):
        build_code_corpus(qwen3_dir, tmp_path / "d", seq_len=32, block_size=8, max_files=2, max_heldout_samples=0)
    assert not (tmp_path / "d").exists()


def test_seq_len_must_be_a_multiple_of_the_block(qwen3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.seq_len=100 is not a multiple of diffusion.block_size=32"):
        build_code_corpus(qwen3_dir, tmp_path / "x", seq_len=100, block_size=32)
    with pytest.raises(ValueError, match="data.seq_len=100"):
        ensure_code_corpus(qwen3_dir, tmp_path, seq_len=100, block_size=32)
    assert not (tmp_path / "x").exists()


def test_ensure_code_corpus_caches_by_arguments(qwen3_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(seq_len=32, block_size=8, max_files=3)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_code_corpus(qwen3_dir, tmp_path, **kwargs)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = results[0]
    assert results == [first, first]
    assert [p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")] == [first.name]
    assert first.parent == tmp_path.absolute() / "corpora" and first.name.startswith("stdlib-")
    stamp = (first / META_FILE).stat().st_mtime_ns
    assert ensure_code_corpus(qwen3_dir, tmp_path, **kwargs) == first
    assert (first / META_FILE).stat().st_mtime_ns == stamp
    other = ensure_code_corpus(qwen3_dir, tmp_path, seq_len=32, block_size=16, max_files=3)
    assert other != first and json.loads((other / META_FILE).read_text())["block_size"] == 16
