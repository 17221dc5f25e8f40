#!/usr/bin/env python
"""Entry point: ``deepspeed [--num_gpus N] launch/run.py [--recipe FILE] [--section.field=value ...]``.

With no arguments it runs the embedded demo recipe (the defaults of ``tide_ds.config``): the instruct world
(``tide_ds.worlds``: an instruction corpus of the Python standard library and a small pretrained teacher,
built once and cached), then TIDE-Cross into a tiny BD3LM student with the real Qwen3 tokenizer.

The path of one run: ``main`` (options, then ``tide_ds.plan.prepare_run``: the one pass of start checks of
``tide_ds.plan.checks.validate_run``, everything that needs no process group and reads no weight, in the
order of issue 16, before anything is created) ->
``tide_ds.worlds.prepare_world`` (paths for an empty ``data.dataset``) ->
``tide_ds.trainer.loop.train`` (build the run, then step) -> ``tide_ds.trainer.step.train_step`` (one
optimizer step: the objective's targets, the student's losses, backward, step) -> ``report_world``; all
after the checks under ``tide_ds.failfast.run``, so a failure on one rank ends the job within seconds.

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


def _job(cfg, argv: list[str]):
    """Everything after the configuration checks, on this rank: start, build (or reuse) the world, train, report."""
    from pathlib import Path

    from tide_ds.log import setup_logging
    from tide_ds.trainer.loop import init_distributed, train
    from tide_ds.worlds import baseline_config, prepare_world, record_baseline, report_world

    setup_logging()
    init_distributed(cfg.train.dist_timeout_minutes)
    dataset = cfg.data.dataset
    cfg, world = prepare_world(cfg)  # an empty data.dataset: build (or reuse) the world of world.name
    if world is not None or cfg.data.dataset != dataset:  # the world's dataset and teacher, checked the same way
        cfg = _prepare_run(cfg, world_built=True)
    result = train(cfg)
    if world is not None:
        base_cfg = baseline_config(cfg, world)  # --world.baseline=true and none recorded: train it now
        if base_cfg is not None:
            record_baseline(base_cfg, world, train(base_cfg)["nll"])
        report_world(cfg, world, result["nll"], Path(cfg.train.output_dir).resolve(), argv=argv,
                     tokens=result.get("tokens"))


def main(argv: list[str]) -> int:
    from tide_ds.log import quiet_ranks

    quiet_ranks()  # before the options and DeepSpeed: notices every rank would print alike, once per job
    from tide_ds import failfast
    from tide_ds.config import build_config, option_table

    try:
        recipe, overrides, flags = parse_argv(argv)
        if flags & {"-h", "--help"}:
            print(__doc__)
            return 0
        if "--help-options" in flags:
            print(option_table())
            return 0
        cfg = build_config(recipe=recipe, overrides=overrides)  # the config and recipe
        if "--print-config" in flags:
            print(cfg.to_yaml(), end="")
            return 0
        # the rest of the one pass (tide_ds.plan.checks.validate_run): engine JSON, output directory, dataset,
        # teacher and student files, ids; before a process group, a world or a run directory
        cfg = _prepare_run(cfg)
    except ConfigError as err:  # every rank checks the same argv and files: one line naming the rank, once per job
        return failfast.report(err, label="configuration error")

    from tide_ds.trainer.loop import shutdown
    from tide_ds.trainer.preemption import PREEMPTED_EXIT_CODE, Preempted

    failfast.install()  # a failure on any rank ends every rank within seconds (tide_ds/failfast.py)
    try:
        # On any error but a preemption: one message per job (a ConfigError as one line naming the rank, exit 2;
        # a bug with its traceback, exit 1), then os._exit on this rank without a collective; the watchdog of
        # every other rank follows within a second. The world's preparation runs under it too.
        failfast.run(_job, cfg, argv, passthrough=(Preempted,))
    except Preempted:  # checkpoint written on every rank; 75 tells the sbatch script to requeue
        return PREEMPTED_EXIT_CODE
    finally:
        shutdown()
    return 0


def _prepare_run(cfg, *, world_built: bool = False):
    """The start checks of :func:`tide_ds.plan.checks.validate_run` (rank-local reads of the engine JSON, the
    output directory, config.json files, headers, tokenizer files and the dataset's first rows); ``cfg`` with the
    derived accumulation and step count. ``world_built``: only what a world built is checked again."""
    import torch

    from tide_ds.plan import prepare_run

    return prepare_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")), on_gpu=torch.cuda.is_available(),
                       world_built=world_built)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
