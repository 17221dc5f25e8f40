"""File utilities: atomic writes, atomic directory publishing, advisory locks, file hashes.

Everything that writes a file other processes may read goes through :func:`atomic_path` /
:func:`atomic_write_text` (write beside the target, then one rename), and every cached directory through
:func:`staging_dir` + :func:`publish_dir`, so a crash or two concurrent writers never leave a half-written
file or directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "file_lock", "publish_dir", "sha256_file", "staging_dir"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same directory, same suffix) to write; when the block ends without an
    error it replaces ``path`` in one rename, otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically; ``fsync`` flushes it to the disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def staging_dir(out_dir: Path) -> Path:
    """A fresh, empty directory beside ``out_dir`` (same file system, so a rename can publish it)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staged.chmod(0o755)  # mkdtemp makes it private; the published directory is shared like any other
    return staged


def publish_dir(staged: Path, out_dir: Path, *, replace: bool) -> bool:
    """Move the finished directory ``staged`` to ``out_dir`` in one rename.

    If ``out_dir`` exists: with ``replace`` it is moved aside and deleted after the rename (it is
    missing only between two renames); without ``replace`` the staged copy is deleted and False is
    returned (another builder won the race; its result stands).
    """
    old = None
    if replace and out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    try:
        os.rename(staged, out_dir)  # fails on a non-empty existing directory: no silent merge
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or replace:
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return True


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) on ``path``, created if needed and removed on release.

    The holder unlinks the file before unlocking; a waiter that then gets the lock on the unlinked file
    notices (the path names another file, or none) and locks afresh, so two holders never coexist and no
    lock file stays behind. Where the file system has no locks the builders still stay correct (they
    publish by rename); the lock only saves duplicate work.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as err:
            logger.warning("cannot lock %s (%s); continuing without the lock", path, err)
            try:
                yield
            finally:
                fh.close()
            return
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()  # the previous holder removed this file meanwhile: lock the one now at ``path``
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
