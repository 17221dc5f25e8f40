"""The demo corpus: the Python standard library's own source, tokenized offline (docs/design.md decision 7).

Each ``.py`` file's token stream is cut into documents of at most ``seq_len - 1`` tokens; a sample is
one document, one EOS, EOS block padding up to a multiple of the block size (all of it trained,
docs/method.md §2.1), then pad tokens (labels -100) up to ``seq_len``. The train/held-out split
is by file, decided by a hash of the file's path relative to the standard library.

The result is a ``datasets.DatasetDict`` on disk with splits ``train`` and ``heldout`` and columns
``input_ids`` and ``labels`` (int32, length ``seq_len``) and ``source`` (the relative path), plus
``corpus_meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import datasets
import numpy as np
import pyarrow as pa

from tide_ds.data.tokenizers import SpecialIds, load_tokenizer, resolve_special_ids
from tide_ds.diffusion.layout import check_block_multiple, eos_block_pad, pad_to_length
from tide_ds.diffusion.masking import IGNORE_INDEX
from tide_ds.utils.files import file_lock, publish_dir, sha256_file, staging_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

#: Directory names never read: installed packages and the standard library's own test suites.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SPLITS = ("train", "heldout")
META_FILE = "corpus_meta.json"
#: Bumped whenever the corpus layout changes, so cached corpora of an older layout are rebuilt.
CORPUS_FORMAT = 1
_FILES_PER_BATCH = 64  # files tokenized per encode_batch call: bounds the memory of Encoding objects


class _Row(NamedTuple):
    input_ids: np.ndarray  # [seq_len] int32
    labels: np.ndarray  # [seq_len] int32
    source: str  # path relative to the standard library
    tokens: int  # source tokens in the sample (before EOS and padding)


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Absolute paths of the standard library's UTF-8 ``.py`` files, sorted by relative path.

    Skips ``site-packages`` and test suites (``test``, ``tests``, ``idlelib/idle_test``,
    ``lib2to3/tests``; see :data:`EXCLUDED_DIRS`); does not follow symbolic links to directories.
    """
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.endswith(".py") or not path.is_file():
                continue
            try:
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _unit_hash(salt: str, relpath: str) -> float:
    """A number in [0, 1) fixed by ``relpath`` (sha256, so it is the same in every process)."""
    digest = hashlib.sha256(f"{salt}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fraction(heldout_fraction: float) -> None:
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"world.heldout_fraction={heldout_fraction!r} must lie in (0, 1); e.g. 0.02")


def split_of(relpath: str, *, heldout_fraction: float) -> str:
    """``"heldout"`` for about ``heldout_fraction`` of all paths, else ``"train"``; deterministic per path."""
    _check_fraction(heldout_fraction)
    return "heldout" if _unit_hash("split", relpath) < heldout_fraction else "train"


def _select(relpaths: list[str], *, heldout_fraction: float, max_files: int | None, min_heldout: int = 1) -> list[str]:
    """At most ``max_files`` paths in the split proportions (at least ``min_heldout`` held-out files when they fit).

    Within each split the files come in a fixed pseudo-random order, so a small selection still
    spreads over the whole library instead of taking its alphabetical head.
    """
    if max_files is None or max_files >= len(relpaths):
        return relpaths
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for p in sorted(relpaths, key=lambda p: _unit_hash("subset", p)):
        by_split[split_of(p, heldout_fraction=heldout_fraction)].append(p)
    n_heldout = min(max(min_heldout, round(max_files * heldout_fraction)), max_files // 2) if max_files >= 2 else 0
    n_heldout = min(n_heldout, len(by_split["heldout"]))
    chosen = by_split["heldout"][:n_heldout] + by_split["train"][: max_files - n_heldout]
    return sorted(chosen)


def _check_args(seq_len: int, block_size: int, heldout_fraction: float, max_files: int | None) -> None:
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be at least 2 (one token and one EOS)")
    check_block_multiple(seq_len, block_size, option="data.seq_len")
    _check_fraction(heldout_fraction)
    if max_files is not None and max_files < 1:
        raise ValueError(f"world.max_files={max_files} must be positive (or None/0 in the config for all files)")


def _layout(piece: list[int], *, special: SpecialIds, seq_len: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample (docs/method.md §2.1): piece + EOS + EOS block padding (all labelled) + pad (-100)."""
    input_ids = list(piece) + [special.eos_id]
    input_ids, labels = eos_block_pad(input_ids, list(input_ids), block_size=block_size, eos_id=special.eos_id)
    input_ids, labels = pad_to_length(input_ids, labels, length=seq_len, pad_id=special.pad_id)
    return np.asarray(input_ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def _tokenized_files(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no BOS/EOS added).

    Strings of special tokens (``<|im_end|>``, ``<|mask|>``, ...) inside a text are tokenized as
    ordinary text, so a source file can never inject a control token; non-special added tokens such
    as ``<think>`` are matched, as Qwen3's tokenizer does.
    """
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    ids: list[list[int]] = []
    for start in range(0, len(texts), _FILES_PER_BATCH):
        chunk = backend.encode_batch(texts[start : start + _FILES_PER_BATCH], add_special_tokens=False)
        ids.extend(encoding.ids for encoding in chunk)
    return ids


def _to_dataset(rows: list[_Row], *, seq_len: int, fingerprint: str) -> datasets.Dataset:
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len),
            "labels": datasets.Sequence(datasets.Value("int32"), length=seq_len),
            "source": datasets.Value("string"),
        }
    )

    def column(arrays: list[np.ndarray]) -> pa.Array:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.int32()), seq_len)

    table = pa.Table.from_arrays(
        [column([r.input_ids for r in rows]), column([r.labels for r in rows]), pa.array([r.source for r in rows])],
        schema=features.arrow_schema,
    )
    info = datasets.DatasetInfo(features=features)
    # An explicit fingerprint keeps the saved state.json identical across identical builds.
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=info, fingerprint=fingerprint)


def _samples(
    relpaths: list[str], token_ids: list[list[int]], *, special: SpecialIds, seq_len: int, block_size: int,
    heldout_fraction: float,
) -> dict[str, list[_Row]]:
    """Cut each file into documents of at most ``seq_len - 1`` tokens, one sample each, by split."""
    doc_len = seq_len - 1  # + 1 EOS fills seq_len exactly
    rows: dict[str, list[_Row]] = {s: [] for s in SPLITS}
    for relpath, ids in zip(relpaths, token_ids):
        split = split_of(relpath, heldout_fraction=heldout_fraction)
        for i in range(0, len(ids), doc_len):
            piece = ids[i : i + doc_len]
            sample = _layout(piece, special=special, seq_len=seq_len, block_size=block_size)
            rows[split].append(_Row(*sample, source=relpath, tokens=len(piece)))
    return rows


def build_code_corpus(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int,
    block_size: int,
    heldout_fraction: float = 0.02,
    max_files: int | None = None,
    max_train_samples: int | None = None,
    max_heldout_samples: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenize the standard library into a DatasetDict at ``out_dir`` (written atomically).

    ``max_files`` keeps that many files (see :func:`_select`); ``max_*_samples`` keep the first samples
    of a split. The same arguments, tokenizer and interpreter give an identical directory. An
    existing ``out_dir`` is an error unless ``overwrite``. Returns the absolute path.
    """
    _check_args(seq_len, block_size, heldout_fraction, max_files)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise ValueError(
            f"build_code_corpus: {out_dir} already exists; pass overwrite=True or choose another directory"
        )
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    special = resolve_special_ids(tokenizer)
    root = stdlib_root()
    texts = {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in stdlib_source_files()}
    nonempty = [p for p, text in texts.items() if text.strip()]
    relpaths = _select(nonempty, heldout_fraction=heldout_fraction, max_files=max_files)
    token_ids = _tokenized_files(tokenizer, [texts[p] for p in relpaths])

    rows = _samples(relpaths, token_ids, special=special, seq_len=seq_len, block_size=block_size,
                    heldout_fraction=heldout_fraction)
    limits = {"train": max_train_samples, "heldout": max_heldout_samples}
    rows = {s: r[: limits[s]] if limits[s] is not None else r for s, r in rows.items()}
    for split, option in (("train", "max_train_samples"), ("heldout", "max_heldout_samples")):
        if not rows[split]:  # datasets cannot load an empty split back from disk
            raise ValueError(
                f"the {split} split of the stdlib corpus would be empty (heldout_fraction={heldout_fraction}, "
                f"max_files={max_files}, {option}={limits[split]}); raise world.max_files, world.heldout_fraction "
                f"or {option}"
            )

    tokenizer_sha = sha256_file(Path(tokenizer_dir) / "tokenizer.json")
    meta = {
        "format": CORPUS_FORMAT,
        "corpus": "python-stdlib",
        "python_version": platform.python_version(),
        "stdlib": str(root),
        "seq_len": seq_len,
        "block_size": block_size,
        "heldout_fraction": heldout_fraction,
        "max_files": max_files,
        "max_train_samples": max_train_samples,
        "max_heldout_samples": max_heldout_samples,
        "tokenizer_sha256": tokenizer_sha,
        "special_ids": {"eos": special.eos_id, "pad": special.pad_id, "mask": special.mask_id},
        "vocab_size": special.vocab_size,
        "splits": {s: _split_stats(r) for s, r in rows.items()},
    }
    meta["total_tokens"] = sum(stats["tokens"] for stats in meta["splits"].values())
    _save(rows, meta, out_dir, seq_len=seq_len, overwrite=overwrite)
    logger.info(
        "built the stdlib corpus in %s: %s (%.1f s)",
        out_dir, ", ".join(f"{s} {v['samples']} samples / {v['files']} files" for s, v in meta["splits"].items()),
        time.perf_counter() - start,
    )
    return out_dir


def _split_stats(rows: list[_Row]) -> dict[str, int]:
    """Counts of one split: ``tokens`` are source tokens, ``label_tokens`` also count EOS and EOS padding."""
    return {
        "files": len({r.source for r in rows}),
        "samples": len(rows),
        "tokens": sum(r.tokens for r in rows),
        "label_tokens": sum(int((r.labels != IGNORE_INDEX).sum()) for r in rows),
    }


def _save(rows: dict[str, list[_Row]], meta: dict, out_dir: Path, *, seq_len: int, overwrite: bool) -> None:
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    splits = datasets.DatasetDict(
        {s: _to_dataset(r, seq_len=seq_len, fingerprint=f"{key}-{s}") for s, r in rows.items()}
    )
    staged = staging_dir(out_dir)
    try:
        splits.save_to_disk(str(staged))
        (staged / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if not publish_dir(staged, out_dir, replace=overwrite):
            raise ValueError(f"build_code_corpus: {out_dir} was created by another process meanwhile")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def ensure_code_corpus(
    tokenizer_dir: str | Path,
    cache_dir: str | Path,
    *,
    seq_len: int,
    block_size: int,
    heldout_fraction: float = 0.02,
    max_files: int | None = None,
    max_train_samples: int | None = None,
    max_heldout_samples: int | None = None,
) -> Path:
    """The corpus for these arguments under ``<cache_dir>/corpora/stdlib-<key>``, built on first use.

    ``key`` hashes every argument, the tokenizer's ``tokenizer.json`` and the interpreter's version
    and standard library path. Concurrent callers are safe: one builds under a file lock, the
    others wait and reuse it.
    """
    _check_args(seq_len, block_size, heldout_fraction, max_files)
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        load_tokenizer(tokenizer_dir)  # raises the explanatory error
    args = {
        "format": CORPUS_FORMAT,
        "python": platform.python_version(),
        "stdlib": str(stdlib_root()),
        "tokenizer_sha256": sha256_file(tokenizer_json),
        "seq_len": seq_len,
        "block_size": block_size,
        "heldout_fraction": heldout_fraction,
        "max_files": max_files,
        "max_train_samples": max_train_samples,
        "max_heldout_samples": max_heldout_samples,
    }
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    out_dir = (Path(cache_dir) / "corpora" / f"stdlib-{key}").absolute()
    if (out_dir / META_FILE).is_file():
        return out_dir
    with file_lock(out_dir.parent / f".stdlib-{key}.lock"):
        if (out_dir / META_FILE).is_file():
            return out_dir
        return build_code_corpus(
            tokenizer_dir, out_dir, seq_len=seq_len, block_size=block_size, heldout_fraction=heldout_fraction,
            max_files=max_files, max_train_samples=max_train_samples, max_heldout_samples=max_heldout_samples,
            overwrite=out_dir.exists(),  # a directory without meta file is not ours to keep
        )
