"""Worker of test_after_training_e2e.py, run as ``deepspeed --num_gpus 2 train_runs_worker.py OUT``.

Trains two tiny runs with the real trainer (ZeRO-2 and ZeRO-3, two ranks, CE only on the stdlib corpus),
then loads the ZeRO-3 run's last checkpoint into a fresh engine the way a resume does and records the
logits of that engine's student on a fixed probe batch (``OUT/zero3/engine_logits.pt``): the reference
the exported Hugging Face directory must reproduce. (ZeRO-2 checkpoints hold the engine's full module
weights in ``mp_rank_00_model_states.pt``; the test compares the export with those directly.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TINY = [
    "--world.name=code", "--distill.preset=none",
    "--world.max_files=60", "--data.seq_len=64", "--diffusion.block_size=16", "--data.eval_samples=8",
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.head_dim=16",
    "--train.micro_batch_size=4", "--train.lr=1e-2", "--train.log_every=1",
    "--train.progress_bar=false", "--train.tensorboard=false", "--train.eval_every=0", "--train.max_steps=2",
]
PROBE_SEED, PROBE_BATCH = 0, 2


def probe_batch(vocab: int, mask_id: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(PROBE_SEED)
    x_0 = torch.randint(0, vocab, (PROBE_BATCH, 4 * block_size), generator=g)
    x_t = x_0.clone()
    x_t[:, 1::3] = mask_id
    return x_t, x_0


def engine_logits(cfg, ckpt: Path) -> torch.Tensor:
    from tide_ds import dist
    from tide_ds.builders import build_student, build_tokenizer
    from tide_ds.trainer import checkpoint
    from tide_ds.trainer.engine import initialize_engine
    from tide_ds.trainer.student import DiffusionCEModule

    _, special = build_tokenizer(cfg)
    torch.manual_seed(cfg.train.seed)
    module = DiffusionCEModule(build_student(cfg, special=special), chunk_rows=cfg.model.ce_chunk_rows)
    engine, _ = initialize_engine(cfg, module, world_size=dist.world_size())
    checkpoint.load_checkpoint(engine, ckpt)
    engine.eval()
    student = engine.module.student
    x_t, x_0 = probe_batch(student.hf.config.vocab_size, special.mask_id, cfg.diffusion.block_size)
    with torch.no_grad():  # every rank runs the same forward (ZeRO-3 gathers parameters collectively)
        return student.logits(student(x_t.to(engine.device), x_0.to(engine.device))).float().cpu()


def main(out: Path) -> None:
    from tide_ds import dist
    from tide_ds.config import build_config
    from tide_ds.trainer.checkpoint import latest_checkpoint
    from tide_ds.trainer.loop import init_distributed, shutdown, train
    from tide_ds.worlds import prepare_world

    init_distributed()
    for stage in (2, 3):
        run = out / f"zero{stage}"
        cfg, _ = prepare_world(build_config(
            overrides=[*TINY, f"--train.output_dir={run}", f"--train.ds_config=ds_configs/zero{stage}.json"]
        ))
        train(cfg)
        if stage == 3:
            logits = engine_logits(cfg, latest_checkpoint(run))
            if dist.rank() == 0:
                torch.save(logits, run / "engine_logits.pt")
    shutdown()


if __name__ == "__main__":
    main(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
