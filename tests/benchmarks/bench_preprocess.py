"""Benchmark of the offline preprocessing (CPU): throughput per process and the memory of the alignment.

    python tests/benchmarks/bench_preprocess.py [--rows 2000] [--num-proc 2]

Pipeline A with the real Qwen3 tokenizer (student, Qwen3 chat format) against two real, different teacher
tokenizers (LLaDA2 chat format): Qwen3.5 (248k byte-level BPE) and a 16k-piece SentencePiece BPE trained on
the standard library; pipeline B (Qwen3 against itself, WeDLM format) for reference. Rows: the stdlib
instruction corpus. Measured:

* ``encode``: :meth:`ContractEncoder.encode` alone, one process (rows/s per process);
* ``end-to-end``: :func:`preprocess` (read, encode, write shards, publish) with 1 and ``--num-proc``
  processes (rows/s overall; on a machine shared with other work the multi-process number is noisy);
* alignment memory per sample (pipeline A, L = 512, L_t = 1024): the two int32 chunk-id arrays of the
  data contract (docs/design.md decision 4) against the reference collator's dense boolean matrices
  ``[L, C]`` + ``[L_t, C]`` (docs/method.md §4.3), C = the sample's own chunk count (a lower bound) and C = the
  largest count in its batch of 8 (what the reference builds).

Prints a table and writes ``$TIDE_BENCH_DIR/preprocess.json`` (default ``bench_results/``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tide_ds.data.collate import Stats
from tide_ds.data.corpus import stdlib_root
from tide_ds.data.instruct_corpus import ensure_instruct_jsonl
from tide_ds.data.more_tokenizers import ensure_qwen35_tokenizer, train_sentencepiece_tokenizer
from tide_ds.data.preprocess import PreprocessConfig, preprocess
from tide_ds.data.tokenizers import default_tokenizer_cache, ensure_qwen3_tokenizer

REPO = Path(__file__).resolve().parents[2]
L, L_T, K = 512, 1024, 32
SPM_VOCAB = 16000
BATCH = 8


def _spm_teacher(cache: Path) -> Path:
    dirs = ("json", "email", "asyncio", "xml/dom")
    corpus = [p for d in dirs for p in sorted((stdlib_root() / d).glob("*.py"))]
    corpus += [stdlib_root() / n for n in ("textwrap.py", "argparse.py")]
    return train_sentencepiece_tokenizer(corpus, cache / "tokenizers" / f"spm-stdlib-{SPM_VOCAB}", vocab_size=SPM_VOCAB)


def _config(pipeline: str, rows: Path, out: Path, student: Path, teacher: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(pipeline=pipeline, input=rows, student_tokenizer=student, teacher_tokenizer=teacher,
                            out=out, seq_len=L, teacher_seq_len=L_T, block_size=K, **kw)


def _encode_rate(cfg: PreprocessConfig, rows: list[dict]) -> dict:
    start = time.perf_counter()
    encoder = cfg.encoder()
    load_s = time.perf_counter() - start
    stats = Stats()
    start = time.perf_counter()
    kept = sum(encoder.encode(row["messages"], stats) is not None for row in rows)
    seconds = time.perf_counter() - start
    return {"rows": len(rows), "kept": kept, "seconds": round(seconds, 3), "rows_per_s": round(len(rows) / seconds, 1),
            "encoder_load_s": round(load_s, 2)}


def _alignment_memory(dataset_dir: Path) -> dict:
    import datasets

    train = datasets.load_from_disk(str(dataset_dir))["train"].with_format("numpy", columns=["student_chunk_ids"])
    chunks = np.asarray([int(r.max()) + 1 for r in train["student_chunk_ids"]])
    batch_max = np.concatenate([np.full(len(b), b.max()) for b in np.array_split(chunks, -(-len(chunks) // BATCH))])
    ids_bytes = 4 * (L + L_T)
    return {
        "samples": len(chunks), "chunks_mean": round(float(chunks.mean()), 1), "chunks_max": int(chunks.max()),
        "chunk_ids_bytes": ids_bytes,
        "dense_own_c_bytes_mean": round(float(((L + L_T) * chunks).mean())),
        "dense_batch_c_bytes_mean": round(float(((L + L_T) * batch_max).mean())),
        "dense_at_c_max_bytes": (L + L_T) * int(chunks.max()),
    }


def _environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    versions = {p: importlib.metadata.version(p) for p in ("tokenizers", "transformers", "datasets", "numpy")}
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_sha": sha,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), **versions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="instruction rows per measurement")
    parser.add_argument("--num-proc", type=int, default=2, help="processes of the multi-process end-to-end run")
    args = parser.parse_args()
    cache = default_tokenizer_cache()
    qwen3, qwen35, spm = ensure_qwen3_tokenizer(cache), ensure_qwen35_tokenizer(cache), _spm_teacher(cache)
    corpus = ensure_instruct_jsonl(cache)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()[: args.rows]]
    teachers = {"A qwen3 <- qwen3.5": ("A", qwen35), "A qwen3 <- spm16k": ("A", spm), "B qwen3 <- qwen3": ("B", qwen3)}
    results: dict = {"environment": _environment(), "rows": len(rows), "seq_len": L, "teacher_seq_len": L_T,
                     "block_size": K, "encode": {}, "end_to_end": {}, "summaries": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (pipeline, teacher) in teachers.items():
            cfg = _config(pipeline, corpus, Path(tmp) / "unused", qwen3, teacher)
            results["encode"][name] = _encode_rate(cfg, rows)
        for name, (pipeline, teacher) in list(teachers.items())[:2]:
            for num_proc in sorted({1, args.num_proc}):
                out = Path(tmp) / f"{pipeline}-{teacher.name}-{num_proc}"
                cfg = _config(pipeline, corpus, out, qwen3, teacher, limit=len(rows), num_proc=num_proc,
                              shard_size=max(1, len(rows) // (4 * num_proc)))
                result = preprocess(cfg)
                results["end_to_end"][f"{name} x{num_proc}"] = {
                    "num_proc": num_proc, "seconds": round(result.seconds, 2),
                    "rows_per_s": round(len(rows) / result.seconds, 1),
                    "rows_per_s_per_process": round(len(rows) / result.seconds / num_proc, 1)}
                if num_proc == 1:
                    results["summaries"][name] = {k: result.summary[k] for k in ("rows", "tokens", "chunks")}
                    results["summaries"][name]["alignment_memory"] = _alignment_memory(out)
    _print(results)
    bench_dir = Path(os.environ.get("TIDE_BENCH_DIR", REPO / "bench_results"))
    bench_dir.mkdir(parents=True, exist_ok=True)
    (bench_dir / "preprocess.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {bench_dir / 'preprocess.json'}")


def _print(results: dict) -> None:
    env = results["environment"]
    print(f"\npreprocessing, {results['rows']} stdlib instruction rows, L={L} L_t={L_T} K={K}; {env['cpus']} CPUs, "
          f"python {env['python']}, tokenizers {env['tokenizers']}, git {env['git_sha'][:10]}")
    print(f"{'measurement':<34}{'rows/s':>10}{'rows/s/proc':>13}{'seconds':>9}{'load s':>8}")
    for name, r in results["encode"].items():
        print(f"{'encode  ' + name:<34}{r['rows_per_s']:>10}{r['rows_per_s']:>13}{r['seconds']:>9}"
              f"{r['encoder_load_s']:>8}")
    for name, r in results["end_to_end"].items():
        print(f"{'e2e     ' + name:<34}{r['rows_per_s']:>10}{r['rows_per_s_per_process']:>13}{r['seconds']:>9}")
    print("(encode: rows/s of ContractEncoder.encode in one process, after loading tokenizers and byte tables "
          "('load s'); e2e: preprocess() from start to published dataset, load included)")
    print(f"\n{'alignment memory / sample':<26}{'chunks':>8}{'chunk ids':>11}{'dense (own C)':>15}"
          f"{'dense (batch C)':>17}{'ratio':>7}")
    for name, s in results["summaries"].items():
        m, c = s["alignment_memory"], s["chunks"]
        ratio = m["dense_batch_c_bytes_mean"] / m["chunk_ids_bytes"]
        print(f"{name:<26}{m['chunks_mean']:>8}{m['chunk_ids_bytes']:>10}B{m['dense_own_c_bytes_mean']:>14}B"
              f"{m['dense_batch_c_bytes_mean']:>16}B{ratio:>6.0f}x   (bytes/chunk {c['bytes_per_chunk_mean']}, "
              f"response covered {c['response_bytes_covered']})")


if __name__ == "__main__":
    main()
