"""Compile report of every Triton kernel for sm_90 (H100/H200) without a GPU, and a roofline estimate.

    python -m tests.kernels.compile_report [--out-dir bench_results]     (run with TRITON_INTERPRET unset)

For each kernel and each of its autotune configs (what the autotuner may pick on a GPU), the kernel is
compiled for ``sm_90`` in the dtype the trainer uses on a GPU (bf16 inputs, fp32 accumulation), and
``ptxas -v`` (the one Triton ships) is run on its PTX: registers per thread, spill stores/loads (bytes),
and the shared memory Triton asks for at launch. A config that spills or needs more shared memory than
one block may have on an H100/H200 (227 KiB of the SM's 228 KiB) fails :func:`check` (and so the test
``tests/kernels/test_compile_report.py``).

The roofline part estimates, per kernel at the paper's shapes and with the first config's tiles, the
FLOPs (matmul only), the bytes the programs load and store (an upper bound of DRAM traffic: L2 hits are not
modelled) and the atomic adds issued, against the H200's 989 TFLOP/s (bf16 dense) and 4.8 TB/s, so the first
GPU run can be read against a bound. Writes ``triton_compile_report.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SMEM_LIMIT = 227 * 1024  # bytes per block on sm_90 (228 KiB per SM, 1 KiB reserved)
REGS_PER_SM = 65536
H200_FLOPS = 989e12
H200_BYTES = 4.8e12
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ConfigReport:
    kernel: str
    variant: str
    config: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    max_blocks_by_registers: int

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared_bytes <= SMEM_LIMIT


def _parse_ptxas(log: str) -> tuple[int, int, int]:
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spill.group(1)), int(spill.group(2))


def _signature(fn, consts: dict, types: dict[str, str], ints: dict[str, int]) -> tuple[dict, dict, dict]:
    """What a launch on contiguous bf16 tensors at the paper's shapes specialises to: a last-dimension stride
    (``stride_*d``) equal to 1 becomes the constant 1, pointers and integers that are multiples of 16 carry
    Triton's divisibility hint (as the JIT does at launch); ``ints`` gives the other integers' values."""
    signature, attrs, consts = {}, {}, dict(consts)
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name] = "constexpr"
            consts[name] = 1
        elif name in types or name.endswith("_ptr"):
            signature[name] = types.get(name, "*bf16")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif "scale" in name:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            value = ints.get(name, 1024 if name.startswith("stride_") else 1)
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs, consts


def _compile(fn, config, consts: dict, types: dict[str, str], ints: dict[str, int]):
    """Compile for sm_90 with Triton's own ptxas run; returns (compiled kernel, ptxas log)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    signature, attrs, consts = _signature(fn, {**consts, **config.kwargs}, types, ints)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled, log.getvalue()


def kernel_specs():
    """(name, variant, autotuned kernel, its GPU autotune configs, constexprs, pointer types other than bf16, integer
    values) of every kernel. The configs come from the kernel modules' lists (under the interpreter the autotuner
    holds one interpreter config instead)."""
    import triton.language as tl
    from tide_kernels.bd3lm_attention import kernel as attn
    from tide_kernels.fused_divergence import kernel as div
    from tide_kernels.fused_head import kernel as head

    f32 = "*fp32"
    acc = {"ACC_DTYPE": tl.float32, "DOT_PRECISION": "tf32"}
    head_types = {"tgt_ptr": "*i64", "rows_ptr": "*i8", "lse_ptr": f32, "lp_ptr": f32, "g_ptr": f32, "dh_ptr": f32,
                  "dw_ptr": f32}
    attn_consts = {"HEAD_DIM": 128, "GROUP": 2, "CLEAN_FIRST": False, "HAS_KEY_LENS": False, **acc}
    attn_types = {"key_lens_ptr": "*i64", "lse_ptr": f32, "delta_ptr": f32}
    div_consts = {"ACC_DTYPE": tl.float32, "DOT_S": "tf32", "DOT_T": "tf32", "HAS_REV": True, "HAS_TID": True}
    div_types = {"lam_ptr": f32, "lse_ptr": f32, "div_ptr": f32, "invt_ptr": f32, "coeff_ptr": f32, "dh_ptr": f32,
                 "dw_ptr": f32}
    head_ints = {"N": 4096, "V": 151_936, "D": 1024}
    attn_ints = {"num_heads": 16, "num_kv_heads": 8, "num_tokens": 1024, "seq_len": 512, "block_size": 32}
    div_ints = {"N": 5120, "V": 151_646, "DS": 1024, "DT": 4096}
    return [
        ("fused_head.lse_fwd", "bf16", head._lse_fwd_kernel, head._FWD_CONFIGS, acc, head_types, head_ints),
        ("fused_head.grad", "bf16, dh+dW", head._grad_kernel, head._GRAD_CONFIGS,
         {**acc, "NEED_DH": True, "NEED_DW": True}, head_types, head_ints),
        ("bd3lm_attention.fwd", "bf16, Dh=128", attn._bd3lm_attention_fwd_kernel, attn._FWD_CONFIGS, attn_consts,
         attn_types, attn_ints),
        ("bd3lm_attention.fwd", "bf16, Dh=128, key lengths (teachers)", attn._bd3lm_attention_fwd_kernel,
         attn._FWD_CONFIGS, {**attn_consts, "HAS_KEY_LENS": True}, attn_types, attn_ints),
        ("bd3lm_attention.bwd_dq", "bf16, Dh=128", attn._bd3lm_attention_bwd_dq_kernel, attn._DQ_CONFIGS, attn_consts,
         attn_types, attn_ints),
        ("bd3lm_attention.bwd_dkdv", "bf16, Dh=128", attn._bd3lm_attention_bwd_dkdv_kernel, attn._DKDV_CONFIGS,
         attn_consts, attn_types, attn_ints),
        ("fused_divergence.stats", "bf16, all terms", div._stats_kernel, div.STATS_CONFIGS, div_consts, div_types,
         div_ints),
        ("fused_divergence.grad", "bf16, all terms, dh+dW", div._grad_kernel, div.GRAD_CONFIGS,
         {**div_consts, "NEED_DH": True, "NEED_DW": True}, div_types, div_ints),
    ]


def config_label(config) -> str:
    """How a config is named in the report: its tile sizes, warps and stages."""
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def compile_all() -> list[ConfigReport]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run the compile report with TRITON_INTERPRET unset (the interpreter does not compile)")

    import triton

    # A fresh cache, so that every config really runs ptxas (whose log holds registers and spills).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tide_compile_report_")
    triton.knobs.cache.dir = os.environ["TRITON_CACHE_DIR"]
    triton.knobs.nvidia.dump_ptxas_log = True
    reports = []
    for name, variant, kernel, configs, consts, types, ints in kernel_specs():
        for config in configs:
            compiled, log = _compile(kernel.fn, config, consts, types, ints)
            regs, stores, loads = _parse_ptxas(log)
            threads = 32 * config.num_warps
            reports.append(ConfigReport(
                kernel=name, variant=variant, config=config_label(config),
                num_warps=config.num_warps, num_stages=config.num_stages, registers=regs, spill_stores=stores,
                spill_loads=loads, shared_bytes=int(compiled.metadata.shared),
                max_blocks_by_registers=REGS_PER_SM // max(1, regs * threads),
            ))
    return reports


def check(reports: list[ConfigReport]) -> list[str]:
    """The configs that spill or exceed the shared memory of one block on sm_90, as messages."""
    return [f"{r.kernel} [{r.variant}] {r.config} warps={r.num_warps} stages={r.num_stages}: {r.registers} registers, "
            f"spills {r.spill_stores}/{r.spill_loads} B, shared {r.shared_bytes} B (limit {SMEM_LIMIT})"
            for r in reports if not r.ok]


# ------------------------------------------------------------------------------------------------
# Roofline estimates at the paper's shapes (first config's tiles; bf16 inputs = 2 bytes, fp32 atomics)

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def roofline() -> list[dict]:
    from tide_kernels.bd3lm_attention import kernel as attn
    from tide_kernels.fused_divergence import kernel as div
    from tide_kernels.fused_head import kernel as head

    rows = []

    def add(kernel, shape, flops, bytes_, atomics):
        t_c, t_m = flops / H200_FLOPS, bytes_ / H200_BYTES
        rows.append({"kernel": kernel, "shape": shape, "gflop": flops / 1e9, "gbytes": bytes_ / 1e9,
                     "atomics_millions": atomics / 1e6, "intensity_flop_per_byte": flops / max(1, bytes_),
                     "compute_ms": t_c * 1e3, "memory_ms": t_m * 1e3, "bound_ms": max(t_c, t_m) * 1e3,
                     "bound": "compute" if t_c >= t_m else "memory"})

    # Student LM head (pipeline A): N = 8 x 512 rows, V = 151,936, D = 1,024.
    n, v, d = 8 * 512, 151_936, 1_024
    c = head._FWD_CONFIGS[0].kwargs
    add("fused_head.lse_fwd", f"N={n} V={v} D={d}", 2 * n * v * d,
        _cdiv(n, c["BLOCK_N"]) * v * d * 2 + _cdiv(v, c["BLOCK_V"]) * n * d * 2 + 8 * n, 0)
    c = head._GRAD_CONFIGS[0].kwargs
    progs = _cdiv(n, c["BLOCK_N"]) * _cdiv(v, c["BLOCK_V"])
    tile_loads = progs * 2 * (c["BLOCK_N"] + c["BLOCK_V"]) * d * 2  # logits recompute, then dh/dW loads
    atomics = n * d * _cdiv(v, c["BLOCK_V"]) + v * d * _cdiv(n, c["BLOCK_N"])
    add("fused_head.grad", f"N={n} V={v} D={d}", 6 * n * v * d, tile_loads + atomics * 8, atomics)
    # Pipeline-B token divergences: 10 x 512 rows, V' = 151,646, D_s = 1,024 (Qwen3-0.6B), D_t = 4,096 (WeDLM-8B).
    n, v, ds, dt = 10 * 512, 151_646, 1_024, 4_096
    c = div.STATS_CONFIGS[0].kwargs
    add("fused_divergence.stats", f"N={n} V'={v} D_s={ds} D_t={dt}", 2 * n * v * (ds + dt),
        _cdiv(n, c["BLOCK_N"]) * v * (ds + dt) * 2 + _cdiv(v, c["BLOCK_V"]) * n * (ds + dt) * 2, 0)
    c = div.GRAD_CONFIGS[0].kwargs
    progs = _cdiv(n, c["BLOCK_N"]) * _cdiv(v, c["BLOCK_V"])
    tile_loads = progs * ((c["BLOCK_N"] + c["BLOCK_V"]) * (ds + dt) + (c["BLOCK_N"] + c["BLOCK_V"]) * ds) * 2
    atomics = n * ds * _cdiv(v, c["BLOCK_V"]) + v * ds * _cdiv(n, c["BLOCK_N"])
    add("fused_divergence.grad", f"N={n} V'={v} D_s={ds} D_t={dt}", 2 * n * v * (ds + dt) + 4 * n * v * ds,
        tile_loads + atomics * 8, atomics)
    # BD3LM attention, Qwen3-0.6B student: B = 8, L = 512 (2L = 1,024 tokens), K = 32, 16 heads, Dh = 128.
    b, length, k, h, dh = 8, 512, 32, 16, 128
    pairs = length * k + length * (length - k) / 2 + (length * length / 2 + length * k / 2)  # x_t->x_t, x_t->x_0, x_0->x_0
    c = attn._FWD_CONFIGS[0].kwargs
    qkv = b * h * 2 * length * dh * 2
    add("bd3lm_attention.fwd", f"B={b} L={length} K={k} H={h} Dh={dh}", 4 * b * h * pairs * dh,
        qkv * 2 + _cdiv(2 * length, c["BLOCK_M"]) * qkv, 0)
    add("bd3lm_attention.bwd (dq + dkdv)", f"B={b} L={length} K={k} H={h} Dh={dh}", 10 * b * h * pairs * dh,
        4 * qkv * _cdiv(2 * length, 64), 0)
    return rows


def write(out_dir: Path, reports: list[ConfigReport], bounds: list[dict]) -> None:
    import triton

    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"target": "sm_90 (H100/H200), bf16 inputs, fp32 accumulation", "triton": triton.__version__,
            "shared_limit_bytes": SMEM_LIMIT, "configs": [{**asdict(r), "ok": r.ok} for r in reports],
            "roofline_h200": {"peak_tflops_bf16": H200_FLOPS / 1e12, "peak_tb_per_s": H200_BYTES / 1e12,
                              "kernels": bounds}}
    (out_dir / "triton_compile_report.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Triton kernels compiled for sm_90 (no GPU needed)", "",
             f"`python -m tests.kernels.compile_report` (triton {triton.__version__}); bf16 inputs, fp32 accumulation. "
             f"Shared memory limit per block: {SMEM_LIMIT} B. Blocks/SM by registers = 65,536 / (registers x threads).", "",
             "| kernel | variant | config | warps | stages | registers | spill st/ld (B) | shared (B) | blocks/SM (regs) | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.kernel} | {r.variant} | {r.config} | {r.num_warps} | {r.num_stages} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared_bytes} | {r.max_blocks_by_registers} | "
                     f"{'yes' if r.ok else 'NO'} |")
    lines += ["", "## Roofline estimate on one H200 (989 TFLOP/s bf16 dense, 4.8 TB/s)", "",
              "Matmul FLOPs; bytes = what the programs load and store with the first config's tiles (an upper bound "
              "of DRAM traffic: L2 hits not modelled; atomics counted as 8 B read-modify-write each).", "",
              "| kernel | shape | GFLOP | GB | atomics (M) | FLOP/B | compute ms | memory ms | bound |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in bounds:
        lines.append(f"| {b['kernel']} | {b['shape']} | {b['gflop']:.0f} | {b['gbytes']:.2f} | {b['atomics_millions']:.0f} | "
                     f"{b['intensity_flop_per_byte']:.0f} | {b['compute_ms']:.2f} | {b['memory_ms']:.2f} | {b['bound']} |")
    (out_dir / "triton_compile_report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(REPO / "bench_results"))
    args = parser.parse_args()
    reports = compile_all()
    write(Path(args.out_dir), reports, roofline())
    bad = check(reports)
    print(Path(args.out_dir, "triton_compile_report.md").read_text())
    if bad:
        raise SystemExit("configs that spill or exceed shared memory:\n" + "\n".join(bad))


if __name__ == "__main__":
    main()
