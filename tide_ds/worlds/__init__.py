"""Worlds: small self-contained data providers built offline before training (the trainer never imports them).

A world turns the config's ``world.*`` options into paths: a dataset directory for ``data.dataset`` and,
for the instruct world, a pretrained teacher for ``teacher.path``. ``launch/run.py`` calls
:func:`prepare_world` before :func:`tide_ds.trainer.loop.train` when ``data.dataset`` is empty, and
:func:`report_world` after it; the trainer only ever sees the paths.

- ``instruct`` (:mod:`tide_ds.worlds.instruct`, the TIDE demo): the instruction corpus of the Python
  standard library, preprocessed for ``distill.pipeline`` (A: a teacher tokenizer of its own and
  alignment chunks; B: the student's tokenizer and position pairs), and a small teacher pretrained on it
  (:mod:`tide_ds.worlds.pretrain`).
- ``code``: the standard library's source as plain text for CE-only runs (:func:`tide_ds.data.corpus.ensure_code_corpus`).

Everything is cached under ``$TIDE_DS_CACHE`` keyed by its inputs, built by rank 0 while the others wait.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from tide_ds import dist
from tide_ds.builders import build_tokenizer, rank0_first
from tide_ds.config import RunConfig
from tide_ds.worlds.instruct import InstructWorld

__all__ = ["InstructWorld", "prepare_world", "report_world"]

logger = logging.getLogger(__name__)


def prepare_world(cfg: RunConfig) -> tuple[RunConfig, InstructWorld | None]:
    """``cfg`` with ``data.dataset`` (and an empty ``teacher.path``) pointing at the world of ``world.name``.

    A config that names its dataset is returned unchanged. Every rank calls this (rank 0 builds, the others
    wait and then read the cache). Returns the instruct world's description for :func:`report_world`.
    """
    if cfg.data.dataset:
        return cfg, None
    tokenizer_dir, _ = build_tokenizer(cfg)
    w = cfg.world
    if w.name == "code":
        from tide_ds.data.corpus import ensure_code_corpus
        from tide_ds.data.tokenizers import default_tokenizer_cache

        path = rank0_first(
            lambda: ensure_code_corpus(
                tokenizer_dir, default_tokenizer_cache(), seq_len=cfg.data.seq_len, block_size=cfg.diffusion.block_size,
                heldout_fraction=w.heldout_fraction, max_files=w.max_files or None,
            )
        )
        logger.info("code world: dataset %s", path)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(path))), None
    from tide_ds.worlds import instruct

    world = rank0_first(
        lambda: instruct.prepare_instruct_world(
            student_tokenizer=tokenizer_dir, seq_len=cfg.data.seq_len, block_size=cfg.diffusion.block_size,
            teacher_seq_len=w.teacher_seq_len, max_files=w.max_files or None, seed=w.seed,
            pipeline=cfg.distill.resolved_pipeline, teacher_steps=w.teacher_steps,
        )
    )
    assert isinstance(world, InstructWorld)
    data = dataclasses.replace(cfg.data, dataset=str(world.dataset))
    teacher = dataclasses.replace(cfg.teacher, path=cfg.teacher.path or str(world.teacher))
    logger.info("instruct world: dataset %s, teacher %s (held-out NLL %.3f per teacher token)",
                world.dataset, world.teacher, world.teacher_heldout_nll)
    return dataclasses.replace(cfg, data=data, teacher=teacher), world


def report_world(cfg: RunConfig, world: InstructWorld, nll: float, out: Path) -> None:
    """Log the student's held-out NLL beside the teacher's and the no-distillation baseline's (the last
    preset-none run with the same world, student, schedule, seed and world size, if any). Rank 0 only."""
    from tide_ds.worlds.instruct import record_result

    if dist.rank() != 0:
        return
    # Comparable runs only: same world, student, schedule, seed and world size (the preset varies).
    run = {"world": world.key, "model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion),
           "train": {k: getattr(cfg.train, k) for k in ("micro_batch_size", "gradient_accumulation_steps", "max_steps",
                                                          "lr", "seed")},
           "world_size": dist.world_size()}
    run_key = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:12]
    known = record_result(run_key, cfg.distill.preset, nll)
    cross = world.pipeline == "A"
    lines = [
        "",
        f"TIDE demo, pipeline {world.pipeline} (held-out masked-diffusion NLL per token"
        + ("; teacher and student tokenize differently, so their numbers are per their own tokens):" if cross else "):"),
        f"  teacher ({world.teacher.name}, "
        + ("own SentencePiece tokenizer" if cross else "WeDLM layout, the student's Qwen3 tokenizer") + "):"
        f" {world.teacher_heldout_nll:.4f}",
        f"  student, preset {cfg.distill.preset} (mode {cfg.distill.objective.mode}): {nll:.4f}",
    ]
    if cfg.distill.preset != "none":
        base = known.get("none")
        pipe = "" if cross else " --distill.pipeline=B"
        lines.append(f"  student, no distillation (preset none): {base:.4f}" if base is not None else
                     "  student, no distillation: not run yet; run the same command with --distill.preset=none"
                     f"{pipe} --train.output_dir=runs/demo-none")
    lines.append(f"  logs, metrics and checkpoints: {out}")
    logger.info("\n".join(lines))
