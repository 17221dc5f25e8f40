"""Rewrite the code's citations of the former out-of-tree documents into citations of ``docs/``.

    python tools/rewrite_citations.py            # rewrite in place, print every change
    python tools/rewrite_citations.py --check    # change nothing; exit 1 if anything would change

The code used to cite four documents that lived outside the repository: ``ALGORITHMS.md`` (the method),
``MODELS.md`` (architectures and checkpoints), ``DESIGN.md`` (invariants) and ``STYLE.md`` (conventions),
plus two notes (``ANCHORS.md``, ``INFRA_FEASIBILITY.md``). Their replacements live in the repository and keep
the same section numbers, so the rewrite is mechanical:

========================================  ====================
old                                       new
========================================  ====================
``ALGORITHMS.md``, ``spec`` (before §)    ``docs/method.md``
``MODELS.md``                             ``docs/models.md``
``DESIGN.md``, ``DESIGN`` (before a       ``docs/design.md``
decision or a quoted title)
``STYLE.md``                              ``CONTRIBUTING.md``
``ANCHORS.md``                            ``docs/anchors.md``
``INFRA_FEASIBILITY(.md)``                ``docs/infra.md``
========================================  ====================

A ``spec/`` or ``../shared/spec/`` prefix and a ``spec`` word before a document name are dropped. A bare
``§N`` (or ``Appendix X``) that does not continue a citation group (``ALGORITHMS.md §1.3–§1.4``,
``spec §3.2, §3.3``) gets the document it refers to written in front of it: the first document the file
cites with a section (``docs/design.md`` aside, whose sections are decisions), else the method; the
few exceptions are listed in ``OVERRIDES``. Citations already in the new form are left alone, so a second
run changes nothing. Every section the rewritten text cites is then looked up in the new document, and
the ones that are not headings there are reported (exit status 2).

Files: every tracked or untracked, non-ignored ``*.py``, ``*.md``, ``*.sh``, ``*.yaml`` of the repository,
except the new documents themselves (whose bare ``§N`` refer to themselves) and this script's own files.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Old document name -> new path (relative to the repository root).
NEW_PATH = {
    "ALGORITHMS": "docs/method.md",
    "MODELS": "docs/models.md",
    "DESIGN": "docs/design.md",
    "STYLE": "CONTRIBUTING.md",
    "ANCHORS": "docs/anchors.md",
    "INFRA_FEASIBILITY": "docs/infra.md",
}
DOCS = sorted(set(NEW_PATH.values()))
SUFFIXES = (".py", ".md", ".sh", ".yaml")
#: Files never rewritten: the new documents (their bare § are internal) and the two files that spell the old
#: names on purpose.
SKIP = set(DOCS) | {"tools/rewrite_citations.py", "tests/test_docs_citations.py"}

#: (path, text just before the §) -> document, where the file's first cited document is not the one meant.
OVERRIDES = {
    # "ANCHORS.md §2.3 targets" heads the file, but this § is the attention mask of the method.
    ("tests/benchmarks/test_bench_bd3lm_attention.py", "of True entries of the "): "docs/method.md",
}

_OLD_NAME = r"(?P<name>ALGORITHMS|MODELS|DESIGN|STYLE|ANCHORS|INFRA_FEASIBILITY)"
#: An old document name with its optional path and "spec " prefixes. ``DESIGN`` and ``INFRA_FEASIBILITY`` were
#: also written without ``.md``; the other names only count with it (``MODELS`` alone is an ordinary word).
OLD_DOC = re.compile(
    r"(?:(?:\.\./)?(?:shared/)?spec/|\b[Ss]pec (?=[A-Z_]+(?:\.md)?\b))?"
    + _OLD_NAME
    + r"(?P<md>\.md)?\b"
)
#: "spec" used as the name of the method document: directly before a § or an appendix.
SPEC_WORD = re.compile(r"\b[Ss]pec(?= (?:§|Appendix [A-C]\b))")
NEW_DOC = re.compile(r"(?:docs/(?:method|models|design|anchors|infra)\.md|CONTRIBUTING\.md)")
#: One section reference: §N[.N...] or Appendix X.
SECTION = re.compile(r"§\s?(?P<num>\d+(?:\.\d+)*)|\bAppendix (?P<app>[A-C])\b")
#: What may stand between two sections of one group (``§1.3–§1.4``, ``§3.2, §3.3``, ``§5.3,\n  §15``).
JOINER = re.compile(r"[ \t]*(?:[,;/–-]|and|or)?[ \t]*(?:\n[ \t#]*)?$")


@dataclass
class Change:
    path: str
    line: int
    before: str
    after: str


def repo_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files under ``root`` with one of ``SUFFIXES``."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    return sorted(p for p in set(out.splitlines()) if p.endswith(SUFFIXES) and p not in SKIP and (root / p).is_file())


def _old_name_ok(m: re.Match) -> bool:
    """Whether a match of ``OLD_DOC`` is a document: ``X.md`` always; ``INFRA_FEASIBILITY`` bare too; ``DESIGN``
    bare only before a decision number or a quoted title (``DESIGN decision 7``); ``MODELS`` alone is a word."""
    if m.group("md") or m.group("name") == "INFRA_FEASIBILITY":
        return True
    return m.group("name") == "DESIGN" and re.match(r'[,\s]+(?:decision \d|")', m.string[m.end():]) is not None


def context_doc(text: str) -> str:
    """The document a bare § of ``text`` (already renamed) refers to: the first one the file names, the design
    note aside (its sections are decisions), else the method."""
    for m in NEW_DOC.finditer(text):
        if m.group(0) != "docs/design.md":
            return m.group(0)
    return "docs/method.md"


def rewrite_text(path: str, text: str) -> str:
    """The rewritten text of one file (names first, then bare sections)."""

    def rename(m: re.Match) -> str:
        return NEW_PATH[m.group("name")] if _old_name_ok(m) else m.group(0)

    text = OLD_DOC.sub(rename, text)
    text = SPEC_WORD.sub("docs/method.md", text)
    default = context_doc(text)

    out: list[str] = []
    pos = 0
    group_end = -1  # end of the last section that belongs to a citation group
    doc_ends = {m.end() for m in NEW_DOC.finditer(text)}
    for m in SECTION.finditer(text):
        start = m.start()
        before = text[:start]
        stripped = before.rstrip(" ,")
        head = stripped.endswith(tuple(DOCS)) and len(stripped) in doc_ends
        joined = group_end >= 0 and JOINER.match(text[group_end:start]) is not None
        if head or joined:
            group_end = m.end()
            continue
        doc = default
        for (p, prefix), forced in OVERRIDES.items():
            if p == path and before.endswith(prefix):
                doc = forced
        out.append(text[pos:start] + doc + " ")
        pos = start
        group_end = m.end()
    out.append(text[pos:])
    return "".join(out)


def headings(doc: Path) -> tuple[set[str], set[str]]:
    """Section numbers (``"7.5"``, ``"Appendix A"``, ``"decision 3"``) and lowercase heading texts of ``doc``."""
    numbers: set[str] = set()
    titles: set[str] = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        title = m.group(1).strip()
        titles.add(title.lower())
        num = re.match(r"§?(\d+(?:\.\d+)*)\.?(?:\s|$)", title)
        if num:
            numbers.add(num.group(1))
        app = re.match(r"Appendix ([A-C])\b", title)
        if app:
            numbers.add(f"Appendix {app.group(1)}")
        dec = re.match(r"Decision (\d+)\b", title)
        if dec:
            numbers.add(f"decision {dec.group(1)}")
    return numbers, titles


def missing_sections(root: Path, path: str, text: str) -> list[str]:
    """Citations in ``text`` (new form) whose document or heading does not exist, as readable strings."""
    problems = []
    cache: dict[str, tuple[set[str], set[str]]] = {}
    for doc, section in iter_citations(text):
        if not (root / doc).is_file():
            problems.append(f"{path}: {doc} does not exist (cited {section})")
            continue
        numbers, titles = cache.setdefault(doc, headings(root / doc))
        if section.startswith('"'):
            ok = any(section.strip('"').lower() in t for t in titles)
        else:
            ok = section in numbers
        if not ok:
            problems.append(f"{path}: {doc} has no heading {section}")
    return problems


def iter_citations(text: str):
    """Yield ``(doc, section)`` for every citation in the new form: groups of § and appendices after a
    document path, ``decision N`` and quoted titles after ``docs/design.md``."""
    for m in NEW_DOC.finditer(text):
        doc = m.group(0)
        rest = text[m.end():]
        dm = re.match(r"[,\s#]*decision (\d+)", rest)
        if dm:
            yield doc, f"decision {dm.group(1)}"
            continue
        qm = re.match(r' "([^"]+)"', rest)
        if qm:
            yield doc, f'"{qm.group(1)}"'
            continue
        end = m.end()
        first = True
        for s in SECTION.finditer(text, end):
            gap = text[end:s.start()]
            if first:
                if gap.strip(" ,") != "":
                    break
            elif JOINER.match(gap) is None:
                break
            first = False
            end = s.end()
            yield doc, s.group("num") or f"Appendix {s.group('app')}"
            if s.group("num"):
                tail = re.match(r"[–-](\d+(?:\.\d+)+)", text[end:])  # "§7.1-7.2": the range's end
                if tail:
                    yield doc, tail.group(1)
                    end += tail.end()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's repository)")
    args = ap.parse_args(argv)
    root = args.root.resolve()

    changes: list[Change] = []
    problems: list[str] = []
    changed_files = 0
    for path in repo_files(root):
        text = (root / path).read_text(encoding="utf-8")
        new = rewrite_text(path, text)
        if new != text:
            changed_files += 1
            old_lines, new_lines = text.splitlines(), new.splitlines()
            for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)):
                if a != b:
                    changes.append(Change(path, i + 1, a.strip(), b.strip()))
            if not args.check:
                (root / path).write_text(new, encoding="utf-8")
        problems += missing_sections(root, path, new)
        leftovers = [m.group(0) for m in OLD_DOC.finditer(new) if _old_name_ok(m)]
        problems += [f"{path}: old document name left: {x}" for x in leftovers]

    for c in changes:
        print(f"{c.path}:{c.line}\n  - {c.before}\n  + {c.after}")
    verb = "would change" if args.check else "changed"
    print(f"{verb} {len(changes)} line(s) in {changed_files} file(s)")
    for p in problems:
        print(f"UNMAPPED {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} citation(s) could not be mapped to a heading", file=sys.stderr)
        return 2
    return 1 if args.check and changes else 0


if __name__ == "__main__":
    sys.exit(main())
