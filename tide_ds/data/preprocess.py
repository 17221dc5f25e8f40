"""Offline preprocessing of chat data into the trainer's dataset (docs/method.md §11, docs/design.md decision 7).

    python -m tide_ds.data.preprocess --pipeline A --input chats.jsonl --student-tokenizer DIR \\
        --teacher-tokenizer DIR --out DIR [--seq-len 512 --teacher-seq-len 1024 --block-size 32 --num-proc 8]

Input: rows with ``messages`` = [{role, content}, ...] (and optionally ``source``, the split key) from a
JSON-lines file (``.jsonl``/``.json``, one object per line), a parquet file, a dataset saved with
``save_to_disk`` (all its splits, in order) or a directory of such files (sorted by path).

Output: a ``datasets.DatasetDict`` with splits ``train`` and ``heldout`` of the fixed-length int32 columns
described in :mod:`tide_ds.data.collate` (pipeline A: chunk ids; pipeline B: position pairs), and
``summary.json``: the run key, rows read, kept and dropped by reason, tokens per side, chunk or pair
statistics. Every row read is either kept or counted under a drop reason.

The rows are cut into shards of ``--shard-size`` in input order, encoded by ``--num-proc`` worker
processes; each finished shard stays in a work directory beside the output, so a killed run continues
where it stopped. A row's split is fixed by its ``source`` (else its messages) through
:func:`tide_ds.data.corpus.split_of`. The same input and options give byte-identical files, whatever
``--num-proc``; the dataset and summary are published together by one rename.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from tide_ds import workers
from tide_ds.data.collate import DEFAULT_TEACHER_FORMAT, PIPELINE_COLUMNS, ContractEncoder, Stats, contract_features
from tide_ds.data.corpus import split_of
from tide_ds.data.tokenizers import file_lock, publish_dir, sha256_file, staging_dir

logger = logging.getLogger(__name__)

#: Bumped whenever the output changes, so work directories of an older version are not reused.
#: 2: pipeline B's teacher_tokens no longer count the EOS block padding.
PREPROCESS_FORMAT = 2
SPLITS = ("train", "heldout")
SUMMARY_FILE = "summary.json"
_DATASETS_METADATA = frozenset({"dataset_dict.json", "dataset_info.json", "state.json", SUMMARY_FILE})


@dataclass(frozen=True)
class PreprocessConfig:
    """Options of one preprocessing run (the CLI flags of the same names)."""

    pipeline: str
    input: Path
    student_tokenizer: Path
    teacher_tokenizer: Path
    out: Path
    seq_len: int = 512
    teacher_seq_len: int = 1024
    block_size: int = 32
    student_format: str = "qwen3"
    teacher_format: str | None = None  # None: llada2 for pipeline A, wedlm for B
    heldout_fraction: float = 0.02
    limit: int | None = None
    num_proc: int = 1
    shard_size: int = 1000
    overwrite: bool = False
    work_dir: Path | None = None  # None: .<out name>.work beside the output
    max_shards: int | None = None  # stop after processing this many shards (interruption hook for tests)

    def __post_init__(self) -> None:
        # Lengths, formats and tokenizers are checked by ContractEncoder, built before any shard runs.
        if self.pipeline not in PIPELINE_COLUMNS:
            raise ValueError(f"--pipeline={self.pipeline!r} must be A (cross tokenizer) or B (shared tokenizer)")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction={self.heldout_fraction} must lie in (0, 1); e.g. 0.02")
        for option, value in (("--limit", self.limit), ("--max-shards", self.max_shards)):
            if value is not None and value < 1:
                raise ValueError(f"{option}={value} must be a positive integer (omit it for no limit)")
        if self.num_proc < 1 or self.shard_size < 1:
            raise ValueError(f"--num-proc={self.num_proc} and --shard-size={self.shard_size} must be positive")
        if not Path(self.input).exists():
            raise ValueError(f"--input={str(self.input)!r} does not exist")

    def encoder(self) -> ContractEncoder:
        return ContractEncoder(
            self.pipeline, student_tokenizer=self.student_tokenizer, teacher_tokenizer=self.teacher_tokenizer,
            seq_len=self.seq_len, teacher_seq_len=self.teacher_seq_len, block_size=self.block_size,
            student_format=self.student_format, teacher_format=self.teacher_format,
        )

    @property
    def teacher_format_name(self) -> str:
        return self.teacher_format or DEFAULT_TEACHER_FORMAT[self.pipeline]


# --- input: parts of rows, read by shard ---


@dataclass(frozen=True, eq=False)
class _Part:
    """One input file or saved dataset; ``line_starts`` (JSON lines): int64 [rows + 1], byte offset of each line."""

    kind: str  # "jsonl" | "parquet" | "arrow"
    path: Path
    num_rows: int
    line_starts: np.ndarray | None = None


def _jsonl_part(path: Path, block: int = 1 << 26) -> _Part:
    """Index the lines of a JSON-lines file (read in 64 MiB blocks); a last line may lack its newline."""
    ends, size = [np.zeros(1, dtype=np.int64)], 0
    with open(path, "rb") as fh:
        while data := fh.read(block):
            ends.append(np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")).astype(np.int64) + size + 1)
            size += len(data)
            last = data[-1:]
    starts = np.concatenate(ends)
    if size and last != b"\n":
        starts = np.append(starts, size)
    return _Part("jsonl", path, len(starts) - 1, starts)


def _parts_of(path: Path) -> list[_Part]:
    """The parts of ``--input`` in reading order."""
    import pyarrow.parquet as pq

    if path.is_file():
        if path.suffix == ".parquet":
            return [_Part("parquet", path, pq.ParquetFile(path).metadata.num_rows)]
        return [_jsonl_part(path)]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [p for split in splits for p in _parts_of(path / split)]
    if (path / "state.json").is_file():
        import datasets

        return [_Part("arrow", path, len(datasets.load_from_disk(str(path))))]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet")
        and p.name not in _DATASETS_METADATA and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"--input={str(path)!r} holds no .jsonl/.json/.parquet files and is not a saved dataset")
    return [p for f in files for p in _parts_of(f)]


def _input_digest(parts: list[_Part]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        files = [part.path] if part.path.is_file() else sorted(f for f in part.path.iterdir() if f.is_file())
        for f in files:
            digest.update(f"{part.kind}:{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def _read_part(part: _Part, start: int, stop: int) -> Iterator[dict | str]:
    """Rows ``start:stop`` of one part: dicts, or a drop reason for a line that is not a JSON object."""
    if part.kind == "jsonl":
        with open(part.path, "rb") as fh:
            fh.seek(int(part.line_starts[start]))
            for _ in range(start, stop):
                line = fh.readline()
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield "invalid_utf8"
                    continue
                if not text.strip():
                    yield "blank_line"
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    yield "bad_json"
                    continue
                yield row if isinstance(row, dict) else "bad_row"
    elif part.kind == "parquet":
        import pyarrow.parquet as pq

        pf, first = pq.ParquetFile(part.path), 0
        columns = [c for c in ("messages", "source") if c in pf.schema_arrow.names]
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if first < stop and first + n > start:
                table = pf.read_row_group(group, columns=columns)
                lo, hi = max(start - first, 0), min(stop - first, n)
                yield from table.slice(lo, hi - lo).to_pylist()
            first += n
    else:
        import datasets

        ds = datasets.load_from_disk(str(part.path))
        ds = ds.select_columns([c for c in ("messages", "source") if c in ds.column_names])
        batch = ds[start:stop]
        yield from ({k: batch[k][i] for k in batch} for i in range(stop - start))


def _read_rows(parts: list[_Part], start: int, stop: int) -> Iterator[dict | str]:
    """Global rows ``start:stop`` across the parts."""
    first = 0
    for part in parts:
        lo, hi = max(start - first, 0), min(stop - first, part.num_rows)
        if lo < hi:
            yield from _read_part(part, lo, hi)
        first += part.num_rows


def _split_key(row: dict) -> str:
    source = row.get("source")
    if isinstance(source, str) and source:
        return source
    return hashlib.sha256(json.dumps(row["messages"], sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --- shards ---

_WORKER: tuple[ContractEncoder, list[_Part], Path, PreprocessConfig] | None = None  # this process's shard context


def _init_worker(cfg: PreprocessConfig, parts: list[_Part], work: Path) -> None:
    global _WORKER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _WORKER is None:  # forked workers inherit the parent's encoder; spawned ones build their own
        _WORKER = (cfg.encoder(), parts, work, cfg)


def _shard_file(work: Path, k: int, suffix: str) -> Path:
    return work / f"shard-{k:05d}.{suffix}"


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``: a killed run never leaves a half-written file."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_arrow(path: Path, rows: list[dict[str, np.ndarray]], schema: pa.Schema) -> None:
    """The rows as one arrow stream (the format ``datasets`` memory-maps)."""
    arrays = []
    for f in schema:
        width = f.type.list_size if pa.types.is_fixed_size_list(f.type) else 1
        values = np.stack([r[f.name] for r in rows]) if rows else np.zeros((0, width), np.int32)
        flat = pa.array(values.reshape(-1).astype(np.int32), type=pa.int32())
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, width) if pa.types.is_fixed_size_list(f.type) else flat)
    table = pa.Table.from_arrays(arrays, schema=schema)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_stream(sink, schema) as writer:
            writer.write_table(table)

    _write_atomic(path, write)


def _process_shard(k: int) -> int:
    """Encode shard ``k``; write its rows (one arrow stream per split), then its counts (marks it finished)."""
    assert _WORKER is not None
    encoder, parts, work, cfg = _WORKER
    stats = Stats()
    rows: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in SPLITS}
    start, stop = k * cfg.shard_size, min((k + 1) * cfg.shard_size, _num_rows(parts, cfg))
    for index, row in enumerate(_read_rows(parts, start, stop), start):
        stats.add(read=1)
        if isinstance(row, str):  # a line that is no JSON object: its drop reason
            stats.add(**{f"dropped/{row}": 1})
            continue
        try:
            columns = encoder.encode(row.get("messages"), stats)
        except Exception as err:  # noqa: BLE001 -- a bad row never stops the run: it is counted and logged
            logger.warning("row %d: %s: %s; dropped as error_%s", index, type(err).__name__, err, type(err).__name__)
            stats.events.dropped.clear()
            stats.add(**{f"dropped/error_{type(err).__name__}": 1})
            continue
        if columns is not None:
            split = split_of(_split_key(row), heldout_fraction=cfg.heldout_fraction)
            stats.add(**{f"kept/{split}": 1})
            rows[split].append(columns)
    schema = contract_features(cfg.pipeline, seq_len=cfg.seq_len, teacher_seq_len=cfg.teacher_seq_len).arrow_schema
    for split in SPLITS:
        _write_arrow(_shard_file(work, k, f"{split}.arrow"), rows[split], schema)
    _write_atomic(_shard_file(work, k, "json"), lambda p: p.write_text(json.dumps(stats.to_json())))
    return k


def _num_rows(parts: list[_Part], cfg: PreprocessConfig) -> int:
    total = sum(p.num_rows for p in parts)
    return total if cfg.limit is None else min(total, cfg.limit)


def _run_shards(cfg: PreprocessConfig, encoder: ContractEncoder, parts: list[_Part], work: Path,
                todo: list[int]) -> None:
    global _WORKER
    _WORKER = (encoder, parts, work, cfg)
    try:
        if cfg.num_proc == 1 or len(todo) <= 1:
            for k in todo:
                _process_shard(k)
            return
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        # workers start with default signal handlers (never the trainer's), and the pool ends with a deadline
        pool = workers.start_pool(ctx, min(cfg.num_proc, len(todo)), _init_worker, (cfg, parts, work))
        clean = False
        try:
            for _ in pool.imap_unordered(_process_shard, todo):
                pass
            clean = True
        finally:
            workers.stop_pool(pool, what="preprocessing", clean=clean)
    finally:
        _WORKER = None


# --- the run ---


@dataclass(frozen=True)
class PreprocessResult:
    """``out`` is None when the run stopped early (``max_shards``); rerunning continues it."""

    out: Path | None
    summary: dict
    shards: int
    shards_reused: int  # finished by an earlier, interrupted run
    shards_processed: int
    seconds: float


def _tokenizer_digest(path: Path) -> str:
    names = [n for n in ("tokenizer.json", "tokenizer_config.json") if (path / n).is_file()]
    return hashlib.sha256("".join(f"{n}:{sha256_file(path / n)}\n" for n in names).encode()).hexdigest()


def _run_key(cfg: PreprocessConfig, parts: list[_Part]) -> dict:
    """Everything the output depends on; a work directory is reused only for the same key."""
    return {
        "format": PREPROCESS_FORMAT, "pipeline": cfg.pipeline, "seq_len": cfg.seq_len,
        "teacher_seq_len": cfg.teacher_seq_len, "block_size": cfg.block_size,
        "student_format": cfg.student_format, "teacher_format": cfg.teacher_format_name,
        "heldout_fraction": cfg.heldout_fraction, "limit": cfg.limit, "shard_size": cfg.shard_size,
        "input_files": [p.path.name for p in parts], "input_sha256": _input_digest(parts),
        "student_tokenizer_sha256": _tokenizer_digest(Path(cfg.student_tokenizer)),
        "teacher_tokenizer_sha256": _tokenizer_digest(Path(cfg.teacher_tokenizer)),
    }


def _prepare_work_dir(work: Path, key: dict) -> None:
    """Keep ``work`` if it holds shards of the same key, else start it afresh."""
    record, text = work / "key.json", json.dumps(key, sort_keys=True, indent=1)
    if work.exists() and (not record.is_file() or record.read_text() != text):
        logger.warning("%s holds shards of other inputs or options; starting afresh", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        _write_atomic(record, lambda p: p.write_text(text))


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Run, or continue, the preprocessing described by ``cfg`` (see the module docstring)."""
    start_time = time.perf_counter()
    out = Path(cfg.out).absolute()
    work = Path(cfg.work_dir).absolute() if cfg.work_dir else out.parent / f".{out.name}.work"
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"--out={str(out)!r} already exists; pass --overwrite to replace it or choose another --out")
    parts = _parts_of(Path(cfg.input))
    num_rows = _num_rows(parts, cfg)
    if num_rows == 0:
        raise ValueError(f"--input={str(cfg.input)!r} holds no rows")
    encoder = cfg.encoder()  # checks lengths, formats and tokenizers before any work
    key = _run_key(cfg, parts)
    with file_lock(out.parent / f".{out.name}.lock"):
        if out.exists() and not cfg.overwrite:
            raise ValueError(f"--out={str(out)!r} was created meanwhile; pass --overwrite or choose another --out")
        _prepare_work_dir(work, key)
        num_shards = -(-num_rows // cfg.shard_size)
        done = [k for k in range(num_shards) if _shard_file(work, k, "json").is_file()]
        pending = sorted(set(range(num_shards)) - set(done))
        todo = pending[: cfg.max_shards] if cfg.max_shards is not None else pending
        logger.info("%d rows in %d shards: %d finished before, %d to do with %d process(es)", num_rows, num_shards,
                    len(done), len(todo), min(cfg.num_proc, max(len(todo), 1)))
        _run_shards(cfg, encoder, parts, work, todo)
        stats = Stats()
        for k in range(num_shards):
            if _shard_file(work, k, "json").is_file():
                stats.merge(Stats(json.loads(_shard_file(work, k, "json").read_text())))
        summary = _summary(cfg, key, stats)
        if len(todo) < len(pending):
            return PreprocessResult(None, summary, num_shards, len(done), len(todo), time.perf_counter() - start_time)
        rows = summary["rows"]
        assert rows["read"] == num_rows == rows["kept"] + rows["dropped"], rows  # no row vanishes
        _publish(cfg, out, work, num_shards, summary)
        shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %s", out)
    return PreprocessResult(out, summary, num_shards, len(done), len(todo), time.perf_counter() - start_time)


def _publish(cfg: PreprocessConfig, out: Path, work: Path, num_shards: int, summary: dict) -> None:
    """Concatenate the shards per split (memory-mapped), save the DatasetDict + summary, rename into place."""
    import datasets
    from datasets.table import MemoryMappedTable, concat_tables

    features = contract_features(cfg.pipeline, seq_len=cfg.seq_len, teacher_seq_len=cfg.teacher_seq_len)
    fingerprint = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]
    splits = {}
    for split in SPLITS:
        tables = [MemoryMappedTable.from_file(str(_shard_file(work, k, f"{split}.arrow"))) for k in range(num_shards)]
        tables = [t for t in tables if t.num_rows]
        if not tables:  # datasets cannot load an empty split back from disk
            raise ValueError(_empty_split_message(cfg, split, summary))
        # A fixed fingerprint keeps state.json identical across identical runs.
        splits[split] = datasets.Dataset(concat_tables(tables), info=datasets.DatasetInfo(features=features),
                                         fingerprint=f"{fingerprint}-{split}")
    staged = staging_dir(out)
    try:
        datasets.DatasetDict(splits).save_to_disk(str(staged))
        (staged / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if not publish_dir(staged, out, replace=cfg.overwrite):
            raise ValueError(f"--out={str(out)!r} was created by another process meanwhile")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _empty_split_message(cfg: PreprocessConfig, split: str, summary: dict) -> str:
    """Why ``split`` is empty and which number to change."""
    rows = summary["rows"]
    kept, read = rows["kept"], rows["read"]
    drops = ", ".join(f"{k}={v}" for k, v in sorted(rows["dropped_by_reason"].items(), key=lambda kv: -kv[1]))
    counts = f"{read} rows read, {kept} kept" + (f", {rows['dropped']} dropped ({drops})" if rows["dropped"] else "")
    if kept == 0:
        return (f"no row was kept ({counts}), so the {split} split would be empty; fix the input rows (the drop "
                "reasons say what is wrong with them) or the length options (--seq-len, --teacher-seq-len)")
    f = cfg.heldout_fraction
    if split == "heldout":
        need = min(0.5, 2.0 / kept)
        return (f"the heldout split would be empty ({counts}): --heldout-fraction={f} of {kept} rows is "
                f"{f * kept:.2f} expected rows; raise --heldout-fraction to about {need:.2g} or give more input rows")
    return (f"the train split would be empty ({counts}, all of them held out): --heldout-fraction={f} is too large "
            f"for {kept} rows; lower it (e.g. {min(f, 0.5) / 2:.2g}) or give more input rows")


def _summary(cfg: PreprocessConfig, key: dict, stats: Stats) -> dict:
    """The deterministic ``summary.json``: the run key, row counts by outcome, tokens, chunks or pairs."""
    c, kept = stats.counts, sum(stats.prefixed("kept/").values())

    def ratio(a: float, b: float) -> float:
        return round(a / b, 6) if b else 0.0

    def distribution(total: str, name: str) -> dict:
        return {"total": c[total], "per_sample_mean": ratio(c[total], kept),
                "per_sample_min": stats.minima.get(name, 0), "per_sample_max": stats.maxima.get(name, 0)}

    summary = {
        "key": key,
        "rows": {"read": c["read"], "kept": kept, "kept_by_split": {s: c[f"kept/{s}"] for s in SPLITS},
                 "dropped": sum(stats.prefixed("dropped/").values()), "dropped_by_reason": stats.prefixed("dropped/"),
                 "student_truncated": c["student_truncated"], "teacher_truncated": c["teacher_truncated"]},
        "tokens": {name: c[name] for name in ("student_tokens", "student_tokens_untruncated", "student_labelled",
                                              "teacher_tokens", "teacher_tokens_untruncated")},
        "alignment_events": stats.prefixed("event/"),
    }
    summary["tokens"].update(student_per_sample=ratio(c["student_tokens"], kept),
                             teacher_per_sample=ratio(c["teacher_tokens"], kept))
    if cfg.pipeline == "A":
        summary["chunks"] = {**distribution("chunks", "chunks_per_sample"),
                             "samples_without_chunks": c["samples_without_chunks"],
                             "bytes_per_chunk_mean": ratio(c["chunk_bytes"], c["chunks"]),
                             "response_bytes": c["response_bytes"],
                             "response_bytes_covered": ratio(c["response_bytes_in_chunks"], c["response_bytes"])}
    else:
        summary["pairs"] = {**distribution("pairs", "pairs_per_sample"),
                            "samples_without_pairs": c["samples_without_pairs"],
                            "response_tokens": c["response_tokens"],
                            "response_tokens_covered": ratio(c["response_tokens_paired"], c["response_tokens"])}
    return summary


def format_summary(summary: dict) -> str:
    """Readable lines of ``summary`` (what the CLI prints)."""
    rows, by_split = summary["rows"], summary["rows"]["kept_by_split"]

    def items(d: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "none"

    lines = [
        (f"rows: read {rows['read']}, kept {rows['kept']} (train {by_split['train']}, heldout {by_split['heldout']}), "
         f"dropped {rows['dropped']} ({items(rows['dropped_by_reason'])}); truncated: student "
         f"{rows['student_truncated']}, teacher {rows['teacher_truncated']}"),
        f"tokens: {items(summary['tokens'])}",
    ]
    lines += [f"{name}: {items(summary[name])}" for name in ("chunks", "pairs") if name in summary]
    lines.append(f"alignment events: {items(summary['alignment_events'])}")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.data.preprocess", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--pipeline", required=True, choices=sorted(PIPELINE_COLUMNS), help="A: cross tokenizer, B: shared tokenizer")
    add("--input", required=True, type=Path, help="JSONL or parquet file, saved dataset, or a directory of files")
    add("--student-tokenizer", required=True, type=Path, help="student tokenizer directory (with <|mask|>)")
    add("--teacher-tokenizer", required=True, type=Path, help="teacher tokenizer directory")
    add("--out", required=True, type=Path, help="output dataset directory (published atomically)")
    add("--seq-len", type=int, default=512, help="student length L, a multiple of --block-size")
    add("--teacher-seq-len", type=int, default=1024, help="teacher length L_t")
    add("--block-size", type=int, default=32, help="BD3LM block size K (EOS padding)")
    add("--student-format", default="qwen3", help="student chat format (qwen3, llada2, wedlm)")
    add("--teacher-format", default=None, help="teacher chat format (default: llada2 for A, wedlm for B)")
    add("--heldout-fraction", type=float, default=0.02, help="share of split keys (source, else messages) held out")
    add("--limit", type=int, default=None, help="read only the first N rows")
    add("--num-proc", type=int, default=1, help="worker processes")
    add("--shard-size", type=int, default=1000, help="rows per shard, the unit of work and of resume")
    add("--work-dir", type=Path, default=None, help="finished shards (default: .<out name>.work beside --out)")
    add("--max-shards", type=int, default=None, help="stop after this many new shards; rerun to continue")
    add("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = preprocess(PreprocessConfig(**vars(args)))
    except (ValueError, workers.PoolStuck) as err:  # what is wrong and what to change: no traceback
        print(f"python -m tide_ds.data.preprocess: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result.summary))
    done = result.shards_reused + result.shards_processed
    if result.out is None:
        print(f"stopped after {result.shards_processed} new shard(s), {done}/{result.shards} finished; "
              "rerun the same command to continue")
        return 3
    print(f"{result.out}: {result.shards} shards ({result.shards_reused} reused), {result.seconds:.1f} s, "
          f"{result.summary['rows']['read'] / result.seconds:.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
