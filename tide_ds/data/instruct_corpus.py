"""The demo instruction corpus: the Python standard library's functions, as prompt -> body (docs/design.md "the small world").

For every function or method with a docstring, the user message shows its signature (decorators and
``def`` line(s)) and its docstring as written in the source, in a code block; the assistant answers
with the body that follows the docstring, as written (comments included). Both are cut out of the
source with ``ast`` positions and dedented by the ``def``'s indentation, except the continuation lines
of multi-line strings (their text is data). Functions whose body is only the docstring (or a ``pass``
/ ``...`` after it), whose docstring shares a line with code, or whose body exceeds the size limits
are skipped.

The corpus is one JSONL file, one ``{"messages": [user, assistant], "source": relpath}`` object per line,
ordered by file and position. :mod:`tide_ds.data.preprocess` splits it by ``source`` with
:func:`tide_ds.data.corpus.split_of`, so the train/held-out split is by file, as for the plain code corpus
(:func:`split_of_row` gives a row's split).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tide_ds.data.corpus import _select, split_of, stdlib_root, stdlib_source_files
from tide_ds.data.tokenizers import default_tokenizer_cache
from tide_ds.utils.files import atomic_path, file_lock

logger = logging.getLogger(__name__)

INSTRUCTION = "Write the Python function with this signature and docstring."
#: Bumped whenever the rows change, so cached corpora of an older version are rebuilt.
INSTRUCT_FORMAT = 1
MAX_BODY_LINES = 80
MAX_BODY_CHARS = 4000


class FunctionSample(NamedTuple):
    """One function: the ``header`` (signature + docstring) and ``body`` source, both dedented."""

    name: str
    lineno: int
    header: str
    body: str


def _string_continuation_lines(node: ast.AST) -> set[int]:
    """1-based numbers of the lines that continue a multi-line string literal inside ``node``."""
    lines: set[int] = set()
    for sub in ast.walk(node):
        is_string = isinstance(sub, ast.JoinedStr) or (isinstance(sub, ast.Constant) and isinstance(sub.value, (str, bytes)))
        if is_string and sub.end_lineno and sub.end_lineno > sub.lineno:
            lines.update(range(sub.lineno + 1, sub.end_lineno + 1))
    return lines


def _dedent(lines: list[str], first_lineno: int, indent: str, keep: set[int]) -> str:
    """Strip ``indent`` from each line (1-based number ``first_lineno + i``) unless it is in ``keep``."""
    out = []
    for i, line in enumerate(lines):
        if first_lineno + i not in keep and line.startswith(indent):
            line = line[len(indent):]
        elif first_lineno + i not in keep and not line.strip():
            line = "\n" if line.endswith("\n") else ""
        out.append(line)
    return "".join(out)


def _trivial(body: list[ast.stmt]) -> bool:
    """Whether the statements after the docstring do nothing (none, ``pass`` or ``...``)."""
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
            continue
        return False
    return True


def functions_of_source(source: str, *, max_body_lines: int = MAX_BODY_LINES,
                        max_body_chars: int = MAX_BODY_CHARS) -> Iterator[FunctionSample]:
    """The documented functions of one module's source, in source order (nested ones too).

    Raises ``SyntaxError`` if the source does not parse with the running interpreter.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda n: (n.lineno, n.col_offset)):
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        doc, rest = node.body[0], node.body[1:]
        if _trivial(rest) or doc.lineno == node.lineno or rest[0].lineno == doc.end_lineno:
            continue  # nothing to write, or docstring and code share a line
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        body_lines = lines[doc.end_lineno:node.end_lineno]
        if len(body_lines) > max_body_lines or sum(map(len, body_lines)) > max_body_chars:
            continue
        def_line = lines[node.lineno - 1]
        indent = def_line[: len(def_line) - len(def_line.lstrip(" \t"))]
        # Docstring lines are dedented with the code (their value is cleaned anyway); other strings are data.
        keep = _string_continuation_lines(node) - set(range(doc.lineno, doc.end_lineno + 1))
        header = _dedent(lines[start - 1:doc.end_lineno], start, indent, keep).rstrip("\n")
        body = _dedent(body_lines, doc.end_lineno + 1, indent, keep).strip("\n")
        yield FunctionSample(node.name, node.lineno, header, body)


def messages_of(sample: FunctionSample) -> list[dict[str, str]]:
    """The conversation of one function: a user request showing the header, the body as the answer."""
    prompt = f"{INSTRUCTION}\n\n```python\n{sample.header}\n```"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": sample.body}]


def split_of_row(row: dict, *, heldout_fraction: float) -> str:
    """``"train"`` or ``"heldout"``: the split of the row's source file (as the preprocessing decides it)."""
    return split_of(row["source"], heldout_fraction=heldout_fraction)


def instruct_rows(*, max_files: int | None = None, heldout_fraction: float = 0.02) -> Iterator[dict]:
    """The corpus rows, ordered by relative path, then position in the file.

    ``max_files`` keeps that many standard-library files, spread over both splits of
    ``heldout_fraction`` (as :func:`tide_ds.data.corpus.build_code_corpus` selects them).
    Files that do not parse with this interpreter are skipped (logged).
    """
    root = stdlib_root()
    paths = {p.relative_to(root).as_posix(): p for p in stdlib_source_files()}
    if max_files is not None:  # a small selection takes files that define functions, and a few held-out ones
        paths = {k: p for k, p in paths.items() if "def " in p.read_text(encoding="utf-8", errors="replace")}
    for relpath in _select(sorted(paths), heldout_fraction=heldout_fraction, max_files=max_files,
                           min_heldout=1 if max_files is None else 3):
        source = paths[relpath].read_text(encoding="utf-8")
        try:
            samples = list(functions_of_source(source))
        except SyntaxError as err:
            logger.warning("skipping %s: it does not parse (%s)", relpath, err)
            continue
        for sample in samples:
            yield {"messages": messages_of(sample), "source": relpath}


def build_instruct_jsonl(out_path: str | Path, *, max_files: int | None = None,
                         heldout_fraction: float = 0.02) -> tuple[Path, int]:
    """Write the corpus to ``out_path`` atomically (temporary file + rename); returns (path, rows)."""
    out_path = Path(out_path).absolute()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start, count = time.perf_counter(), 0
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in instruct_rows(max_files=max_files, heldout_fraction=heldout_fraction):
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    logger.info("wrote %d instruction rows to %s (%.1f s)", count, out_path, time.perf_counter() - start)
    return out_path, count


def ensure_instruct_jsonl(cache_dir: str | Path | None = None, *, max_files: int | None = None,
                          heldout_fraction: float = 0.02) -> Path:
    """The corpus under ``<cache>/corpora/stdlib-instruct-<key>.jsonl``, built on first use (process-safe).

    ``key`` hashes the format version, the interpreter version, the standard library path and the
    arguments (``heldout_fraction`` only matters with ``max_files``). The whole library takes ~15 s.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_tokenizer_cache()
    args = {"format": INSTRUCT_FORMAT, "python": platform.python_version(), "stdlib": str(stdlib_root()),
            "max_files": max_files, "heldout_fraction": heldout_fraction if max_files else None}
    if max_files:  # version 2 of the small selection (files with functions, >= 3 held out)
        args["selection"] = 2
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    out = (cache / "corpora" / f"stdlib-instruct-{key}.jsonl").absolute()
    if out.is_file():
        return out
    with file_lock(out.parent / f".stdlib-instruct-{key}.lock"):
        if not out.is_file():
            build_instruct_jsonl(out, max_files=max_files, heldout_fraction=heldout_fraction)
    return out


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.data.instruct_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSONL file to write; default: the cached corpus (printed)")
    parser.add_argument("--max-files", type=int, default=None, help="use this many standard-library files")
    parser.add_argument("--heldout-fraction", type=float, default=0.02,
                        help="spreads --max-files over both splits; use the same value in preprocessing")
    args = parser.parse_args(argv)
    if args.out:
        path, count = build_instruct_jsonl(args.out, max_files=args.max_files, heldout_fraction=args.heldout_fraction)
        print(f"{path}: {count} rows")
    else:
        print(ensure_instruct_jsonl(max_files=args.max_files, heldout_fraction=args.heldout_fraction))


if __name__ == "__main__":
    _main()
