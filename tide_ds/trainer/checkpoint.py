"""Run directories and checkpoints: never overwrite a run, never leave a half-written checkpoint.

Layout of a run directory::

    <output_dir>/
      config.yaml             resolved config of the latest start
      metrics.jsonl           one record per log interval / evaluation
      tensorboard/            TensorBoard events
      checkpoints/
        latest                name of the newest complete checkpoint
        step_00000100/        DeepSpeed files + config.yaml + trainer_state.json
        .staging/             checkpoints being written (never loaded)

A checkpoint is written into ``.staging/<tag>`` by every rank, and only after all ranks finished
does rank 0 move it to ``checkpoints/<tag>`` with one ``os.replace`` and then update ``latest``
(write aside, rename). A crash at any moment leaves either the previous complete checkpoint or
the new one, never a directory that loads half. The run directory lives on a file system that all
ranks share (as on every cluster that runs DeepSpeed checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tide_ds import dist
from tide_ds.config import RunConfig
from tide_ds.errors import ConfigError
from tide_ds.trainer import universal
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


def _has_run_content(out: Path) -> bool:
    return out.is_dir() and any(out.iterdir())


@dataclass(frozen=True)
class RunDirDecision:
    """What rank 0 decided about the run directory, shared with every rank."""

    resume_from: str | None = None
    moved_aside: str | None = None
    error: str | None = None


def _decide(cfg: RunConfig) -> RunDirDecision:
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        return RunDirDecision(error=f"train.output_dir={str(out)!r} exists and is not a directory; pick another path")
    if cfg.train.resume == "auto":
        ckpt = latest_checkpoint(out)
        return RunDirDecision(resume_from=str(ckpt) if ckpt else None)
    if not _has_run_content(out):
        return RunDirDecision()
    # A start that failed before its first checkpoint is moved aside (kept) below, so the same command runs again.
    if not cfg.train.overwrite and complete_checkpoints(out):
        n = len(complete_checkpoints(out))
        return RunDirDecision(
            error=(
                f"train.output_dir={str(out)!r} already holds a run ({n} checkpoint(s)); tide-ds never "
                "overwrites or mixes into a run. Continue it with --train.resume=auto, move it aside with "
                "--train.overwrite=true, or choose another --train.output_dir"
            )
        )
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "x")
    os.replace(out, aside)
    return RunDirDecision(moved_aside=str(aside))


def prepare_run_dir(cfg: RunConfig) -> RunDirDecision:
    """Decide on rank 0 whether to start fresh, resume or refuse; every rank gets the same answer.

    Raises ``ConfigError`` on every rank when the directory holds a run and neither
    ``train.resume=auto`` nor ``train.overwrite=true`` was given.
    """
    decision = _decide(cfg) if dist.rank() == 0 else None
    decision = dist.broadcast_object(decision)
    assert isinstance(decision, RunDirDecision)
    if decision.error:
        raise ConfigError(decision.error)
    if dist.rank() == 0:
        out = Path(cfg.train.output_dir)
        (out / CKPT_SUBDIR).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / CKPT_SUBDIR / STAGING, ignore_errors=True)
        _atomic_write(out / "config.yaml", cfg.to_yaml())
        if decision.moved_aside:
            logger.info("moved the previous run in %s aside to %s", out, decision.moved_aside)
    dist.barrier()
    return decision


def save_checkpoint(engine, cfg: RunConfig, *, step: int, trainer_state: dict[str, Any]) -> Path:
    """Write a DeepSpeed checkpoint of ``engine`` atomically and prune old ones (all ranks call this)."""
    out = Path(cfg.train.output_dir)
    root = out / CKPT_SUBDIR
    staging = root / STAGING
    tag = tag_for(step)
    if dist.rank() == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # the layout a resume compares against (tide_ds.trainer.universal): a change needs a conversion
    trainer_state = {**trainer_state, "world_size": dist.world_size(), "zero_stage": int(engine.zero_optimization_stage())}
    engine.save_checkpoint(str(staging), tag=tag, client_state={"tide_ds": trainer_state}, save_latest=False)
    dist.barrier()
    final = root / tag
    if dist.rank() == 0:
        _atomic_write(staging / tag / "config.yaml", cfg.to_yaml())
        _atomic_write(staging / tag / "trainer_state.json", json.dumps(trainer_state, indent=1, sort_keys=True))
        if final.exists():  # an older attempt at the same step (after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        _atomic_write(root / "latest", tag)
        for _, old in complete_checkpoints(out)[: -cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler states into ``engine``; return the trainer state.

    A checkpoint written by another number of ranks is loaded through DeepSpeed's universal
    checkpoint and verified; one of another ZeRO stage is refused (``tide_ds.trainer.universal``).
    """
    ckpt_dir = Path(ckpt_dir)
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    change = universal.layout_change(
        universal.saved_layout(ckpt_dir, state), world_size=dist.world_size(),
        zero_stage=int(engine.zero_optimization_stage()), ckpt_dir=ckpt_dir,
    )
    if change and universal.zero_partition_files(ckpt_dir):
        universal.load_resharded(engine, ckpt_dir, reason=change)
        return state
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt_dir}")
    if client_state and "tide_ds" in client_state and client_state["tide_ds"]["step"] != state["step"]:
        raise RuntimeError(f"checkpoint {ckpt_dir}: trainer_state.json and the DeepSpeed client state disagree")
    return state
