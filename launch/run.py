#!/usr/bin/env python
"""Entry point: ``deepspeed [--num_gpus N] launch/run.py [--recipe FILE] [--section.field=value ...]``.

With no arguments it runs the embedded demo recipe (the defaults of ``tide_ds.config``): the instruct world
(``tide_ds.worlds``: an instruction corpus of the Python standard library and a small pretrained teacher,
built once and cached), then TIDE-Cross into a tiny BD3LM student with the real Qwen3 tokenizer.

The path of one run: ``main`` -> ``tide_ds.plan.prepare_run`` (every check that reads no weight, before
anything is created) -> ``tide_ds.worlds.prepare_world`` (paths for an empty ``data.dataset``) ->
``tide_ds.trainer.loop.train`` (build the run, then step) -> ``tide_ds.trainer.step.train_step`` (one
optimizer step: the objective's targets, the student's losses, backward, step).

  --recipe FILE        YAML recipe (launch/recipes/*.yaml); overrides are applied on top of it
  --print-config       print the resolved config and exit
  --help-options       print every option with its default and meaning
"""

from __future__ import annotations

import os
import sys

from tide_ds.errors import ConfigError


def parse_argv(argv: list[str]) -> tuple[str | None, list[str], set[str]]:
    """Split argv into (recipe, overrides, flags); DeepSpeed's ``--local_rank`` is accepted and ignored."""
    recipe, overrides, flags = None, [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank"):
            i += 1 if "=" in arg else 2
            continue
        if arg == "--recipe" or arg.startswith("--recipe="):
            if "=" in arg:
                recipe = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                recipe, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--recipe needs a file, e.g. --recipe launch/recipes/demo.yaml")
        elif arg in ("--print-config", "--help-options", "-h", "--help"):
            flags.add(arg)
        else:
            overrides.append(arg)
        i += 1
    return recipe, overrides, flags


def _rank() -> str:
    """This process's rank as the launcher set it (before any process group exists)."""
    return os.environ.get("RANK", "0")


def main(argv: list[str]) -> int:
    from tide_ds.config import build_config, option_table

    try:
        recipe, overrides, flags = parse_argv(argv)
        if flags & {"-h", "--help"}:
            print(__doc__)
            return 0
        if "--help-options" in flags:
            print(option_table())
            return 0
        cfg = build_config(recipe=recipe, overrides=overrides)
    except ConfigError as err:  # every rank parses the same argv: each says it, in one line
        print(f"tide-ds: configuration error (rank {_rank()}): {err}", file=sys.stderr)
        return 2
    if "--print-config" in flags:
        print(cfg.to_yaml(), end="")
        return 0
    try:  # every weight-free check (tide_ds.plan.checks) before a process group, a world or a run directory
        cfg = _prepare_run(cfg)
    except ConfigError as err:  # every rank checks the same files: each says it, in one line
        print(f"tide-ds: error (rank {_rank()}): {err}", file=sys.stderr)
        return 2

    from pathlib import Path

    from tide_ds.log import setup_logging
    from tide_ds.trainer.loop import init_distributed, shutdown, train
    from tide_ds.trainer.preemption import PREEMPTED_EXIT_CODE, Preempted
    from tide_ds.worlds import prepare_world, report_world

    dataset = cfg.data.dataset
    try:
        setup_logging()
        init_distributed(cfg.train.dist_timeout_minutes)
        cfg, world = prepare_world(cfg)  # an empty data.dataset: build (or reuse) the world of world.name
        if world is not None or cfg.data.dataset != dataset:  # the world's dataset and teacher, checked the same way
            cfg = _prepare_run(cfg)
        result = train(cfg)
        if world is not None:
            report_world(cfg, world, result["nll"], Path(cfg.train.output_dir).resolve())
    except Preempted:  # checkpoint written on every rank; 75 tells the sbatch script to requeue
        return PREEMPTED_EXIT_CODE
    except ConfigError as err:  # a user error found while building the run: one clear line on every rank
        print(f"tide-ds: error (rank {_rank()}): {err}", file=sys.stderr)
        return 2
    # Any other exception is a bug: it propagates with its traceback (and a non-zero exit) on its rank.
    finally:
        shutdown()
    return 0


def _prepare_run(cfg):
    """The weight-free checks of :mod:`tide_ds.plan.checks` (rank-local reads of config.json files, headers,
    tokenizer files and the dataset's first rows); ``cfg`` with the derived accumulation and step count."""
    import torch

    from tide_ds.plan import prepare_run

    return prepare_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), on_gpu=torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
