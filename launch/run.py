#!/usr/bin/env python
"""Entry point: ``deepspeed [--num_gpus N] launch/run.py [--recipe FILE] [--section.field=value ...]``.

With no arguments it runs the embedded demo recipe (the defaults of ``tide_ds.config``): a tiny BD3LM
student with the real Qwen3 tokenizer, trained on the Python standard library's source code.

  --recipe FILE        YAML recipe (launch/recipes/*.yaml); overrides are applied on top of it
  --print-config       print the resolved config and exit
  --help-options       print every option with its default and meaning
"""

from __future__ import annotations

import os
import sys


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
                raise ValueError("--recipe needs a file, e.g. --recipe launch/recipes/demo.yaml")
        elif arg in ("--print-config", "--help-options", "-h", "--help"):
            flags.add(arg)
        else:
            overrides.append(arg)
        i += 1
    return recipe, overrides, flags


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
    except ValueError as err:
        print(f"tide-ds: configuration error: {err}", file=sys.stderr)
        return 2
    if "--print-config" in flags:
        print(cfg.to_yaml(), end="")
        return 0
    try:  # every weight-free check (tide_ds.plan.checks) before a run directory exists
        cfg = _prepare_run(cfg)
    except (ValueError, FileNotFoundError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tide-ds: error: {err}", file=sys.stderr)
        return 2

    from tide_ds.trainer.loop import shutdown, train
    from tide_ds.trainer.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        train(cfg)
    except Preempted:  # checkpoint written on every rank; 75 tells the sbatch script to requeue
        return PREEMPTED_EXIT_CODE
    except ValueError as err:  # user errors found while building the run: one clear line per rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tide-ds: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


def _prepare_run(cfg):
    import torch

    from tide_ds.plan import prepare_run

    return prepare_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), on_gpu=torch.cuda.is_available())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
