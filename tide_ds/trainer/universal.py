"""Resume at a different world size through DeepSpeed's universal checkpoint.

A ZeRO checkpoint is partitioned by data-parallel rank (``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``
holds rank ``r``'s slice of the fp32 master weights and Adam moments), so it only loads into a run
with the same number of ranks and the same ZeRO stage; DeepSpeed itself refuses a different world
size with ``ZeRORuntimeException``. When ``--train.resume=auto`` finds that the checkpoint was written
by another number of ranks, :func:`load_resharded`:

1. converts the checkpoint once, on rank 0, with DeepSpeed's ``ds_to_universal`` into
   ``<checkpoint>/universal/`` (one folder per parameter holding the full ``fp32``, ``exp_avg``,
   ``exp_avg_sq`` and ``step`` tensors: independent of the world size). The conversion is written
   aside and moved into place with one rename, so a crash never leaves a half-converted folder that
   a later resume would trust; an existing ``universal/`` is reused.
2. loads it with DeepSpeed's universal loader (``checkpoint.load_universal``), every rank taking
   its new partition;
3. verifies the result against both the converted files and the original per-rank files: every
   parameter's fp32 master copy and both Adam moments, gathered from the engine, equal the converted
   files bit for bit; their totals (sum, sum of |x|, sum of x^2) equal those over the original ZeRO
   partitions; the module weights equal the fp32 copy and (ZeRO-1/2) the saved module state; every
   optimizer step counter equals the saved one. A mismatch raises before any step runs, so a resharded
   resume can fail loudly but never continue silently from a wrong state.

What does not carry over unchanged (by design): the noise of later steps is drawn per
(seed, step, rank), so with another rank layout the same step sees other masks; and a step's
global batch is ``micro_batch_size * gradient_accumulation_steps * world_size``, so keep that product
(e.g. double ``--train.gradient_accumulation_steps`` when halving the ranks) to keep the recipe's
batch size. The data position is global (``tide_ds.data.loader``): the new layout continues the same
sample stream at the same place, nothing dropped or repeated.

Where we deviate from the usual recipe (``python ds_to_universal.py`` by hand, then
``"checkpoint": {"load_universal": true}`` in the DeepSpeed JSON for exactly one restart): the
conversion is automatic, happens only when the layout changed, and the universal flag is raised on
the engine just for that one ``load_checkpoint`` call, so the JSON stays the same for every restart.
The checkpoints tide-ds writes carry no ``universal_checkpoint_info`` (plain data parallelism needs
none), so the converter runs with ``inject_missing_state``. A change of ZeRO stage is refused with a
message (:func:`layout_change`): DeepSpeed's universal loader cannot read across ZeRO stages.

Converting ahead of time (e.g. on a CPU node, so that a large job does not wait for it)::

    python -m tide_ds.trainer.universal convert runs/x/checkpoints/step_00001000
    python -m tide_ds.trainer.universal describe runs/x/checkpoints/step_00001000
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tide_ds import dist

logger = logging.getLogger(__name__)

UNIVERSAL_SUBDIR = "universal"
#: Adam state tensors a universal checkpoint holds per parameter (besides ``fp32``).
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def zero_partition_files(ckpt_dir: str | Path) -> list[Path]:
    """The per-rank ZeRO optimizer files of a DeepSpeed checkpoint (empty without ZeRO partitioning)."""
    ckpt_dir = Path(ckpt_dir)
    return sorted(p for p in ckpt_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def saved_layout(ckpt_dir: str | Path, trainer_state: dict[str, Any]) -> dict[str, int | None]:
    """World size and ZeRO stage the checkpoint was written with.

    ``trainer_state["world_size"]`` is written by the training loop; ``zero_stage`` by
    :func:`tide_ds.trainer.checkpoint.save_checkpoint` (None for checkpoints written before it did).
    Without a recorded world size, the number of ZeRO partition files stands in for it.
    """
    world = trainer_state.get("world_size")
    if world is None:
        files = zero_partition_files(ckpt_dir)
        world = len(files) if files else None
    return {"world_size": world, "zero_stage": trainer_state.get("zero_stage")}


def layout_change(saved: dict[str, int | None], *, world_size: int, zero_stage: int, ckpt_dir: str | Path = "") -> str | None:
    """What differs between the checkpoint and this run, as text (None: nothing), for a world-size change.

    A ZeRO stage change raises ``ValueError``: DeepSpeed's universal loader needs optimizer files of the stage
    it loads into (a ZeRO-2 checkpoint converted and loaded under ZeRO-3 fails with ``KeyError:
    'optimizer_state_dict'`` in DeepSpeed 0.19.8), so tide-ds refuses before building anything on it.
    """
    if saved["zero_stage"] is not None and saved["zero_stage"] != zero_stage:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written under ZeRO stage {saved['zero_stage']}, this run uses stage {zero_stage}: "
            "DeepSpeed's universal checkpoint does not load across ZeRO stages; resume with an engine config of stage "
            f"{saved['zero_stage']} (--train.ds_config=...; the number of ranks may change)"
        )
    if saved["world_size"] is not None and saved["world_size"] != world_size:
        return f"world size {saved['world_size']} -> {world_size}"
    return None


def convert_to_universal(ckpt_dir: str | Path, *, workers: int | None = None) -> Path:
    """Convert ``ckpt_dir`` into ``ckpt_dir/universal`` (once; one process, not a collective).

    Returns the universal folder. Raises ``ValueError`` for a checkpoint without ZeRO partition files
    (nothing to reshard: such a checkpoint loads at any world size as it is).
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / UNIVERSAL_SUBDIR
    if final.is_dir():
        logger.info("reusing the universal checkpoint %s", final)
        return final
    if not zero_partition_files(ckpt_dir):
        raise ValueError(
            f"checkpoint {ckpt_dir} has no ZeRO partition files (*zero_pp_rank_*_optim_states.pt); "
            "it is not partitioned by rank, so there is nothing to convert"
        )
    staging = ckpt_dir / f".{UNIVERSAL_SUBDIR}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    n = workers or max(1, min(4, os.cpu_count() or 1))
    # A fresh interpreter: the converter forks worker pools, which deadlock when forked from a rank
    # that already runs gloo/NCCL threads (seen here: the extraction pool never returned).
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir),
        "--output_folder", str(staging), "--num_extract_workers", str(n), "--num_merge_workers", str(max(1, n // 2)),
        "--inject_missing_state",
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        # the converter names its output in a `latest_universal` file beside it; tide-ds does not use it
        with contextlib.suppress(FileNotFoundError):
            (ckpt_dir / "latest_universal").unlink()
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and "%|" not in line:
            logger.debug("ds_to_universal: %s", line)
    if proc.returncode != 0 or not (staging / "zero" / "optimizer_state.pt").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"ds_to_universal failed on {ckpt_dir} (exit code {proc.returncode}):\n{tail}")
    os.replace(staging, final)
    logger.info("converted %s to a universal checkpoint in %.1fs", ckpt_dir, time.perf_counter() - t0)
    return final


@contextlib.contextmanager
def _universal_load_mode(engine):
    """Raise DeepSpeed's ``load_universal`` flag for one ``load_checkpoint`` call.

    DeepSpeed reads the flag only while loading (``engine.load_universal_checkpoint()``), so the engine is
    built from the unchanged JSON and behaves natively again afterwards (later saves are ordinary
    checkpoints of the new layout).
    """
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_resharded(engine, ckpt_dir: str | Path, *, reason: str) -> None:
    """Load ``ckpt_dir`` into ``engine`` whatever number of ranks wrote it (all ranks call this).

    Rank 0 converts (or reuses) the universal form; the outcome is broadcast so that a failed
    conversion raises on every rank instead of leaving the others waiting.
    """
    ckpt_dir = Path(ckpt_dir)
    logger.info("checkpoint %s has another layout (%s): resuming through a universal checkpoint", ckpt_dir, reason)
    outcome: tuple[str | None, str | None] = (None, None)
    if dist.rank() == 0:
        try:
            outcome = (str(convert_to_universal(ckpt_dir)), None)
        except Exception as err:  # noqa: BLE001 - any failure is reported on every rank below
            outcome = (None, f"{type(err).__name__}: {err}")
    outcome = dist.broadcast_object(outcome)
    path, error = outcome
    if error is not None:
        raise RuntimeError(f"could not convert {ckpt_dir} for a resume with {reason}: {error}")
    universal = Path(path)
    with _universal_load_mode(engine):
        loaded, _ = engine.load_checkpoint(
            str(ckpt_dir), tag=UNIVERSAL_SUBDIR, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {universal}")
    verify_against_universal(engine, ckpt_dir, universal)


def _read_universal(universal: Path, name: str, key: str) -> torch.Tensor:
    path = universal / "zero" / name / f"{key}.pt"
    if not path.is_file():
        raise RuntimeError(f"universal checkpoint {universal} has no {key} for parameter {name!r} ({path} missing)")
    data = torch.load(path, map_location="cpu", weights_only=False)
    return data["param"] if isinstance(data, dict) else data


def _full_module_param(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The whole low-precision parameter as the module sees it (gathered under ZeRO-3; collective there)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone().cpu()
    return param.detach().cpu()


#: Where the per-rank ZeRO optimizer files keep each kind of state (ZeRO-1/2 and ZeRO-3 layouts).
_SOURCE_KEYS = {"single_partition_of_fp32_groups": "fp32", "fp32_flat_groups": "fp32", "exp_avg": "exp_avg",
                "exp_avg_sq": "exp_avg_sq"}


def _stats(t: torch.Tensor) -> torch.Tensor:
    """sum, sum of |x|, sum of x^2 in float64: a checksum that does not depend on how a tensor is partitioned."""
    t = t.detach().to("cpu", torch.float64).flatten()
    return torch.stack([t.sum(), t.abs().sum(), t.square().sum()])


def source_checksums(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], set[float]]:
    """Checksums of fp32 weights and Adam moments over all ZeRO partition files, and the optimizer step counters.

    Alignment padding inside the flat partitions holds zeros (zero gradients keep zero moments), so the
    totals equal those over the parameters themselves.
    """
    totals = {kind: torch.zeros(3, dtype=torch.float64) for kind in ("fp32", *MOMENT_KEYS)}
    steps: set[float] = set()

    def walk(node, key=None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, key)
        elif torch.is_tensor(node) and key in _SOURCE_KEYS:
            totals[_SOURCE_KEYS[key]] += _stats(node)
        elif key == "step" and isinstance(node, (int, float, torch.Tensor)):
            steps.add(float(node))

    for path in zero_partition_files(ckpt_dir):
        walk(torch.load(path, map_location="cpu", weights_only=False).get("optimizer_state_dict", {}))
    return totals, steps


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float64 summation order (the same float32 values, added in another order)."""
    return bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12))


def verify_against_universal(engine, ckpt_dir: str | Path, universal: str | Path) -> int:
    """Check the loaded engine against the checkpoint; return the number of tensors compared.

    Two comparisons, so that neither the conversion nor the loading can go wrong unnoticed:

    * every parameter's full fp32 copy and Adam moments, gathered from the engine, equal the converted
      files bit for bit, and the module weights equal the fp32 copy (in the module's dtype);
    * the converted state is the saved one: totals (sum, sum |x|, sum x^2) of the engine's fp32 weights and
      moments equal those over the original per-rank ZeRO files, every optimizer step counter equals the
      saved one, and (ZeRO-1/2) the module weights equal the saved module state.

    Collective: every rank gathers every parameter in the same order; rank 0 compares and broadcasts the
    verdict, so every rank raises the same error.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ckpt_dir, universal = Path(ckpt_dir), Path(universal)
    problems: list[str] = []
    compared = 0
    engine_totals = {kind: torch.zeros(3, dtype=torch.float64) for kind in ("fp32", *MOMENT_KEYS)}
    saved_module = {}
    if dist.rank() == 0 and (ckpt_dir / "mp_rank_00_model_states.pt").is_file():  # ZeRO-1/2: the whole module
        saved_module = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        got = {"fp32": safe_get_full_fp32_param(param)}
        for key in MOMENT_KEYS:
            got[key] = safe_get_full_optimizer_state(param, key)
        module_value = _full_module_param(engine, param)
        if dist.rank() != 0:
            continue
        for key, value in got.items():
            if value is None:
                problems.append(f"{name}: the engine holds no {key}")
                continue
            want = _read_universal(universal, name, key)
            value = value.detach().float().cpu().reshape(want.shape)
            if not torch.equal(value, want.float()):
                diff = (value - want.float()).abs().max().item()
                problems.append(f"{name}: {key} differs from the converted checkpoint (max abs diff {diff:.3g})")
            engine_totals[key] += _stats(value)
            compared += 1
        fp32 = got["fp32"].detach().float().cpu().reshape(module_value.shape) if got["fp32"] is not None else None
        if fp32 is not None and not torch.equal(module_value, fp32.to(module_value.dtype)):
            problems.append(f"{name}: module weights differ from the fp32 master copy")
        if name in saved_module and not torch.equal(module_value, saved_module[name].to(module_value.dtype).reshape(module_value.shape)):
            problems.append(f"{name}: module weights differ from the saved module state")
        compared += 1
    if dist.rank() == 0:
        source, steps = source_checksums(ckpt_dir)
        for kind, total in engine_totals.items():
            if not _close(total, source[kind]):
                problems.append(
                    f"{kind}: totals (sum, sum|x|, sum x^2) {total.tolist()} differ from the saved checkpoint's "
                    f"{source[kind].tolist()}: the conversion did not reproduce it"
                )
        loaded_steps = {
            float(state["step"])
            for state in getattr(getattr(engine.optimizer, "optimizer", None), "state", {}).values()
            if isinstance(state, dict) and "step" in state
        }
        if steps and loaded_steps != steps:
            problems.append(f"optimizer step counters {sorted(loaded_steps)} != saved {sorted(steps)}")
    verdict = dist.broadcast_object((compared, problems[:10], len(problems)))
    compared, shown, total = verdict
    if total:
        raise RuntimeError(
            f"the resharded resume from {ckpt_dir} does not reproduce the saved state ({total} problem(s)); "
            "refusing to train from it:\n  " + "\n  ".join(shown)
        )
    logger.info("resharded resume verified: %d tensors equal to %s, totals equal to the saved ZeRO partitions", compared, universal)
    return compared


def describe(ckpt_dir: str | Path) -> dict[str, Any]:
    """Small summary of a checkpoint's layout (for logs and tools)."""
    ckpt_dir = Path(ckpt_dir)
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    return {
        **saved_layout(ckpt_dir, state),
        "step": state.get("step"),
        "zero_partitions": len(zero_partition_files(ckpt_dir)),
        "universal": (ckpt_dir / UNIVERSAL_SUBDIR).is_dir(),
    }


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tide_ds.trainer.universal", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("convert", "describe"))
    parser.add_argument("checkpoint", help="a checkpoint directory, e.g. runs/x/checkpoints/step_00001000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt = Path(args.checkpoint)
    if not (ckpt / "trainer_state.json").is_file():
        print(f"{ckpt} is not a complete tide-ds checkpoint (no trainer_state.json)", file=sys.stderr)
        return 2
    if args.command == "convert":
        try:
            print(convert_to_universal(ckpt))
        except (ValueError, RuntimeError) as err:
            print(err, file=sys.stderr)
            return 1
    else:
        print(json.dumps(describe(ckpt), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
