"""The paper's evaluation suite, offline: ``tide-ds eval --suite paper --checkpoint DIR [--data-dir DIR] [--limit N]``.

The TIDE paper (arXiv 2604.26951) reports eight benchmarks, zero-shot except BBH (3-shot), greedy BD3LM
decoding with block size 32 and 256 new tokens in 256 steps (3 for the two short-answer tasks). This module
maps each one to what runs it here:

* HumanEval, MBPP, GSM8K: tide-ds's own evaluator (:mod:`tide_ds.eval.tasks`, the lm-eval prompts, code run
  in the sandbox), data from the pinned PyPI wheels of :mod:`tide_ds.eval.fetch`;
* MATH, BBH, MMLU-Pro, HellaSwag, MMLU: lm-evaluation-harness tasks through the ``tide_bd3lm`` model
  class (:mod:`tide_ds.eval.harness`). No PyPI wheel ships their data (BBH and MMLU-Pro nowhere on PyPI),
  so they read the Hugging Face datasets cache given by ``--data-dir`` (used as ``HF_HOME``, offline);
  fill it once on a machine with internet access by loading each task as the suite does (:func:`data_dir_fix`
  prints the exact command for a missing one): ``HF_HOME=DIR python -c "from lm_eval.tasks import TaskManager,
  get_task_dict; get_task_dict(['mmlu_generative'], TaskManager())"``, which writes
  ``DIR/hub/datasets--cais--mmlu`` and ``DIR/datasets/``.

Differences from the paper's harness (a fork of lm-eval with tasks upstream lacks): MMLU runs upstream's
``mmlu_generative`` (the paper: ``mmlu_generative_dream``) and HellaSwag upstream's multiple-choice
``hellaswag`` scored by the masked-diffusion ELBO (the paper: the generative ``hellaswag_gen``), so those
two numbers are close to, not the same measurement as, the paper's.

A benchmark whose data is not present is listed as missing with the reason, never silently dropped; the
average is over the benchmarks that ran, and says how many.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("tide_ds.eval")

__all__ = ["BENCHMARKS", "PAPER_ROWS", "data_dir_fix", "format_paper_table", "run_paper_suite"]


@dataclass(frozen=True)
class Benchmark:
    name: str  # column title, in the paper's order
    runner: str  # "tide" (tide_ds.eval) or "lm_eval"
    task: str  # tide task name or lm-eval task / group
    metric: str  # result key (lm-eval: "metric,filter")
    datasets: tuple[str, ...] = ()  # Hugging Face datasets an lm-eval task reads
    num_fewshot: int | None = None
    max_gen_toks: int | None = None


#: The paper's eight benchmarks, in the order of its results table.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("GSM8K", "tide", "gsm8k", "exact_match"),
    Benchmark("MATH", "lm_eval", "minerva_math", "exact_match,none", ("EleutherAI/hendrycks_math",), 0, 256),
    Benchmark("BBH", "lm_eval", "bbh_cot_fewshot", "exact_match,get-answer", ("SaylorTwift/bbh",), 3, 256),
    Benchmark("MMLU-Pro", "lm_eval", "mmlu_pro", "exact_match,custom-extract", ("TIGER-Lab/MMLU-Pro",), 0, 256),
    Benchmark("HellaSwag", "lm_eval", "hellaswag", "acc,none", ("Rowan/hellaswag",), 0, None),
    Benchmark("MMLU", "lm_eval", "mmlu_generative", "exact_match,get_response", ("cais/mmlu",), 0, 3),
    Benchmark("HumanEval", "tide", "humaneval", "pass@1"),
    Benchmark("MBPP", "tide", "mbpp", "pass@1"),
)

#: Rows of the paper's table (percent; arXiv 2604.26951, results table, as recorded in the project's spec):
#: the BD3LM student trained without distillation and the best TIDE variant (TIDE-Cross, pipeline A).
PAPER_ROWS: dict[str, dict[str, float]] = {
    "BD3LM, no distillation (paper)": dict(zip(
        [b.name for b in BENCHMARKS], [45.56, 13.08, 26.32, 13.80, 39.28, 39.15, 46.34, 37.80])),
    "TIDE-Cross, pipeline A (paper)": dict(zip(
        [b.name for b in BENCHMARKS], [52.24, 13.20, 27.37, 14.52, 39.88, 39.59, 48.17, 38.60])),
}
#: Paper averages over the eight benchmarks (the AR Qwen3-0.6B reference is reported as an average only).
PAPER_AVERAGES = {"BD3LM, no distillation (paper)": 32.67, "TIDE-Cross, pipeline A (paper)": 34.20,
                  "AR Qwen3-0.6B (paper, average only)": 40.91}


def _lm_eval_probe(bench: Benchmark, task_manager) -> str | None:
    """None when the task's data loads offline, else why not (one line)."""
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([bench.task], task_manager)
    except Exception as err:  # noqa: BLE001 - datasets/hub raise many types for "not in the cache"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{type(err).__name__}: {first[:200]}"
    return None


def data_dir_fix(bench: Benchmark, data_dir: str | None) -> str:
    """How to put ``bench``'s data where ``--data-dir`` reads it: the exact command and the folders it writes."""
    where = os.path.abspath(data_dir) if data_dir else "DIR"
    folders = ", ".join(f"{where}/hub/datasets--{d.replace('/', '--')}" for d in bench.datasets)
    fill = (f"HF_HOME={where} HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 python -c \"from lm_eval.tasks import "
            f"TaskManager, get_task_dict; get_task_dict(['{bench.task}'], TaskManager())\"")
    return (f"to fix: on a machine with internet run {fill} (it writes {folders} and {where}/datasets/), "
            f"copy {where} here and pass --data-dir {where}")


def _lm_eval_value(results: dict, bench: Benchmark) -> tuple[float, int | None]:
    row = results["results"][bench.task]
    value = row.get(bench.metric)
    if value is None:
        raise KeyError(f"lm-eval's results for {bench.task} have no {bench.metric!r}: {sorted(row)}")
    n = results.get("n-samples", {})
    total = sum(v.get("effective", 0) for k, v in n.items()) or None
    return 100.0 * float(value), total


def run_paper_suite(loaded, *, args, block_size: int) -> dict:
    """Every benchmark that can run; ``{"benchmarks": {name: {...}}, "missing": {name: reason}}``."""
    from tide_ds.eval.__main__ import run_generation_task
    from tide_ds.eval.fetch import fetch

    out: dict = {"benchmarks": {}, "missing": {}}
    tide_tasks = [b.task for b in BENCHMARKS if b.runner == "tide"]
    try:
        fetch(tide_tasks, wheel_dir=args.wheel_dir)
        tide_ok = True
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        tide_ok, tide_reason = False, str(err).splitlines()[0]
    lm = task_manager = None
    for bench in BENCHMARKS:
        if bench.runner == "tide":
            if not tide_ok:
                out["missing"][bench.name] = tide_reason
                continue
            r = run_generation_task(bench.task, loaded, args=args, block_size=block_size)
            out["benchmarks"][bench.name] = {"value": 100.0 * r[bench.metric], "n": r["n"], "runner": "tide_ds.eval",
                                             "task": bench.task, "metric": bench.metric}
            continue
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager

            from tide_ds.eval.harness import TideBD3LM
        except ImportError as err:
            out["missing"][bench.name] = f"lm-eval is not installed ({err}); pip install -e '.[eval]'"
            continue
        if task_manager is None:
            task_manager = TaskManager(include_path=getattr(args, "include_path", None) or None)
        reason = _lm_eval_probe(bench, task_manager)
        if reason is not None:
            where = f"--data-dir {args.data_dir}" if args.data_dir else "no --data-dir given"
            out["missing"][bench.name] = (f"cannot load {bench.task} (data: {', '.join(bench.datasets)}; {where}): "
                                          f"{reason}; {data_dir_fix(bench, args.data_dir)}")
            continue
        if lm is None:
            lm = TideBD3LM(pretrained=loaded, batch_size=args.batch_size, block_size=block_size, seed=args.seed,
                           mc_num=args.mc_num)
        gen_kwargs = f"max_gen_toks={bench.max_gen_toks}" if bench.max_gen_toks else None
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[bench.task], num_fewshot=bench.num_fewshot, limit=args.limit or None,
            task_manager=task_manager, apply_chat_template=True, gen_kwargs=gen_kwargs,
        )
        value, n = _lm_eval_value(results, bench)
        out["benchmarks"][bench.name] = {"value": value, "n": n, "runner": "lm-eval", "task": bench.task,
                                         "metric": bench.metric}
    return out


def format_paper_table(suite: dict) -> str:
    """The paper's layout (benchmarks as columns, models as rows) with this checkpoint's row last."""
    names = [b.name for b in BENCHMARKS]
    header = ["model", *names, "Avg"]
    rows = []
    for label, values in PAPER_ROWS.items():
        rows.append([label, *(f"{values[n]:.2f}" for n in names), f"{PAPER_AVERAGES[label]:.2f}"])
    rows.append(["AR Qwen3-0.6B (paper, average only)", *("-" for _ in names),
                 f"{PAPER_AVERAGES['AR Qwen3-0.6B (paper, average only)']:.2f}"])
    ours = suite["benchmarks"]
    done = [ours[n]["value"] for n in names if n in ours]
    avg = f"{sum(done) / len(done):.2f} ({len(done)}/8)" if done else "-"
    rows.append(["this checkpoint", *(f"{ours[n]['value']:.2f}" if n in ours else "missing" for n in names), avg])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ns = ", ".join(f"{n} n={ours[n]['n']}" for n in names if n in ours)
    if ns:
        lines.append(f"problems scored: {ns}")
    for name, reason in suite["missing"].items():
        lines.append(f"missing {name}: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tide-ds eval --suite paper ...`` (``python -m tide_ds.eval.suite --suite paper ...``)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="tide-ds eval --suite paper", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--suite", choices=["paper"], required=True, help="the paper's eight benchmarks")
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or exported HF directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights dtype (default: what the run trained in, or what config.json records)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--data-dir", help="Hugging Face datasets cache (HF_HOME) holding the lm-eval tasks' data")
    parser.add_argument("--include-path", help="extra lm-eval task YAMLs (lm-eval's --include_path), e.g. tasks over local files")
    parser.add_argument("--limit", type=int, default=0, help="first N problems per benchmark (lm-eval: per task); 0 = all")
    parser.add_argument("--out", help="results JSON (default eval_results/<run>-paper.json)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="tide tasks: override the protocol's 256")
    parser.add_argument("--steps", type=int, default=0, help="tide tasks: denoising steps in total (default: max-new-tokens)")
    parser.add_argument("--block-size", type=int, default=0, help="default: the student's training block size, else 32")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the protocol)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mc-num", type=int, default=32, help="Monte Carlo samples of the ELBO (HellaSwag)")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wheel-dir", help="benchmark wheels already downloaded (see tide_ds.eval.fetch)")
    args = parser.parse_args(argv)
    # Hugging Face reads these when it is first imported: set them before anything imports transformers
    if args.data_dir:
        os.environ["HF_HOME"] = os.path.abspath(args.data_dir)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tide_ds.eval.__main__ import default_out
    from tide_ds.generate import DEFAULT_BLOCK_SIZE, pick_device
    from tide_ds.log import setup_cli_logging

    setup_cli_logging()
    from tide_ds.sampling.load import load_inference_model

    try:
        if args.limit < 0:
            raise ValueError(f"--limit={args.limit} must be >= 0")
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a directory")
        loaded = load_inference_model(args.checkpoint, dtype=args.dtype, device=pick_device(args.device))
    except (ValueError, FileNotFoundError) as err:
        print(f"tide-ds eval: error: {err}", file=sys.stderr)
        return 2
    block_size = args.block_size or loaded.block_size or DEFAULT_BLOCK_SIZE
    suite = run_paper_suite(loaded, args=args, block_size=block_size)
    out = Path(args.out) if args.out else default_out(loaded).with_name(default_out(loaded).stem + "-paper.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(loaded.source), "limit": args.limit or None, **suite,
                               "paper": PAPER_ROWS, "paper_averages": PAPER_AVERAGES}, indent=1) + "\n")
    print(format_paper_table(suite))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
