"""Checkpoints that verify themselves: ``manifest.json`` lists every file with its size (and SHA-256 up to 64 MiB).

Rank 0 writes the manifest last, into the staging directory, once every rank has written its files; the
checkpoint is then published by one rename (:mod:`tide_ds.trainer.checkpoint`). Before a resume, each
rank checks the files it will read (the shared ones and its own ZeRO partition; all of them when the
number of ranks changed); a checkpoint that fails anywhere is skipped on every rank for the newest one
that passed everywhere (:func:`tide_ds.trainer.checkpoint.agree_on_checkpoint`).

A checkpoint written before manifests existed (:func:`is_legacy`: published, so complete, by the same
one rename, but with no ``manifest.json``) is not lost: it is loaded with one warning naming it
(:data:`LEGACY_NOTE`); only a checkpoint whose manifest exists and fails (or is unreadable) is skipped.

    python -m tide_ds.trainer.manifest check CKPT_DIR...   # what is wrong, per checkpoint (exit 1 if anything)
    python -m tide_ds.trainer.manifest write CKPT_DIR...   # a manifest for a checkpoint you trust (older tide-ds:
                                                           # verified from then on instead of loaded unchecked)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = "manifest.json"
#: Files up to this size also get a SHA-256 (small files: a truncation may keep a size; big ones are checked by size).
CHECKSUM_MAX_BYTES = 64 << 20
#: What readers say of a checkpoint from a tide-ds without manifests, which they load unchecked.
LEGACY_NOTE = "written before manifests; not verified"
_RANK_FILE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def build(ckpt_dir: Path) -> dict:
    """The manifest of every file under ``ckpt_dir`` (except itself)."""
    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        entry = {"size": size}
        if size <= CHECKSUM_MAX_BYTES:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(ckpt_dir).as_posix()] = entry
    return {"format": 1, "files": files, "total_bytes": sum(e["size"] for e in files.values())}


def write(ckpt_dir: Path) -> dict:
    """Write ``manifest.json`` (fsynced, atomically) and return it."""
    manifest = build(ckpt_dir)
    tmp = ckpt_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt_dir / MANIFEST)
    return manifest


def read(ckpt_dir: Path) -> dict:
    """The manifest, or ``ValueError`` saying why it cannot be used."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST}, and its trainer_state.json or config.yaml is missing or unreadable "
                         "(an incomplete or damaged checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
    return manifest


def is_legacy(ckpt_dir: Path) -> bool:
    """A complete checkpoint of a tide-ds from before manifests: no ``manifest.json``, a readable trainer state.

    Such a checkpoint was published by the same atomic rename from its staging directory (a published one
    is complete); this tide-ds writes the manifest before that rename, so a published checkpoint of its own
    always has one. A damaged ``trainer_state.json`` is not taken for a legacy checkpoint (:func:`problems`
    names it).
    """
    if (ckpt_dir / MANIFEST).exists() or not (ckpt_dir / "config.yaml").is_file():
        return False
    try:
        return isinstance(json.loads((ckpt_dir / "trainer_state.json").read_text()).get("step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def total_bytes(ckpt_dir: Path) -> int | None:
    try:
        return int(read(ckpt_dir)["total_bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def files_for_rank(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank ``rank`` reads: shared ones and its own partition; all when the number of ranks changed."""
    owners = {int(m.group(1)) for n in names if (m := _RANK_FILE.search(n))}
    if owners and owners != set(range(world_size)):
        return list(names)
    return [n for n in names if not (m := _RANK_FILE.search(n)) or int(m.group(1)) == rank]


def problems(ckpt_dir: Path, *, rank: int = 0, world_size: int | None = None) -> list[str]:
    """What is wrong with the files this rank would read from ``ckpt_dir`` (empty when it verifies, or when
    it is a legacy checkpoint, :func:`is_legacy`, which the caller names with :data:`LEGACY_NOTE`);
    ``world_size=None``: every file (a single-process reader such as generate or export)."""
    if is_legacy(ckpt_dir):
        return []
    try:
        files = read(ckpt_dir)["files"]
    except ValueError as err:
        return [str(err)]
    found = []
    names = sorted(files) if world_size is None else files_for_rank(sorted(files), rank, world_size)
    for name in names:
        entry, path = files[name], ckpt_dir / name
        if not path.is_file():
            found.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            found.append(f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)")
        elif "sha256" in entry and _sha256(path) != entry["sha256"]:
            found.append(f"{name} does not match its SHA-256 in the manifest (corrupted)")
    return found


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tide_ds.trainer.manifest", description="check or write manifests")
    parser.add_argument("command", choices=["check", "write"])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args(argv)
    bad = 0
    for ckpt in args.checkpoints:
        if not ckpt.is_dir():
            print(f"{ckpt}: not a directory", file=sys.stderr)
            bad += 1
        elif args.command == "write":
            m = write(ckpt)
            print(f"{ckpt}: manifest of {len(m['files'])} files, {m['total_bytes']} bytes")
        else:
            issues = problems(ckpt)
            bad += bool(issues)
            print(f"{ckpt}: " + ("; ".join(issues) if issues else f"ok ({LEGACY_NOTE})" if is_legacy(ckpt) else "ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(_main())
