"""The training loop: :func:`build_run` builds and checks everything, :func:`run_training` steps, logs,
evaluates and checkpoints on cadence; :func:`train` is both. One step is :func:`tide_ds.trainer.step.train_step`."""

from __future__ import annotations

import datetime
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tide_ds import dist, failfast
from tide_ds.builders import RunData, build_data, build_student, build_teacher, build_tokenizer
from tide_ds.config import RunConfig
from tide_ds.diffusion.schedules import NoiseSchedule, get_schedule
from tide_ds.errors import ConfigError
from tide_ds.log import setup_logging
from tide_ds.losses.fused_head import resolve_loss_implementation
from tide_ds.trainer import checkpoint, preemption
from tide_ds.trainer.divergence import DivergenceTracker
from tide_ds.trainer.engine import initialize_engine
from tide_ds.trainer.metrics import MetricsWindow, MetricsWriter
from tide_ds.trainer.objectives import Objective, build_objective
from tide_ds.trainer.reporters import report_tensorboard, with_reporters
from tide_ds.trainer.step import evaluate, train_step

logger = logging.getLogger(__name__)


def init_distributed(timeout_minutes: float = 60.0) -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on the CPU) and pick this rank's device.

    ``timeout_minutes`` (``train.dist_timeout_minutes``) bounds every collective of the default group, which
    DeepSpeed's groups inherit; a teacher load sits between two collectives, so it must outlast the load.
    """
    import deepspeed

    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())
        deepspeed.init_distributed(dist_backend="nccl", timeout=timeout)
        return torch.device("cuda", dist.local_rank())
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)
    return torch.device("cpu")


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this rank: the device's allocator on GPUs, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_shared_vocab(cfg: RunConfig, student: torch.nn.Module) -> None:
    """Pipeline B compares the first V' logits of both models: the student must have that many rows."""
    rows = student.lm_head_weight.shape[0]
    if cfg.distill.shared_vocab_size > rows:
        raise ConfigError(
            f"distill.shared_vocab_size={cfg.distill.shared_vocab_size} exceeds the student's vocabulary ({rows} rows); "
            "pipeline B needs student and teacher on the same tokenizer (151646 for Qwen-family pairs)"
        )


@dataclass
class Run:
    """Everything a training run needs, built and checked by :func:`build_run` before the first step."""

    cfg: RunConfig
    engine: Any  # the student's DeepSpeed engine
    objective: Objective
    data: RunData
    schedule: NoiseSchedule
    mask_token_id: int
    device: torch.device
    rank: int
    world_size: int
    guard: preemption.PreemptionGuard
    #: The first optimizer step to run (0, or the resumed checkpoint's step).
    start_step: int


def build_run(cfg: RunConfig) -> Run:
    """Start the process group, decide on the run directory, and build data, student, teacher and engine.

    ``data.dataset`` must be a dataset directory (a world is prepared before: :func:`tide_ds.worlds.prepare_world`).
    Every user error raises here, on every rank, before the first step.
    """
    setup_logging()
    guard = preemption.install(cfg.train.preempt_signals)  # a signal only sets a flag, checked after each step
    device = init_distributed(cfg.train.dist_timeout_minutes)
    guard.group_timeout = datetime.timedelta(minutes=cfg.train.dist_timeout_minutes)
    try:  # fails early, logs once
        loss_implementation = resolve_loss_implementation(cfg.model.loss_implementation, device)
    except ValueError as err:  # the choice cannot run here (triton without a GPU or TRITON_INTERPRET=1)
        raise ConfigError(str(err)) from None
    rank, world = dist.rank(), dist.world_size()
    from tide_ds.plan.checks import resolve_training_size

    cfg = resolve_training_size(cfg, world_size=world)  # train.global_batch_size / train.epochs -> accumulation, steps
    decision = checkpoint.prepare_run_dir(cfg)
    logger.info("resolved config:\n%s", cfg.to_yaml())

    _, special = build_tokenizer(cfg)
    data = build_data(cfg, rank=rank, world_size=world)
    spec = cfg.distill.objective
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_student(cfg, special=special)
    teacher = None
    if spec.terms:
        if not spec.uses_chunks:
            check_shared_vocab(cfg, student)
        teacher = build_teacher(cfg, device=device)
        logger.info("objective: mode %s, terms %s, CompDemo %s", spec.mode, spec.loss_terms, spec.comp_demo)
    schedule = get_schedule(cfg.diffusion.schedule)
    module, objective = build_objective(
        cfg, spec, student=student, teacher=teacher, schedule=schedule, mask_token_id=special.mask_id, rank=rank,
        loss_implementation=loss_implementation,
    )
    engine, _ = initialize_engine(cfg, module, world_size=world)
    step = 0
    if decision.resume_from:
        state = checkpoint.load_checkpoint(engine, decision.resume_from)
        step = state["step"]
        data.train.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d", state["loaded_from"], step)  # the newest that verified
    return Run(cfg=cfg, engine=engine, objective=objective, data=data, schedule=schedule, mask_token_id=special.mask_id,
               device=device, rank=rank, world_size=world, guard=guard, start_step=step)


def run_training(run: Run) -> dict[str, float]:
    """Step, log, evaluate and checkpoint on cadence until ``train.max_steps``; return the last held-out evaluation."""
    cfg, engine, data, rank, world = run.cfg, run.engine, run.data, run.rank, run.world_size
    step = run.start_step
    metrics = MetricsWriter(cfg.train.output_dir, enabled=rank == 0, tensorboard=report_tensorboard(cfg.train),
                            start_step=step)
    metrics = with_reporters(metrics, cfg, enabled=rank == 0, start_step=step)  # train.report_to: W&B (reporters.py)
    # Training tokens: one copy of L per sample (the model itself reads [x_t ; x_0], 2L positions).
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world * cfg.data.seq_len
    window = MetricsWindow(device=run.device, world_size=world, tokens_per_step=tokens_per_step)
    bar = None
    if rank == 0 and cfg.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def run_eval(at_step: int) -> dict[str, float]:
        result = evaluate(engine, data.eval_batches(), cfg=cfg, schedule=run.schedule, mask_token_id=run.mask_token_id)
        metrics.write(at_step, "eval", result)
        logger.info("eval step %d | heldout nll %.4f | masked ce %.4f", at_step, result["nll"], result["masked_ce"])
        return result

    def save(at_step: int) -> None:
        state = {"step": at_step, "data": data.train.state_dict(), "world_size": world}
        checkpoint.save_checkpoint(engine, cfg, step=at_step, trainer_state=state)

    diverging = DivergenceTracker(cfg.train.max_nonfinite_steps, run.device)  # tide_ds/trainer/divergence.py

    def log_window() -> None:
        """One train record for the steps since the last one (rank-consistent: every rank calls it)."""
        stats = window.record()
        grad_norm = engine.get_global_grad_norm()
        record = {k: v for k, v in stats.items() if k not in ("tokens_per_s", "step_time_s")}
        record.update({
            "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": stats["tokens_per_s"],
            "step_time_s": stats["step_time_s"],
            "peak_mem_gib": peak_memory_gib(run.device),
        })
        if run.objective.tidal is not None:
            record["lambda_train"] = run.objective.tidal.lambda_train(min(1.0, step / cfg.train.max_steps))
        record.update(diverging.window_record(step, engine.skipped_steps))  # collective, as the all-reduce above
        metrics.write(step, "train", record)
        diverging.check(step, lr=cfg.train.lr)  # raises Diverged on every rank alike, after the record is written
        terms = "".join(f" | {k} {record[k]:.4f}" for k in cfg.distill.objective.loss_terms if k != "ce" and k in record)
        line = (
            f"step {step}/{cfg.train.max_steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f}{terms} | "
            f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:.0f} | "
            f"{record['step_time_s']:.2f}s/step | peak {record['peak_mem_gib']:.2f}GiB"
        )
        if bar is not None:
            bar.write(line)
        else:
            logger.info(line)

    last_eval: dict[str, float] = {}
    if step == 0:
        last_eval = run_eval(0)
    while step < cfg.train.max_steps:
        stats = train_step(engine, data.train, run.objective, cfg=cfg, step=step, rank=rank, schedule=run.schedule,
                           mask_token_id=run.mask_token_id)
        window.add(stats)
        step += 1
        diverging.after_step(stats["loss"], engine.get_global_grad_norm())  # on the device, no sync
        failfast.fault("step", step)  # test hook (TIDE_DS_FAULT); nothing unless set
        if bar is not None:
            bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            log_window()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            last_eval = run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.max_steps:
            save(step)
        if run.guard.should_stop():  # some rank got a preemption signal: all checkpoint here and exit for a requeue
            if window.steps:
                log_window()  # the steps since the last record, which the resumed run will not log again
            saved = cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.max_steps
            run.guard.stop(step, save=None if saved else save, close=metrics.close)
    if bar is not None:
        bar.close()
    last_eval = run_eval(step)
    save(step)
    metrics.close()
    out = Path(cfg.train.output_dir).resolve()
    logger.info("done: heldout nll %.4f at step %d; logs and checkpoints in %s", last_eval["nll"], step, out)
    return last_eval


def train(cfg: RunConfig) -> dict[str, float]:
    """Train the student as ``cfg`` says (``data.dataset`` a dataset directory); return the last held-out evaluation."""
    return run_training(build_run(cfg))


def shutdown() -> None:
    """Tear the process group down explicitly (avoids rare aborts at interpreter exit)."""
    dist.destroy()  # also unlinks DeepSpeed's /dev/shm all-reduce buffer of this rank
    sys.stdout.flush()
