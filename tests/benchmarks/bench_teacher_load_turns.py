"""Two CPU ranks of one node load the teacher: all at once, in turns, and as ZeRO-3 partitions.

    flock /tmp/tide-heavy.lock python tests/benchmarks/bench_teacher_load_turns.py \
        [--out bench_results/teacher_load_turns.json]

The checkpoint has the LLaDA2 key layout (per-expert weights, fused QKV, first layer dense; hidden 512,
64 experts, vocabulary 65,536, two layers) with every data byte written (not sparse), so that reads reach
the disk. Before each case the files are dropped from the page cache (``posix_fadvise(DONTNEED)``). Each
rank (gloo, ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` set as a launcher does) reports its peak RSS increase over
its resident set after imports and plan (``VmHWM`` after a reset), the bytes it asked the files for
(``rchar``), the bytes its reads fetched from the disk (``read_bytes`` of ``/proc/self/io``; a page another
rank already brought into the page cache costs nothing) and the time its load took. Per node: the summed
peaks, rchar and read_bytes, and the wall time from the first start to the last end.

* ``replicate``, ``teacher.load_concurrency=0``: both ranks read at once;
* ``replicate``, ``teacher.load_concurrency=1``: rank 1 waits for rank 0;
* ``zero3``: each rank reads only its own half (partitions), at once; and again on the real-width LLaDA2
  checkpoint of ``bench_teacher_load_host.py`` (sparse: dense layer 0 + one 256-expert MoE layer,
  vocabulary 157,184), where a rank's peak is compared with its 1.4 GiB partition.

Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plan"))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
from bench_teacher_load_host import print_table, write_record  # noqa: E402

CASES = (("replicate", 0), ("replicate", 1), ("zero3", 0))


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def worker(ckpt: str, placement: str, concurrency: str, out: str) -> None:
    import deepspeed
    import torch

    from tide_ds import dist
    from tide_ds.models.teachers import get_family
    from tide_ds.teacher.load import current_rss_bytes, load_partitioned, peak_rss_bytes, peak_rss_reset
    from tide_ds.teacher.loading import load_replica, teacher_footprint
    from tide_ds.teacher.placement import teacher_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    plan = get_family("llada2_moe").plan(ckpt)
    fp = teacher_footprint(plan, dtype=torch.bfloat16)
    ds = teacher_ds_config(placement, hidden_size=fp.hidden, bf16=True, largest_unit_params=fp.largest_unit_params)
    dist.barrier()
    baseline, io0 = current_rss_bytes(), _io()
    peak_rss_reset()
    start = time.time()
    if placement == "replicate":
        model = load_replica(plan, attn_implementation="sdpa", dtype=torch.bfloat16, device=torch.device("cpu"),
                             concurrency=int(concurrency))
    else:
        model = load_partitioned(plan, ds_config=ds, attn_implementation="sdpa", dtype=torch.bfloat16,
                                 concurrency=int(concurrency))
    end = time.time()
    io1 = _io()
    kept = sum(p.ds_tensor.numel() * 2 if hasattr(p, "ds_tensor") else p.numel() * p.element_size()
               for p in {id(p): p for p in model.parameters()}.values())
    record = {"rank": dist.rank(), "param_bytes": fp.param_bytes, "kept_bytes": kept, "baseline_rss": baseline,
              "peak_increase": peak_rss_bytes() - baseline, "rchar": io1["rchar"] - io0["rchar"],
              "read_bytes": io1["read_bytes"] - io0["read_bytes"], "start": start, "end": end}
    Path(out, f"rank{dist.rank()}.json").write_text(json.dumps(record))
    dist.barrier()


def build(root: Path) -> Path:
    from real_size_world import LLADA2_CONFIG, llada2_shapes, write_checkpoint, write_mask_token

    c = {**LLADA2_CONFIG, "hidden_size": 512, "vocab_size": 65536, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 1024, "num_experts": 64,
         "moe_intermediate_size": 256, "n_group": 4, "topk_group": 2, "pad_token_id": 0, "eos_token_id": 0}
    ckpt = write_checkpoint(root / "llada2", c, llada2_shapes(c), shards=2)
    write_mask_token(ckpt, 32000)
    block = bytes(range(1, 256)) * 4096
    for f in ckpt.glob("*.safetensors"):  # write every data byte: real blocks on disk, not holes
        with open(f, "r+b") as fh:
            header = 8 + int.from_bytes(fh.read(8), "little")
            size = f.stat().st_size
            fh.seek(header)
            for pos in range(header, size, len(block)):
                fh.write(block[: min(len(block), size - pos)])
            fh.flush()
            os.fsync(fh.fileno())
    return ckpt


def evict(ckpt: Path) -> None:
    for f in ckpt.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run_case(ckpt: Path, placement: str, concurrency: int, tmp: Path) -> dict:
    out = tmp / f"{placement}{concurrency}"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    evict(ckpt)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(ckpt), placement, str(concurrency),
                                       str(out)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{placement} concurrency={concurrency} failed:\n{err[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"placement": placement, "load_concurrency": concurrency, "param_bytes": ranks[0]["param_bytes"],
            "node_peak_increase": sum(r["peak_increase"] for r in ranks),
            "node_kept_bytes": sum(r["kept_bytes"] for r in ranks),
            "node_rchar": sum(r["rchar"] for r in ranks), "node_read_bytes": sum(r["read_bytes"] for r in ranks),
            "wall_s": max(r["end"] for r in ranks) - min(r["start"] for r in ranks), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "teacher_load_turns.json"))
    parser.add_argument("--worker", nargs=4)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(Path(tmp))
        rows = [run_case(ckpt, placement, c, Path(tmp)) for placement, c in CASES]
        from bench_teacher_load_host import build as build_real_width

        real = build_real_width(Path(tmp) / "real")["llada2_moe"]  # sparse: the partitions' memory, not the disk
        rows.append({**run_case(real, "zero3", 0, Path(tmp) / "real"), "checkpoint": "LLaDA2 real widths, sparse"})
    mib = 2**20
    print_table(rows, [("placement", 10, lambda r: r["placement"]),
                       ("concurrency", 11, lambda r: str(r["load_concurrency"])),
                       ("teacher MiB", 11, lambda r: f"{r['param_bytes'] / mib:.0f}"),
                       ("node peak +MiB", 14, lambda r: f"{r['node_peak_increase'] / mib:.0f}"),
                       ("node kept MiB", 13, lambda r: f"{r['node_kept_bytes'] / mib:.0f}"),
                       ("node rchar MiB", 14, lambda r: f"{r['node_rchar'] / mib:.0f}"),
                       ("node disk MiB", 13, lambda r: f"{r['node_read_bytes'] / mib:.0f}"),
                       ("wall s", 7, lambda r: f"{r['wall_s']:.2f}")])
    write_record(args.out, rows, measure="per rank: VmHWM - VmRSS after imports and plan, /proc/self/io deltas")

if __name__ == "__main__":
    main()
