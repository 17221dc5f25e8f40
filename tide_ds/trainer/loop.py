"""The training loop: build everything, then step, log, evaluate and checkpoint on cadence."""

from __future__ import annotations

import datetime
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from tide_ds import dist
from tide_ds.config import RunConfig
from tide_ds.diffusion.schedules import get_schedule
from tide_ds.log import setup_logging
from tide_ds.trainer import checkpoint, preemption
from tide_ds.losses.fused_head import resolve_loss_implementation
from tide_ds.losses.tidal import TidalSchedule
from tide_ds.trainer.build import build_data, build_student, build_teacher, build_tokenizer, prepare_demo_run, report_demo
from tide_ds.trainer.distill import (
    ChunkDistillModule,
    TokenDistillModule,
    chunk_term,
    distill_step_a,
    distill_step_b,
    divergence_terms,
)
from tide_ds.trainer.engine import DiffusionCEModule, initialize_engine
from tide_ds.trainer.metrics import MetricsWriter
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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_shared_vocab(cfg: RunConfig, student: torch.nn.Module) -> None:
    """Pipeline B compares the first V' logits of both models: the student must have that many rows."""
    rows = student.lm_head_weight.shape[0]
    if cfg.distill.shared_vocab_size > rows:
        raise ValueError(
            f"distill.shared_vocab_size={cfg.distill.shared_vocab_size} exceeds the student's vocabulary ({rows} rows); "
            "pipeline B needs student and teacher on the same tokenizer (151646 for Qwen-family pairs)"
        )


def train(cfg: RunConfig) -> dict[str, float]:
    """Train the student as ``cfg`` says; return the last held-out evaluation."""
    setup_logging()
    guard = preemption.install(cfg.train.preempt_signals)  # a signal only sets a flag, checked after each step
    device = init_distributed(cfg.train.dist_timeout_minutes)
    guard.group_timeout = datetime.timedelta(minutes=cfg.train.dist_timeout_minutes)
    loss_implementation = resolve_loss_implementation(cfg.model.loss_implementation, device)  # fails early, logs once
    rank, world = dist.rank(), dist.world_size()
    decision = checkpoint.prepare_run_dir(cfg)
    logger.info("resolved config:\n%s", cfg.to_yaml())

    tokenizer_dir, special = build_tokenizer(cfg)
    demo = None
    if cfg.data.dataset == "demo":
        cfg, demo = prepare_demo_run(cfg, tokenizer_dir)
    data = build_data(cfg, tokenizer_dir=tokenizer_dir, special=special, rank=rank, world_size=world)
    spec = cfg.distill.objective()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    student = build_student(cfg, special=special)
    teacher, tidal = None, None
    if spec.terms:
        teacher = build_teacher(cfg, device=device)
        if spec.uses_chunks:
            module = ChunkDistillModule(
                student, term=chunk_term(spec), weight=cfg.distill.calm_weight,
                temperature=cfg.distill.calm_temperature, chunk_rows=cfg.model.ce_chunk_rows,
            )
            distill_step = distill_step_a
        else:
            check_shared_vocab(cfg, student)
            module = TokenDistillModule(
                student, terms=divergence_terms(spec, cfg), temperature=cfg.distill.kl_temperature,
                chunk_rows=cfg.model.ce_chunk_rows,
            )
            distill_step = distill_step_b
        if spec.uses_tidal:
            d = cfg.distill
            tidal = TidalSchedule(lambda_init=d.tidal_lambda_init, lambda_max=d.tidal_lambda_max, growth=d.tidal_growth,
                                  axis=d.tidal_axis, timestep_weight=d.tidal_timestep_weight)
        logger.info("objective: mode %s, terms %s, CompDemo %s", spec.mode, spec.loss_terms, spec.comp_demo)
    else:
        module = DiffusionCEModule(student, chunk_rows=cfg.model.ce_chunk_rows)
    module.loss_implementation = loss_implementation
    engine, _ = initialize_engine(cfg, module, world_size=world)
    schedule = get_schedule(cfg.diffusion.schedule)

    step = 0
    if decision.resume_from:
        state = checkpoint.load_checkpoint(engine, decision.resume_from)
        step = state["step"]
        data.train.load_state_dict(state["data"])
        logger.info("resumed from %s at step %d", decision.resume_from, step)

    metrics = MetricsWriter(cfg.train.output_dir, enabled=rank == 0, tensorboard=cfg.train.tensorboard, start_step=step)
    # Training tokens: one copy of L per sample (the model itself reads [x_t ; x_0], 2L positions).
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world * cfg.data.seq_len
    bar = None
    if rank == 0 and cfg.train.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def run_eval(at_step: int) -> dict[str, float]:
        result = evaluate(
            engine, data.eval_batches(), cfg=cfg, schedule=schedule, mask_token_id=special.mask_id
        )
        metrics.write(at_step, "eval", result)
        logger.info("eval step %d | heldout nll %.4f | masked ce %.4f", at_step, result["nll"], result["masked_ce"])
        return result

    def save(at_step: int) -> None:
        state = {"step": at_step, "data": data.train.state_dict(), "world_size": world}
        checkpoint.save_checkpoint(engine, cfg, step=at_step, trainer_state=state)

    last_eval: dict[str, float] = {}
    if step == 0:
        last_eval = run_eval(0)
    window: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()

    def log_window() -> None:
        """One train record for the steps since the last one (rank-consistent: every rank calls it)."""
        nonlocal window, window_steps, window_start
        # The only host synchronisation of the loop: one all-reduce and one read per interval.
        names = sorted(window)
        packed = torch.stack([torch.as_tensor(window[k], device=device).double() for k in names])
        dist.all_reduce_sum(packed)
        elapsed = time.perf_counter() - window_start
        grad_norm = engine.get_global_grad_norm()
        record = {k: v / (window_steps * world) for k, v in zip(names, packed.tolist())}
        record.update({
            "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_step * window_steps / elapsed,
            "step_time_s": elapsed / window_steps,
            "peak_mem_gib": peak_memory_gib(device),
        })
        if tidal is not None:
            record["lambda_train"] = tidal.lambda_train(min(1.0, step / cfg.train.max_steps))
        metrics.write(step, "train", record)
        terms = "".join(f" | {k} {record[k]:.4f}" for k in spec.loss_terms if k != "ce" and k in record)
        line = (
            f"step {step}/{cfg.train.max_steps} | loss {record['loss']:.4f} | ce {record['ce']:.4f}{terms} | "
            f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:.0f} | "
            f"{record['step_time_s']:.2f}s/step | peak {record['peak_mem_gib']:.2f}GiB"
        )
        if bar is not None:
            bar.write(line)
        else:
            logger.info(line)
        window = {}
        window_steps, window_start = 0, time.perf_counter()

    while step < cfg.train.max_steps:
        if teacher is None:
            stats = train_step(
                engine, data.train, cfg=cfg, step=step, rank=rank, schedule=schedule, mask_token_id=special.mask_id
            )
        else:
            stats = distill_step(
                engine, teacher, data.train, cfg=cfg, spec=spec, step=step, rank=rank, schedule=schedule,
                mask_token_id=special.mask_id, tidal=tidal,
            )
        step += 1
        window_steps += 1
        for key, value in stats.items():
            window[key] = window.get(key, 0) + value
        if bar is not None:
            bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            log_window()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.max_steps:
            last_eval = run_eval(step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.max_steps:
            save(step)
        if guard.should_stop():  # some rank got a preemption signal: all checkpoint here and exit for a requeue
            if window_steps:
                log_window()  # the steps since the last record, which the resumed run will not log again
            saved = cfg.train.save_every and step % cfg.train.save_every == 0 and step != cfg.train.max_steps
            guard.stop(step, save=None if saved else save, close=metrics.close)
    if bar is not None:
        bar.close()
    last_eval = run_eval(step)
    save(step)
    metrics.close()
    out = Path(cfg.train.output_dir).resolve()
    logger.info("done: heldout nll %.4f at step %d; logs and checkpoints in %s", last_eval["nll"], step, out)
    if demo is not None and rank == 0:
        report_demo(cfg, demo, last_eval["nll"], out)
    return last_eval


def shutdown() -> None:
    """Tear the process group down explicitly (avoids rare aborts at interpreter exit)."""
    dist.destroy()  # also unlinks DeepSpeed's /dev/shm all-reduce buffer of this rank
    sys.stdout.flush()
