"""The stdlib instruction corpus: functions cut out with ast, prompts with signature + docstring, split by file."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from tide_ds.data.instruct_corpus import (
    INSTRUCTION,
    build_instruct_jsonl,
    ensure_instruct_jsonl,
    functions_of_source,
    instruct_rows,
    messages_of,
    split_of_row,
)

HELDOUT = 0.3
MAX_FILES = 12

SOURCE = textwrap.dedent('''
    import functools


    def plain(a, b=1):
        """Add two numbers.

        Returns their sum.
        """
        # a comment inside the body
        return a + b


    def only_docstring():
        """Nothing else."""


    def only_pass():
        """Just pass."""
        pass


    def no_docstring(x):
        return x


    def one_line(): "doc"; return 1


    class Box:
        @functools.cache
        def method(self,
                   key: str) -> str:
            """Look ``key`` up.

            Indented docstring text.
            """
            text = """first
    at column four
            at column eight"""
            if key:
                return text
            return key

        async def fetch(self):
            """Fetch it."""
            def inner(y):
                """Inner helper."""
                return y * 2
            return inner(3)
''')


def _header(sample_prompt: str) -> str:
    return sample_prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]


def test_functions_of_source_cuts_header_and_body() -> None:
    samples = {s.name: s for s in functions_of_source(SOURCE)}
    assert sorted(samples) == ["fetch", "inner", "method", "plain"]  # docstring-only, pass-only, no-doc, one-line skipped
    plain = samples["plain"]
    assert plain.header == 'def plain(a, b=1):\n    """Add two numbers.\n\n    Returns their sum.\n    """'
    assert plain.body == "    # a comment inside the body\n    return a + b"
    method = samples["method"]
    assert method.header.startswith("@functools.cache\ndef method(self,\n           key: str) -> str:\n")
    assert '    """Look ``key`` up.\n\n    Indented docstring text.\n    """' in method.header
    # A multi-line string in the body keeps its text byte for byte; the code around it is dedented.
    assert 'text = """first\nat column four\n        at column eight"""' in method.body
    assert method.body.splitlines()[0] == '    text = """first'
    assert method.body.endswith("\n    return key")
    fetch = samples["fetch"]
    assert fetch.header.startswith("async def fetch(self):") and "def inner(y):" in fetch.body
    for sample in samples.values():  # header + body is the function again, as valid code
        ast.parse(sample.header + "\n" + sample.body)


def test_functions_of_source_skips_huge_bodies() -> None:
    assert [s.name for s in functions_of_source(SOURCE, max_body_lines=4)] == ["plain", "fetch", "inner"]
    assert [s.name for s in functions_of_source(SOURCE, max_body_chars=30)] == ["inner"]


def test_messages_show_signature_and_docstring() -> None:
    sample = next(iter(functions_of_source(SOURCE)))
    user, assistant = messages_of(sample)
    assert user["role"] == "user" and assistant == {"role": "assistant", "content": sample.body}
    assert user["content"].startswith(INSTRUCTION) and _header(user["content"]) == sample.header


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(instruct_rows(max_files=MAX_FILES, heldout_fraction=HELDOUT))


def test_stdlib_rows_have_both_splits_by_file(rows: list[dict]) -> None:
    assert len(rows) >= 20
    splits = {split_of_row(r, heldout_fraction=HELDOUT) for r in rows}
    assert splits == {"train", "heldout"}
    by_source: dict[str, set[str]] = {}
    for row in rows:
        by_source.setdefault(row["source"], set()).add(split_of_row(row, heldout_fraction=HELDOUT))
    assert all(len(s) == 1 for s in by_source.values())
    assert [r["source"] for r in rows] == sorted(r["source"] for r in rows)  # ordered by file


def test_stdlib_prompts_contain_signature_and_docstring(rows: list[dict]) -> None:
    from tide_ds.data.corpus import stdlib_root

    root = stdlib_root()
    trees = {}
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant") and assistant["content"].strip()
        header = _header(user["content"])
        ast.parse(header + "\n" + assistant["content"])
        source = row["source"]
        if source not in trees:
            trees[source] = ast.parse((root / source).read_text(encoding="utf-8"))
        (name,) = {line.split("def ", 1)[1].split("(", 1)[0] for line in header.splitlines()
                   if line.lstrip().startswith(("def ", "async def "))}
        docstrings = [ast.get_docstring(n) for n in ast.walk(trees[source])
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
        assert any(d and d.splitlines()[0] in header for d in docstrings), (source, name)


def test_jsonl_file_and_cache(tmp_path: Path, rows: list[dict]) -> None:
    path, count = build_instruct_jsonl(tmp_path / "x.jsonl", max_files=MAX_FILES, heldout_fraction=HELDOUT)
    assert count == len(rows) and [json.loads(line) for line in path.read_text().splitlines()] == rows
    cached = ensure_instruct_jsonl(tmp_path / "cache", max_files=MAX_FILES, heldout_fraction=HELDOUT)
    assert cached.read_bytes() == path.read_bytes()
    stamp = cached.stat().st_mtime_ns
    assert ensure_instruct_jsonl(tmp_path / "cache", max_files=MAX_FILES, heldout_fraction=HELDOUT) == cached
    assert cached.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(cached.parent.glob(".*.tmp-*"))
