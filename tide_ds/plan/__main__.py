"""``python -m tide_ds.plan --recipe R --world-size N [--gpu-mem-gib G] [--host-mem-gib H] [--section.field=value ...]``

Checks the recipe without reading a weight (config.json files, safetensors headers, tokenizer files, the
dataset's schema and first rows), prints the teacher under each placement, the placement ``auto`` picks
and why, and each rank's GPU and host memory. Exit status 0 when the run fits, 1 when it does not (the
reason is printed), 2 for a configuration error. Creates nothing on disk.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m tide_ds.plan", description=__doc__.split("\n\n")[1])
    p.add_argument("--recipe", default=None, help="YAML recipe (launch/recipes/*.yaml)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8, at most the world size)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="GPU memory per rank in GiB (default 80)")
    p.add_argument("--host-mem-gib", type=float, default=1024.0, help="host memory per node in GiB (default 1024)")
    return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
    from tide_ds.config import build_config
    from tide_ds.plan.memory import GIB, Cluster
    from tide_ds.plan.planner import format_plan, make_plan

    args, overrides = parse(argv)
    try:
        if args.world_size < 1 or args.gpus_per_node < 1:
            raise ValueError(f"--world-size={args.world_size} and --gpus-per-node={args.gpus_per_node} must be >= 1")
        cfg = build_config(recipe=args.recipe, overrides=overrides)
        cluster = Cluster(world_size=args.world_size, gpus_per_node=min(args.gpus_per_node, args.world_size),
                          gpu_bytes=int(args.gpu_mem_gib * GIB), host_bytes_per_node=int(args.host_mem_gib * GIB))
        plan = make_plan(cfg, cluster)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"tide-ds plan: configuration error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, recipe=args.recipe or ""))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
