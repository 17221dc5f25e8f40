"""Every citation in the tree points at a document of the repository and at a heading that exists there.

A citation is ``<doc> §N`` (a group like ``§1.3–§1.4`` or ``§3.2, §3.3`` shares its document), ``<doc> Appendix X``,
``docs/design.md decision N`` or ``docs/design.md "<title>"``, where ``<doc>`` is ``docs/<name>.md`` or
``CONTRIBUTING.md``. Inside those documents a bare ``§N`` refers to the document itself. Anywhere else a bare ``§``
or a name of the former out-of-tree documents (``ALGORITHMS.md``, ``MODELS.md``, ...) is an error:
``python tools/rewrite_citations.py`` rewrites them.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_RE = r"(?:docs/[a-z_]+\.md|CONTRIBUTING\.md)"
SECTION_RE = re.compile(r"§\s?(\d+(?:\.\d+)*)|\bAppendix ([A-C])\b")
#: What may separate two sections of one group: a comma, a dash, a slash, "and", a line break.
JOIN_RE = re.compile(r"[ \t]*(?:[,;/–-]|and|or)?[ \t]*(?:\n[ \t#]*)?")
OLD_NAMES = re.compile(r"\b(?:ALGORITHMS|MODELS|STYLE|DESIGN|ANCHORS)\.md\b|\bINFRA_FEASIBILITY\b|\bDESIGN decision\b")
SELF = {"tools/rewrite_citations.py", "tests/test_docs_citations.py"}


def _files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return sorted(
        p for p in set(out.splitlines())
        if p.endswith((".py", ".md", ".sh", ".yaml")) and p not in SELF and (ROOT / p).is_file()
    )


def _headings(doc: str) -> tuple[set[str], list[str]]:
    """Section keys ("7.5", "Appendix A", "decision 3") and lowercase titles of ``doc``'s headings."""
    keys: set[str] = set()
    titles: list[str] = []
    for line in (ROOT / doc).read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        title = m.group(1).strip()
        titles.append(title.lower())
        for pattern, fmt in ((r"§?(\d+(?:\.\d+)*)\.?(?:\s|$)", "{}"), (r"Appendix ([A-C])\b", "Appendix {}"),
                             (r"Decision (\d+)\b", "decision {}")):
            k = re.match(pattern, title)
            if k:
                keys.add(fmt.format(k.group(1)))
    return keys, titles


def citations(path: str, text: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """``([(doc, key, line)], [problems])`` for one file. Keys: "7.5", "Appendix A", "decision 3", '"title"'."""
    own = path if re.fullmatch(DOC_RE, path) else None
    found: list[tuple[str, str, int]] = []
    problems: list[str] = []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    doc_ends = {m.end(): m.group(0) for m in re.finditer(DOC_RE, text)}
    group_doc, group_end = None, -1
    for m in SECTION_RE.finditer(text):
        before = text[: m.start()].rstrip(" ,")
        key = m.group(1) or f"Appendix {m.group(2)}"
        if len(before) in doc_ends:
            doc = doc_ends[len(before)]
        elif group_doc and JOIN_RE.fullmatch(text[group_end:m.start()]):
            doc = group_doc
        elif own:
            doc = own
        elif m.group(2):  # "Appendix" is also an ordinary word; only a § must always be attributed
            continue
        else:
            problems.append(f"{path}:{line_of(m.start())}: {m.group(0)} names no document")
            continue
        found.append((doc, key, line_of(m.start())))
        end = m.end()
        tail = re.match(r"[–-](\d+(?:\.\d+)+)", text[end:]) if m.group(1) else None  # "§7.1-7.2"
        if tail:
            found.append((doc, tail.group(1), line_of(m.start())))
            end += tail.end()
        group_doc, group_end = doc, end
    for m in re.finditer(r"docs/design\.md(?:,|\s)+(?:decision (\d+)|\"([^\"]+)\")", text):
        key = f"decision {m.group(1)}" if m.group(1) else f'"{m.group(2)}"'
        found.append(("docs/design.md", key, line_of(m.start())))
    for m in OLD_NAMES.finditer(text):
        problems.append(f"{path}:{line_of(m.start())}: former out-of-tree document {m.group(0)!r}")
    return found, problems


def test_every_citation_resolves_to_a_heading():
    cache: dict[str, tuple[set[str], list[str]]] = {}
    problems: list[str] = []
    n = 0
    for path in _files():
        found, bad = citations(path, (ROOT / path).read_text(encoding="utf-8"))
        problems += bad
        for doc, key, line in found:
            n += 1
            if not (ROOT / doc).is_file():
                problems.append(f"{path}:{line}: {doc} does not exist")
                continue
            keys, titles = cache.setdefault(doc, _headings(doc))
            ok = any(key.strip('"').lower() in t for t in titles) if key.startswith('"') else key in keys
            if not ok:
                problems.append(f"{path}:{line}: {doc} has no heading {key}")
    assert not problems, (
        f"{len(problems)} of the tree's citations do not resolve (run python tools/rewrite_citations.py for "
        "old-style ones):\n" + "\n".join(problems[:60])
    )
    assert n > 300, f"only {n} citations found: the parser has lost track of the tree's citation style"


def _rewriter():
    spec = importlib.util.spec_from_file_location("rewrite_citations", ROOT / "tools" / "rewrite_citations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("(spec ALGORITHMS.md §1.3–§1.4)", "(docs/method.md §1.3–§1.4)"),
        ("spec §3.2, §3.3, §6", "docs/method.md §3.2, §3.3, §6"),
        ("see spec/MODELS.md §7.4 and STYLE.md §4", "see docs/models.md §7.4 and CONTRIBUTING.md §4"),
        ("(DESIGN.md decision 3) and (DESIGN decision 7)", "(docs/design.md decision 3) and (docs/design.md decision 7)"),
        ("../shared/spec/INFRA_FEASIBILITY.md §1; INFRA_FEASIBILITY §1.4.3", "docs/infra.md §1; docs/infra.md §1.4.3"),
        ("spec Appendix B", "docs/method.md Appendix B"),
        ("MODELS.md §3 (routing), later (§3.3)", "docs/models.md §3 (routing), later (docs/models.md §3.3)"),
        ("a bare one (§8) and § 9.3", "a bare one (docs/method.md §8) and docs/method.md § 9.3"),
        ("MODELS of many kinds, the spec's formula, a DESIGN choice", "MODELS of many kinds, the spec's formula, a DESIGN choice"),
    ],
)
def test_rewrite_citations_maps_old_forms_and_is_idempotent(old, new):
    rw = _rewriter()
    assert rw.rewrite_text("x.py", old) == new
    assert rw.rewrite_text("x.py", new) == new


def test_rewrite_citations_check_mode_changes_nothing(tmp_path):
    """--check on a repository with an old citation reports it, exits 1 and leaves the file as it was."""
    rw = _rewriter()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## 7. TIDAL\n\n### 7.5 Why forward only\n")
    src = tmp_path / "a.py"
    src.write_text('"""See ALGORITHMS.md §7.5 and §7."""\n')
    assert rw.main(["--check", "--root", str(tmp_path)]) == 1
    assert src.read_text() == '"""See ALGORITHMS.md §7.5 and §7."""\n'
    assert rw.main(["--root", str(tmp_path)]) == 0
    assert src.read_text() == '"""See docs/method.md §7.5 and §7."""\n'
    assert rw.main(["--check", "--root", str(tmp_path)]) == 0
    src.write_text('"""See ALGORITHMS.md §7.4."""\n')  # no such heading: reported, exit 2
    assert rw.main(["--root", str(tmp_path)]) == 2
