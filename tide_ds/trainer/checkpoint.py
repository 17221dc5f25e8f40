"""Run directories and checkpoints: never overwrite a run, never leave a half-written checkpoint.

Layout of a run directory::

    <output_dir>/
      .tide_ds_run            marker: this directory is a tide-ds run (resume and overwrite need it)
      config.yaml             resolved config of the latest start
      metrics.jsonl           one record per log interval / evaluation
      tensorboard/            TensorBoard events
      checkpoints/
        latest                name of the newest complete checkpoint
        step_00000100/        DeepSpeed files + config.yaml + trainer_state.json + manifest.json
        .staging/             checkpoints being written (never loaded)

A checkpoint is written into ``.staging/<tag>`` by every rank, and only after all ranks finished
does rank 0 move it to ``checkpoints/<tag>`` with one ``os.replace`` and then update ``latest``
(write aside, rename). A crash at any moment leaves either the previous complete checkpoint or
the new one, never a directory that loads half. The run directory lives on a file system that all
ranks share (as on every cluster that runs DeepSpeed checkpoints).

Each checkpoint carries a manifest (:mod:`tide_ds.trainer.manifest`); a resume verifies it on every rank
and loads the newest checkpoint that verified on all of them, naming the ones it skips. Before a
checkpoint is written, the free space is compared with the size of the last one (or an estimate before
the first); too little stops the run with the previous checkpoint intact, and any error while writing
is reported with its path and cause, the partial files removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tide_ds import dist, failfast
from tide_ds.config import RunConfig
from tide_ds.errors import ConfigError
from tide_ds.trainer import manifest, universal
from tide_ds.utils.files import atomic_write_text

logger = logging.getLogger(__name__)

CKPT_SUBDIR = "checkpoints"
STAGING = ".staging"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=True)


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = TAG_RE.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def latest_verified_checkpoint(output_dir: str | Path) -> tuple[Path | None, dict[str, list[str]]]:
    """For one reader (generate, eval, export): the newest checkpoint whose every file matches its manifest
    (or a legacy one without a manifest, loaded with a warning), and what is wrong with each newer one it
    skipped (logged by name)."""
    skipped: dict[str, list[str]] = {}
    for _, ckpt in reversed(complete_checkpoints(output_dir)):
        issues = manifest.problems(ckpt)
        if not issues:
            if manifest.is_legacy(ckpt):
                logger.warning("loading checkpoint %s: %s", ckpt, manifest.LEGACY_NOTE)
            return ckpt, skipped
        skipped[ckpt.name] = issues
        logger.warning("skipping checkpoint %s: %s", ckpt, "; ".join(issues))
    return None, skipped


#: Written by tide-ds into every run directory it creates: only a directory holding it (or checkpoints) is a run.
RUN_MARKER = ".tide_ds_run"


#: What a launcher puts into a run directory before tide-ds starts: the Slurm job's log folder (``submit.py``
#: and ``tide.sbatch`` write ``<run>/logs/<job>.log`` from the job's first line), and the evidence runner's
#: run spec, log and exit record (``tide_ds.experiments.evidence`` writes them before and after each run);
#: they do not make a run.
LAUNCHER_ENTRIES = frozenset({"logs", "evidence_run.json", "train.log", "evidence_exit.json"})


def _entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name not in LAUNCHER_ENTRIES]


def _has_run_content(out: Path) -> bool:
    return out.is_dir() and bool(_entries(out))


def _is_run(out: Path) -> bool:
    """A tide-ds run directory: the marker, or (runs from before the marker) complete checkpoints."""
    return (out / RUN_MARKER).is_file() or bool(complete_checkpoints(out))


def _listing(out: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in _entries(out))
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class RunDirDecision:
    """What rank 0 decided about the run directory, shared with every rank."""

    resume_from: str | None = None
    moved_aside: str | None = None
    error: str | None = None


def run_dir_error(cfg: RunConfig) -> str | None:
    """Why ``train.output_dir`` cannot be used as asked, or None; touches nothing (run before any work)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        return f"train.output_dir={str(out)!r} exists and is not a directory; pick another path"
    if not _has_run_content(out):
        return None
    if not _is_run(out):
        return (
            f"train.output_dir={str(out)!r} is not empty and is not a tide-ds run (no {RUN_MARKER}): it holds "
            f"{_listing(out)}. tide-ds writes only into its own run directories; choose another --train.output_dir"
        )
    if cfg.train.resume == "auto" or cfg.train.overwrite or not complete_checkpoints(out):
        return None  # continue it, move it aside, or (no checkpoint yet: it failed before one) start it again
    n = len(complete_checkpoints(out))
    return (
        f"train.output_dir={str(out)!r} already holds a run ({n} checkpoint(s)); tide-ds never "
        "overwrites or mixes into a run. Continue it with --train.resume=auto, move it aside with "
        "--train.overwrite=true, or choose another --train.output_dir"
    )


def _decide(cfg: RunConfig) -> RunDirDecision:
    out = Path(cfg.train.output_dir)
    error = run_dir_error(cfg)
    if error:
        return RunDirDecision(error=error)
    if cfg.train.resume == "auto":
        ckpt = latest_checkpoint(out)
        return RunDirDecision(resume_from=str(ckpt) if ckpt else None)
    if not _has_run_content(out) or not cfg.train.overwrite:
        return RunDirDecision()  # empty, or a run that stopped before its first checkpoint: start it again
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    os.replace(out, aside)
    return RunDirDecision(moved_aside=str(aside))


def prepare_run_dir(cfg: RunConfig) -> RunDirDecision:
    """Decide on rank 0 whether to start fresh, resume or refuse; every rank gets the same answer.

    Raises ``ConfigError`` on every rank when the directory holds a run and neither
    ``train.resume=auto`` nor ``train.overwrite=true`` was given, or when it is not a tide-ds run.
    """
    decision = _decide(cfg) if dist.rank() == 0 else None
    decision = dist.broadcast_object(decision)
    assert isinstance(decision, RunDirDecision)
    if decision.error:
        raise ConfigError(decision.error)
    if dist.rank() == 0:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():  # first, so that the directory is never a run without it
            _atomic_write(out / RUN_MARKER, json.dumps({"tide_ds_run": 1, "created": time.time()}) + "\n")
        (out / CKPT_SUBDIR).mkdir(exist_ok=True)
        shutil.rmtree(out / CKPT_SUBDIR / STAGING, ignore_errors=True)
        _atomic_write(out / "config.yaml", cfg.to_yaml())
        if decision.moved_aside:
            logger.info("moved the previous run in %s aside to %s", out, decision.moved_aside)
    dist.barrier()
    return decision


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, or an I/O error); the previous one is intact."""

    exit_code = 74  # sysexits' EX_IOERR


#: Bytes per parameter assumed before the first checkpoint: fp32 weights + Adam's fp32 master and two moments.
ESTIMATE_BYTES_PER_PARAM = 16
#: Room asked for beyond the last checkpoint's size (files grow a little with the step's metadata).
SPACE_MARGIN = 1.05


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def space_needed(engine, out: Path) -> tuple[int, str]:
    """Bytes the next checkpoint needs and where the number comes from (the last checkpoint, or an estimate)."""
    ckpts = complete_checkpoints(out)
    last = manifest.total_bytes(ckpts[-1][1]) if ckpts else None
    if last:
        return int(last * SPACE_MARGIN), f"the size of {ckpts[-1][1].name} plus {SPACE_MARGIN - 1:.0%}"
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return params * ESTIMATE_BYTES_PER_PARAM, f"{params} parameters x {ESTIMATE_BYTES_PER_PARAM} bytes"


def _check_space(engine, out: Path, root: Path, tag: str) -> None:
    """Rank 0 compares free space with what the checkpoint needs; every rank raises the same error."""
    error = None
    if dist.rank() == 0:
        needed, basis = space_needed(engine, out)
        free = free_bytes(root)
        if free < needed:
            latest = latest_checkpoint(out)
            error = (
                f"not enough disk space for checkpoint {tag} in {root}: needed {_gib(needed)} ({basis}), "
                f"free {_gib(free)}; training stopped, "
                + (f"the previous checkpoint {latest} is intact" if latest else "no checkpoint was written yet")
                + ". Free space there (keep_last=K needs room for K+1 checkpoints) and resume with --train.resume=auto"
            )
    error = dist.broadcast_object(error)
    if error:
        raise CheckpointWriteError(errno.ENOSPC, error)


def _describe_write_error(err: BaseException, where: Path) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        name = errno.errorcode.get(err.errno, str(err.errno))
        path = err.filename or where
        return f"{err.strerror or os.strerror(err.errno)} [{name}] at {path}"
    text = f"{type(err).__name__}: {err}"
    try:
        free = free_bytes(where if where.exists() else where.parent)
    except OSError:
        return text
    if free < 16 * 2**20:  # torch reports a full disk as "basic_ios::clear: iostream error" or "unexpected pos"
        text += f" (No space left on device: {_gib(free)} free on the file system of {where})"
    return text


def save_checkpoint(engine, cfg: RunConfig, *, step: int, trainer_state: dict[str, Any]) -> Path:
    """Write a DeepSpeed checkpoint of ``engine`` atomically and prune old ones (all ranks call this)."""
    out = Path(cfg.train.output_dir)
    root = out / CKPT_SUBDIR
    staging = root / STAGING
    tag = tag_for(step)
    _check_space(engine, out, root, tag)
    if dist.rank() == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # the layout a resume compares against (tide_ds.trainer.universal): a change needs a conversion
    trainer_state = {**trainer_state, "world_size": dist.world_size(), "zero_stage": int(engine.zero_optimization_stage())}
    try:
        engine.save_checkpoint(str(staging), tag=tag, client_state={"tide_ds": trainer_state}, save_latest=False)
        failfast.fault("save", step)
    except Exception as err:
        reason = _describe_write_error(err, staging / tag)
        shutil.rmtree(staging / tag, ignore_errors=True)
        latest = latest_checkpoint(out)
        raise CheckpointWriteError(
            getattr(err, "errno", None) or errno.EIO,
            f"writing checkpoint {tag} on rank {dist.rank()} failed: {reason}; partial files removed, "
            + (f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint"),
        ) from err
    dist.barrier()
    final = root / tag
    if dist.rank() == 0:
        try:
            _atomic_write(staging / tag / "config.yaml", cfg.to_yaml())
            _atomic_write(staging / tag / "trainer_state.json", json.dumps(trainer_state, indent=1, sort_keys=True))
            manifest.write(staging / tag)  # last: a checkpoint without one is never loaded
        except OSError as err:
            reason = _describe_write_error(err, staging / tag)
            shutil.rmtree(staging / tag, ignore_errors=True)
            raise CheckpointWriteError(err.errno or errno.EIO, f"writing checkpoint {tag} failed: {reason}") from err
        if final.exists():  # an older attempt at the same step (after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        _atomic_write(root / "latest", tag)
        for _, old in complete_checkpoints(out)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def agree_on_checkpoint(ckpt_dir: str | Path) -> Path:
    """The checkpoint to load: ``ckpt_dir`` if its files verify on every rank, else the newest older one that does.

    Every rank checks the files it will read against the manifest; one all-reduce of the failures per
    candidate makes the choice identical everywhere. A skipped checkpoint is named with what failed. A
    legacy checkpoint (no manifest: written before manifests, :func:`manifest.is_legacy`) passes unchecked,
    with one warning naming it.
    Raises ``ConfigError`` (on every rank) when none verifies.
    """
    ckpt_dir = Path(ckpt_dir)
    names = [p.name for s, p in complete_checkpoints(ckpt_dir.parent.parent) if p.name <= ckpt_dir.name]
    names = dist.broadcast_object(names[::-1])  # newest first, rank 0's list on every rank
    me, world = dist.rank(), dist.world_size()
    found = {}
    for name in names:
        issues = manifest.problems(ckpt_dir.parent / name, rank=me, world_size=world)
        if issues:
            found[name] = issues
            logger.warning("checkpoint %s fails its check on rank %d: %s", ckpt_dir.parent / name, me, "; ".join(issues))
    bad = torch.tensor([int(n in found) for n in names] or [0], dtype=torch.int64)
    dist.all_reduce_sum(bad)  # identical on every rank from here on
    failed_ranks = bad.tolist()
    for i, name in enumerate(names):
        if failed_ranks[i] == 0:
            if i and me == 0:
                logger.warning("resuming from %s: %s failed verification on %s rank(s) (reasons above)",
                               name, ", ".join(names[:i]), "/".join(str(int(c)) for c in failed_ranks[:i]))
            if me == 0 and manifest.is_legacy(ckpt_dir.parent / name):
                logger.warning("resuming from %s: %s", ckpt_dir.parent / name, manifest.LEGACY_NOTE)
            return ckpt_dir.parent / name
    detail = "; ".join(f"{n}: {'; '.join(found[n])}" for n in names if n in found) or "see the other ranks' messages"
    raise ConfigError(
        f"no checkpoint in {ckpt_dir.parent} passed verification on every rank ({detail}). Move the run "
        "directory aside to start afresh, or restore the named files"
    )


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler states into ``engine``; return the trainer state.

    A checkpoint written by another number of ranks is loaded through DeepSpeed's universal
    checkpoint and verified; one of another ZeRO stage is refused (``tide_ds.trainer.universal``).
    """
    failfast.fault("resume")
    ckpt_dir = agree_on_checkpoint(ckpt_dir)
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    state["loaded_from"] = str(ckpt_dir)
    change = universal.layout_change(
        universal.saved_layout(ckpt_dir, state), world_size=dist.world_size(),
        zero_stage=int(engine.zero_optimization_stage()), ckpt_dir=ckpt_dir,
    )
    if change and universal.zero_partition_files(ckpt_dir):
        universal.load_resharded(engine, ckpt_dir, reason=change)
        return state
    try:
        path, client_state = engine.load_checkpoint(
            str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as err:
        raise RuntimeError(f"loading checkpoint {ckpt_dir} failed on rank {dist.rank()}: {type(err).__name__}: {err}") from err
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt_dir}")
    if client_state and "tide_ds" in client_state and client_state["tide_ds"]["step"] != state["step"]:
        raise RuntimeError(f"checkpoint {ckpt_dir}: trainer_state.json and the DeepSpeed client state disagree")
    return state
