"""Deployment benchmark: the BD3LM student against each teacher, peak memory and time to generate 256 tokens.

    python tests/benchmarks/bench_deploy.py                          # CPU, the tiny configs of docs/models.md §10
    python tests/benchmarks/bench_deploy.py --scale real             # GPU, real-size shapes, random bf16 weights
    python tests/benchmarks/bench_deploy.py --scale real --models student,llada2_moe,wedlm,llada,dream

The paper reports the distilled Qwen3-0.6B student using 22x less memory and generating 5.2x faster than
its teacher. Here every model decodes one prompt of 64 tokens into 256 new tokens, greedily, with 256
steps (8 blocks of 32, one token per step), never stopping early:

* the student and WeDLM (Qwen3 architecture, BD3LM): block-causal decoding with the prefix cache
  (:class:`tide_ds.sampling.BD3LMDenoiser`);
* LLaDA2.0-mini, LLaDA-8B, Dream-7B (bidirectional): the whole canvas at every step, no cache, as their
  own samplers do (:class:`tide_ds.sampling.FullCanvasDenoiser`).

Each model runs in its own subprocess. Peak memory: ``torch.cuda.max_memory_allocated`` from before the
model is built to after generation (weights + activations + cache) on a GPU; on the CPU the increase of
the process's peak RSS over its value after imports and a warm-up run of a tiny model. Time: median wall time of ``--repeats`` generations
after one warm-up block. Ratios are teacher / student, measured in the same run. Weights are random
(transformers' own initialisation), so tokens are meaningless but the work is the real work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT_TOKENS, NEW_TOKENS, BLOCK = 64, 256, 32
TEACHERS = ("llada2_moe", "wedlm", "llada", "dream")

#: Real sizes (docs/models.md §3.1, §4.1, §5.1, §6.1, §7.1) as overrides of each family's tiny config.json.
REAL = {
    "student": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, mask_token_id=151669,
                    eos_token_id=151645, pad_token_id=151643, max_position_embeddings=40960),
    "llada2_moe": dict(vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_hidden_layers=20,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=256,
                       num_experts_per_tok=8, num_shared_experts=1, moe_intermediate_size=512, n_group=8,
                       topk_group=4, first_k_dense_replace=1, max_position_embeddings=32768,
                       pad_token_id=156892, eos_token_id=156892, mask_token_id=156895),
    "wedlm": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_window_layers=36,
                  max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                  mask_token_id=151665),
    "llada": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                  embedding_size=126464, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "dream": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_window_layers=28, mask_token_id=151666,
                  pad_token_id=151643, bos_token_id=151643, eos_token_id=151643, max_position_embeddings=131072),
}


def native_config(name: str, scale: str):
    """The transformers config each model runs as, from the family's own config.json conversion."""
    import transformers

    from tide_ds.models import dream, llada, llada2_moe, wedlm
    from tide_ds.models.qwen3 import tiny_student_config

    overrides = REAL[name] if scale == "real" else {}
    where = Path(f"<{scale} {name} config>")
    if name == "student":
        if not overrides:
            return tiny_student_config()
        config = transformers.Qwen3Config(**{k: v for k, v in overrides.items() if k != "mask_token_id"}, rms_norm_eps=1e-6,
                                          rope_theta=1e6, tie_word_embeddings=True, bos_token_id=None, is_causal=False)
        config.mask_token_id = overrides["mask_token_id"]
        return config
    if name == "llada2_moe":
        raw = llada2_moe.tiny_llada2_moe_config(**overrides)
        return llada2_moe.glm4moe_config(llada2_moe.llada2_fields(where, raw), mask_token_id=raw["mask_token_id"])
    if name == "llada":
        raw = llada.tiny_llada_config(**overrides)
        return llada.llama_config(llada.llada_fields(where, raw), mask_token_id=raw["mask_token_id"])
    if name == "dream":
        raw = dream.tiny_dream_config(**overrides)
        return dream.qwen2_config(where, raw, mask_token_id=raw["mask_token_id"])
    raw = wedlm.tiny_wedlm_config(**overrides)
    return wedlm.qwen3_config(where, raw, mask_token_id=raw["mask_token_id"])


def build(name: str, scale: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialised model (transformers' init, seeded) on ``device`` and its denoiser factory."""
    import transformers

    from tide_ds.models import teachers
    from tide_ds.sampling import BD3LMDenoiser, FullCanvasDenoiser

    config = native_config(name, scale)
    cls = transformers.Qwen3ForCausalLM if name == "student" else teachers.get_family(name).native_class
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa", dtype=dtype).eval().requires_grad_(False)
    if name in ("student", "wedlm"):
        # WeDLM's config says causal; like the student it only ever sees explicit BD3LM masks here
        model.config.is_causal = False
        return model, lambda: BD3LMDenoiser(model, block_size=BLOCK, use_cache=True)
    return model, lambda: FullCanvasDenoiser(model)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_one(name: str, *, scale: str, device: torch.device, repeats: int) -> dict:
    """Build one model, generate, and report memory and time (runs inside the per-model subprocess)."""
    from tide_ds.sampling import SamplerConfig, generate

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # everything imported and one tiny model run first, so that the baseline holds libraries, not the model
    native_config(name, scale)
    small, make_small = build("student", "tiny", device, dtype)
    generate(make_small(), [[1, 2, 3]], config=SamplerConfig(max_new_tokens=4, block_size=4, steps=4),
             mask_id=small.config.mask_token_id, pad_id=0, device=device)
    del small, make_small
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = _peak_rss_mib()
    model, make_denoiser = build(name, scale, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    mask_id = model.config.mask_token_id
    prompt = [[(7 * i + 3) % min(1000, mask_id) for i in range(PROMPT_TOKENS)]]

    def run(new_tokens: int):
        config = SamplerConfig(max_new_tokens=new_tokens, block_size=BLOCK, steps=new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = generate(make_denoiser(), prompt, config=config, mask_id=mask_id, pad_id=mask_id - 1, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, out

    run(BLOCK)  # warm-up: kernels, allocator
    times, out = [], None
    for _ in range(repeats):
        seconds, out = run(NEW_TOKENS)
        times.append(seconds)
    assert len(out.tokens[0]) == NEW_TOKENS
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        memory_kind = "cuda max_memory_allocated"
    else:
        peak = _peak_rss_mib() - base_rss
        memory_kind = "peak RSS increase"
    return {
        "model": name, "params_m": params / 1e6, "peak_mib": peak, "memory": memory_kind,
        "seconds": statistics.median(times), "all_seconds": times, "forward_calls": out.forward_calls,
        "tokens_per_s": NEW_TOKENS / statistics.median(times), "dtype": str(dtype).removeprefix("torch."),
    }


def run_all(models: list[str], *, scale: str, device: str, repeats: int, timeout: int, out: str | None) -> list[dict]:
    """One subprocess per model; a model that fails or times out gets an ``error`` row, the others still run.

    With ``out`` the JSON is rewritten after every model, so a run cut short keeps what it measured.
    """
    rows: list[dict] = []
    for name in models:
        cmd = [sys.executable, __file__, "--one", name, "--scale", scale, "--device", device, "--repeats", str(repeats)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            if proc.returncode != 0:
                rows.append({"model": name, "error": proc.stderr.strip()[-2000:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            rows.append({"model": name, "error": f"over the {timeout} s limit"})
        student = next((r for r in rows if r["model"] == "student" and "error" not in r), None)
        for r in rows:
            if student is not None and "error" not in r:
                r["memory_ratio"] = r["peak_mib"] / student["peak_mib"]
                r["time_ratio"] = r["seconds"] / student["seconds"]
        if out:
            write_json(out, rows, scale=scale, device=device)
    return rows


def write_json(out: str, rows: list[dict], *, scale: str, device: str) -> None:
    record = {"rows": rows, "scale": scale, "device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<11} {'params(M)':>10} {'peak MiB':>10} {'s/256 tok':>10} {'tok/s':>8} {'fwd':>5} "
             f"{'mem x':>7} {'time x':>7}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<11} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
            continue
        lines.append(f"{r['model']:<11} {r['params_m']:>10.2f} {r['peak_mib']:>10.1f} {r['seconds']:>10.3f} "
                     f"{r['tokens_per_s']:>8.1f} {r['forward_calls']:>5d} {r.get('memory_ratio', float('nan')):>7.2f} "
                     f"{r.get('time_ratio', float('nan')):>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --scale real, else cpu)")
    parser.add_argument("--models", default=None, help="comma-separated: student and teachers "
                        f"({','.join(TEACHERS)}); default all (real scale: student,llada2_moe)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--out", help="JSON results (default $TIDE_BENCH_DIR/deploy_<scale>.json if set)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.scale == "real" else "cpu")
    if args.one:
        if device == "cpu":
            torch.set_num_threads(1)  # steadier timings on a shared machine
        print(json.dumps(measure_one(args.one, scale=args.scale, device=torch.device(device), repeats=args.repeats)))
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; run --scale tiny on the CPU", file=sys.stderr)
        return 2
    default = "student,llada2_moe" if args.scale == "real" else ",".join(("student", *TEACHERS))
    models = (args.models or default).split(",")
    if "student" not in models:
        models.insert(0, "student")
    out = args.out or (os.path.join(os.environ["TIDE_BENCH_DIR"], f"deploy_{args.scale}.json") if os.environ.get("TIDE_BENCH_DIR") else None)
    rows = run_all(models, scale=args.scale, device=device, repeats=args.repeats, timeout=args.timeout, out=out)
    measured = [r for r in rows if "error" not in r]
    print(f"deployment: {NEW_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} steps, block {BLOCK}, "
          f"batch 1, {args.scale} shapes on {device}"
          + (f" ({measured[0]['dtype']}; memory = {measured[0]['memory']})" if measured else ""))
    print(table(rows))
    if len(measured) < len(rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
