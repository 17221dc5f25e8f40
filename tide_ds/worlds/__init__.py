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


#: Options of this run that a comparison run must not repeat: it sets its own objective and output directory.
_NOT_REPEATED = ("--local_rank", "--distill.preset", "--distill.mode", "--train.output_dir", "--train.resume",
                 "--train.overwrite")


def fresh_output_dir(out: str | Path, suffix: str) -> str:
    """``<out>-<suffix>``, or ``-<suffix>-2``, ``-3``, ... : the first that does not exist yet."""
    out = Path(out)
    candidate = out.with_name(f"{out.name}-{suffix}")
    n = 2
    while candidate.exists():
        candidate, n = out.with_name(f"{out.name}-{suffix}-{n}"), n + 1
    return str(candidate)


def comparison_command(argv: list[str] | tuple[str, ...], *, world_size: int, local_world_size: int, extra: list[str],
                       output_dir: str) -> str:
    """The launch command of a run like this one (same options, world and rank count) with ``extra`` options."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in _NOT_REPEATED:
            skip_next = "=" not in arg and name != "--train.overwrite"  # "--option value" form
            continue
        kept.append(arg)
    if world_size == local_world_size:
        launch = f"deepspeed --num_gpus {world_size} launch/run.py"
    else:  # several nodes: the launch of this run, which the command cannot know
        launch = f"<this run's launcher, {world_size} ranks> launch/run.py"
    return " ".join([launch, *kept, *extra, f"--train.output_dir={output_dir}"])


def _local_world_size(world_size: int) -> int:
    """Ranks on this node: ``LOCAL_SIZE`` (the DeepSpeed launcher) or ``LOCAL_WORLD_SIZE`` (torchrun), else all."""
    import os

    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)


def baseline_verdict(preset: str, nll: float, known: dict[str, float], *, world_size: int, command: str) -> str:
    """The report's last line: did TIDE beat the no-distillation baseline of the same world and rank count, by how much.

    ``known``: the held-out NLL per preset of the comparable runs (this one included). Numbers are the
    student's held-out NLL per student token, the only units the runs share.
    """
    ranks = f"{world_size} rank{'s' if world_size != 1 else ''}"
    if preset == "none":
        others = {p: v for p, v in sorted(known.items()) if p != "none"}
        if not others:
            return (f"No-distillation baseline: held-out NLL {nll:.4f} per student token; no TIDE run with this world "
                    f"and {ranks} to compare yet: {command}")
        return "No-distillation baseline: held-out NLL {:.4f} per student token; {}.".format(
            nll, "; ".join(_compare(p, v, nll) for p, v in others.items()))
    base = known.get("none")
    if base is None:
        return (f"Did TIDE beat the no-distillation baseline? Not known: no baseline with this world and {ranks} yet; "
                f"run it with: {command}")
    return _compare(preset, nll, base) + "."


def _compare(preset: str, nll: float, base: float) -> str:
    gap = base - nll
    if gap > 0:
        return (f"TIDE ({preset}) beat the no-distillation baseline by {gap:.4f} held-out NLL per student token "
                f"({nll:.4f} vs {base:.4f}, {gap / base:.1%} lower)")
    if gap < 0:
        return (f"TIDE ({preset}) did not beat the no-distillation baseline: {-gap:.4f} held-out NLL per student "
                f"token worse ({nll:.4f} vs {base:.4f})")
    return f"TIDE ({preset}) tied the no-distillation baseline ({nll:.4f} held-out NLL per student token)"


def comparison_key(cfg: RunConfig, world: InstructWorld) -> str:
    """Runs with this key compare: same world, student, schedule, seed and number of ranks (the preset varies)."""
    run = {"world": world.key, "model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion),
           "train": {k: getattr(cfg.train, k) for k in ("micro_batch_size", "gradient_accumulation_steps", "max_steps",
                                                          "lr", "seed")},
           "world_size": dist.world_size()}
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:12]


def baseline_config(cfg: RunConfig, world: InstructWorld) -> RunConfig | None:
    """The config of the no-distillation baseline ``world.baseline`` asks for, or None when it is not wanted or
    one is recorded already (the same on every rank: rank 0 decides and names a fresh output directory)."""
    from tide_ds.worlds.instruct import results_file

    if not cfg.world.baseline or cfg.distill.preset == "none":
        return None
    out = None
    if dist.rank() == 0:
        path = results_file()
        known = json.loads(path.read_text()).get(comparison_key(cfg, world), {}) if path.is_file() else {}
        out = None if "none" in known else fresh_output_dir(cfg.train.output_dir, "none")
    out = dist.broadcast_object(out)
    if out is None:
        return None
    distill = dataclasses.replace(cfg.distill, preset="none", mode="", comp_demo=None)
    train = dataclasses.replace(cfg.train, output_dir=out, resume="never", overwrite=False)
    return dataclasses.replace(cfg, distill=distill, train=train)


def record_baseline(cfg: RunConfig, world: InstructWorld, nll: float) -> None:
    """Remember the baseline's held-out NLL (rank 0) for the report of the run it was trained for."""
    from tide_ds.worlds.instruct import record_result

    if dist.rank() == 0:
        record_result(comparison_key(cfg, world), "none", nll)
        logger.info("no-distillation baseline: held-out NLL %.4f per student token; logs in %s", nll,
                    Path(cfg.train.output_dir).resolve())


def student_eval_units(cfg: RunConfig, tokens: float | None = None) -> tuple[dict | None, str]:
    """The held-out responses the trainer's evaluation scores (``tide_ds.trainer.step.evaluate``): the first
    ``data.eval_samples`` rows (0: all) of ``data.eval_split``, their tokens with a label (``labels >= 0``).
    ``({"tokens", "bytes", "samples"}, "")``, bytes being the UTF-8 bytes those tokens spell in the student's
    tokenizer; or ``(None, why)`` when they cannot be read, or do not add up to ``tokens`` (the count the
    evaluation reported), so that no bits per byte is shown over text other than the scored one."""
    import datasets
    import numpy as np

    from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, load_tokenizer
    from tide_ds.worlds.evidence import response_bytes

    try:
        split = datasets.load_from_disk(str(cfg.data.dataset))[cfg.data.eval_split]
        n = min(len(split), cfg.data.eval_samples or len(split))
        labels = split.select(range(n)).with_format("numpy", columns=["labels"])["labels"]
        ids = [[int(x) for x in np.asarray(row) if x >= 0] for row in labels]
        count = sum(map(len, ids))
        if tokens is not None and count != int(tokens):
            return None, (f"the {n} held-out samples hold {count} labelled tokens but the evaluation counted "
                          f"{int(tokens)}")
        tok_dir = ensure_qwen3_tokenizer() if cfg.model.tokenizer == "qwen3" else Path(cfg.model.tokenizer)
        n_bytes = response_bytes(load_tokenizer(tok_dir), ids)
        if n_bytes == 0:
            return None, f"the {n} held-out responses scored spell no text (0 bytes)"
        return {"tokens": count, "bytes": n_bytes, "samples": n}, ""
    except (OSError, KeyError, ValueError) as err:
        return None, f"the held-out responses could not be read: {type(err).__name__}: {err}"


def teacher_bits_per_byte(world: InstructWorld) -> tuple[float | None, dict | None, str]:
    """The teacher's held-out NLL in bits per byte of the text it was measured on (its first held-out teacher
    sequences, :func:`tide_ds.worlds.pretrain.heldout_text_units`): ``(bits, units, "")`` from its pretraining
    record, or, for a teacher cached before the record held them, counted now from the cached held-out split
    and the teacher's tokenizer; ``(None, None, why)`` when neither can be read."""
    import datasets

    from tide_ds.data.tokenizers import load_tokenizer
    from tide_ds.worlds import pretrain

    try:
        record = json.loads((Path(world.teacher) / "tide_ds_pretrain.json").read_text())
        nll = float(record["heldout_nll"])
        if "heldout_bits_per_byte" in record:
            units = {k: int(record[f"heldout_{k}"]) for k in ("tokens", "bytes", "samples")}
            return float(record["heldout_bits_per_byte"]), units, ""
        split = datasets.load_from_disk(str(world.dataset))["heldout"]
        units = pretrain.heldout_text_units(split, load_tokenizer(world.teacher_tokenizer))
        return pretrain.teacher_bits_per_byte(nll, units), units, ""
    except (OSError, KeyError, ValueError) as err:
        return None, None, f"{type(err).__name__}: {err}"


def report_world(cfg: RunConfig, world: InstructWorld, nll: float, out: Path, *,
                 argv: list[str] | tuple[str, ...] = (), tokens: float | None = None) -> str | None:
    """Log the student's held-out NLL, the no-distillation baseline's (the last preset-none run with the same
    world, student, schedule, seed and rank count, if any) and the teacher's, ending with one line saying
    whether TIDE beat the baseline and by how much (:func:`baseline_verdict`). Rank 0 only; returns the report
    (None on other ranks). ``argv``: this run's options, for the command of a missing comparison run;
    ``tokens``: the labelled tokens the evaluation scored (its ``"tokens"``), checked against the held-out data.

    Units: the students in nats per student token and in bits per byte of the held-out responses the evaluation
    scored (:func:`student_eval_units`); the teacher, whose tokens differ from the student's in pipeline A, only
    in bits per byte of its own held-out sequences (:func:`teacher_bits_per_byte`).
    """
    from tide_ds.worlds.instruct import record_result

    if dist.rank() != 0:
        return None
    world_size = dist.world_size()
    known = record_result(comparison_key(cfg, world), cfg.distill.preset, nll)
    cross = world.pipeline == "A"
    pipe = [] if cross else ["--distill.pipeline=B"]
    preset = cfg.distill.preset
    if preset == "none":
        extra, suffix = [f"--distill.preset={'tide_cross' if cross else 'tide_shared'}", *pipe], "tide"
    else:
        extra, suffix = ["--distill.preset=none", *pipe], "none"
    command = comparison_command(
        argv, world_size=world_size, local_world_size=_local_world_size(world_size),
        extra=extra, output_dir=fresh_output_dir(cfg.train.output_dir, suffix),
    )
    units, why = student_eval_units(cfg, tokens)

    def student(value: float) -> str:
        if units is None:
            return f"{value:.4f}"
        from tide_ds.worlds.evidence import bits_per_byte

        return f"{value:.4f} ({bits_per_byte(value * units['tokens'], units['bytes']):.4f} bits per byte)"

    head = (f"TIDE demo, pipeline {world.pipeline}: held-out masked-diffusion NLL in nats per student token (the "
            "student's Qwen3 tokenizer; lower is better)")
    if units is not None:
        head += (f" and in bits per byte of the {units['samples']} held-out responses scored ({units['tokens']} "
                 f"tokens, {units['bytes']} bytes of UTF-8 text)")
    lines = ["", head, f"  student, preset {preset} (mode {cfg.distill.objective.mode}): {student(nll)}"]
    if preset != "none":
        base = known.get("none")
        lines.append(f"  student, no distillation (preset none, same world and {world_size} rank(s)): "
                     + (student(base) if base is not None else "not run yet"))
    if units is None:
        lines.append(f"  (no bits per byte for the students: {why})")
    own = "own SentencePiece tokenizer" if cross else "WeDLM layout, the student's Qwen3 tokenizer"
    bits, t_units, t_why = teacher_bits_per_byte(world)
    if bits is None:
        lines.append(f"  teacher ({world.teacher.name}, {own}): not shown, its bits per byte could not be computed "
                     f"({t_why})")
    else:
        lines.append(f"  teacher ({world.teacher.name}, {own}): {bits:.4f} bits per byte of its first "
                     f"{t_units['samples']} held-out teacher sequences (whole chat texts in its format, prompts "
                     "included; the students' numbers score responses only)")
    lines.append(f"  logs, metrics and checkpoints: {out}")
    lines.append(baseline_verdict(preset, nll, known, world_size=world_size, command=command))
    text = "\n".join(lines)
    logger.info(text)
    return text
