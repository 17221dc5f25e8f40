"""Evaluate a trained student: HumanEval, MBPP, GSM8K (generation) and the held-out NLL.

    python -m tide_ds.eval --checkpoint RUN_DIR|CHECKPOINT_DIR|HF_DIR [--tasks humaneval,mbpp,gsm8k,nll] [--limit N]

The paper's protocol (docs/method.md §13.2): chat template with the empty think block, zero-shot,
256 new tokens in 256 steps (8 blocks of 32, one token per step), greedy, low-confidence remasking;
code runs in the sandbox of :mod:`tide_ds.eval.sandbox` (one subprocess per sample). The block size is
the one the student was trained with (32 in the paper). Data files are fetched on first use as
``python -m tide_ds.eval.fetch`` does. Prints a table and writes every number and every sample's answer
and verdict to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tide_ds.eval.fetch import fetch, load_problems
from tide_ds.eval.sandbox import SandboxLimits, isolation
from tide_ds.eval.tasks import TASKS, clean_answer

logger = logging.getLogger("tide_ds.eval")  # not __name__: "__main__" under python -m

GENERATION_TASKS = tuple(TASKS)
ALL_TASKS = (*GENERATION_TASKS, "nll")


def parse_tasks(text: str, *, has_run_config: bool) -> list[str]:
    if text == "auto":
        return [*GENERATION_TASKS, *(["nll"] if has_run_config else [])]
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks={text!r}: unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)} or auto")
    return tasks


def run_generation_task(name: str, loaded, *, args, block_size: int) -> dict:
    from tide_ds.generate import complete
    from tide_ds.sampling.sampler import SamplerConfig

    task = TASKS[name]
    problems = load_problems(name)
    if args.limit:
        problems = problems[: args.limit]
    max_new = args.max_new_tokens or task.max_new_tokens
    config = SamplerConfig(
        max_new_tokens=max_new, block_size=block_size, steps=args.steps or max_new,
        temperature=args.temperature, remasking="low_confidence", use_cache=True,
    )
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        logger.info("%s: generated %d/%d (%.0f s)", name, done, total, time.perf_counter() - start)

    completions = complete(loaded, [task.prompt(p) for p in problems], config=config, batch_size=args.batch_size,
                           seed=args.seed, progress=progress)
    gen_seconds = time.perf_counter() - start
    limits = SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    answers = [clean_answer(c.text, task.stops) for c in completions]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        records = list(pool.map(lambda pa: task.score(pa[0], pa[1], limits), zip(problems, answers)))
    for record, completion, answer in zip(records, completions, answers):
        record.update(answer=answer, tokens=len(completion.token_ids), finished=completion.finished)
    metrics = sorted({k for r in records for k in r if k.startswith(("pass@", "exact_match"))})
    summary = {m: sum(r[m] for r in records) / len(records) for m in metrics}
    logger.info("%s: %s over %d problems (generation %.1f s)", name,
                ", ".join(f"{k} {v:.4f}" for k, v in summary.items()), len(records), gen_seconds)
    return {
        "n": len(records), "metric": task.metric, **summary,
        "sampler": {"max_new_tokens": max_new, "steps": config.steps, "block_size": block_size,
                    "steps_per_block": config.block_steps, "temperature": args.temperature, "remasking": config.remasking},
        "generation_seconds": round(gen_seconds, 2),
        "samples": records,
    }


def format_table(results: dict) -> str:
    rows = [("task", "n", "metric", "value")]
    for name, r in results["tasks"].items():
        if name == "nll":
            rows.append(("nll", str(r["samples"]), "nll (ELBO/token)", f"{r['nll']:.4f}"))
            rows.append(("nll", str(r["samples"]), "masked ce", f"{r['masked_ce']:.4f}"))
            continue
        for metric in (k for k in r if k.startswith(("pass@", "exact_match"))):
            rows.append((name, str(r["n"]), metric, f"{r[metric]:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_out(loaded) -> Path:
    name = loaded.source.parent.parent.name if loaded.source.parent.name == "checkpoints" else loaded.source.name
    return Path("eval_results") / f"{name}-step{loaded.step if loaded.step is not None else 'na'}.json"


def main(argv: list[str] | None = None) -> int:
    from tide_ds.generate import add_model_args, pick_device
    from tide_ds.log import setup_cli_logging

    parser = argparse.ArgumentParser(prog="python -m tide_ds.eval", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--tasks", default="auto",
                        help=f"comma-separated from {','.join(ALL_TASKS)}; auto = all (nll only when the run config is known)")
    parser.add_argument("--limit", type=int, default=0, help="first N problems per task (and N held-out samples); 0 = all")
    parser.add_argument("--out", help="results JSON (default eval_results/<run>-step<N>.json)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="override the protocol's 256")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps in total (default: max-new-tokens)")
    parser.add_argument("--block-size", type=int, default=0, help="default: the student's training block size, else 32")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the protocol)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (greedy results do not depend on it)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="sandboxed programs run at once")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wheel-dir", help="benchmark wheels already downloaded (see tide_ds.eval.fetch)")
    args = parser.parse_args(argv)
    setup_cli_logging()
    from tide_ds.generate import DEFAULT_BLOCK_SIZE
    from tide_ds.sampling.load import load_inference_model

    try:
        if args.limit < 0:
            raise ValueError(f"--limit={args.limit} must be >= 0")
        loaded = load_inference_model(args.checkpoint, dtype=args.dtype, device=pick_device(args.device))
        tasks = parse_tasks(args.tasks, has_run_config=loaded.run_config is not None)
        generation = [t for t in tasks if t in TASKS]
        if generation:
            fetch(generation, wheel_dir=args.wheel_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"tide-ds eval: error: {err}", file=sys.stderr)
        return 2
    block_size = args.block_size or loaded.block_size or DEFAULT_BLOCK_SIZE
    results: dict = {
        "checkpoint": str(loaded.source), "step": loaded.step, "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "device": str(loaded.model.device), "sandbox": isolation() if generation else None, "limit": args.limit or None,
        "tasks": {},
    }
    for name in tasks:
        if name == "nll":
            from tide_ds.eval.nll import heldout_nll

            results["tasks"]["nll"] = heldout_nll(loaded, samples=args.limit or None)
        else:
            results["tasks"][name] = run_generation_task(name, loaded, args=args, block_size=block_size)
    out = Path(args.out) if args.out else default_out(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out)
    print(format_table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
