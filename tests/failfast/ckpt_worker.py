"""One rank of the checkpoint verification tests (run by test_checkpoint_verify.py, never collected by pytest).

usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python ckpt_worker.py MODE OUT [RUN ...]

A real DeepSpeed ZeRO-2 engine (gloo, CPU) around a small model; each rank trains on its own data.

* ``save OUT``: checkpoints at steps 1 and 2 in the run OUT/run, then a checkpoint at step 3 with the free
  space reported as 1000 bytes (it must fail with the same error on every rank); OUT/save.<rank>.json.
* ``load OUT RUN...``: for each run directory, ``load_checkpoint`` of its latest checkpoint into a fresh
  engine; records the step loaded, a digest of the weights, or the error; OUT/load.<rank>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().mean()


def engine_for(run: Path):
    import deepspeed

    from tide_ds import dist
    from tide_ds.config import build_config
    from tide_ds.trainer.engine import build_ds_config, build_optimizer

    cfg = build_config(overrides=[f"--train.output_dir={run}", "--train.keep_last=3", "--train.micro_batch_size=2",
                                  "--train.ds_config=ds_configs/zero2.json"])
    torch.manual_seed(0)
    module = Tiny()
    optimizer, scheduler = build_optimizer(cfg, module)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(cfg, world_size=dist.world_size()))
    return cfg, engine


def weights_digest(engine) -> list[float]:
    return [round(float(p.double().sum()), 10) for p in engine.module.parameters()]


def main() -> None:
    import deepspeed

    from tide_ds import dist
    from tide_ds.trainer import checkpoint

    mode, out = sys.argv[1], Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.rank()
    result: dict = {}
    if mode == "save":
        run = out / "run"
        cfg, engine = engine_for(run)
        checkpoint.prepare_run_dir(cfg)
        g = torch.Generator().manual_seed(rank)  # ranks' data differ
        for step in (1, 2):
            engine.backward(engine(torch.randn(2, 16, generator=g)))
            engine.step()
            checkpoint.save_checkpoint(engine, cfg, step=step, trainer_state={"step": step, "data": {}})
            result[f"weights_{step}"] = weights_digest(engine)
        checkpoint.free_bytes = lambda path: 1000
        try:
            checkpoint.save_checkpoint(engine, cfg, step=3, trainer_state={"step": 3, "data": {}})
        except checkpoint.CheckpointWriteError as err:
            result["space_error"] = str(err)
    else:
        for run in sys.argv[3:]:
            cfg, engine = engine_for(Path(run))
            try:
                state = checkpoint.load_checkpoint(engine, checkpoint.latest_checkpoint(run))
                result[run] = {"step": state["step"], "loaded_from": state["loaded_from"],
                               "weights": weights_digest(engine)}
            except ValueError as err:
                result[run] = {"error": str(err)}
    (out / f"{mode}.{rank}.json").write_text(json.dumps(result))
    dist.destroy()


if __name__ == "__main__":
    main()
