"""Export a trained student as a Hugging Face directory.

    python -m tide_ds.export RUN_DIR|CHECKPOINT_DIR --out HF_DIR [--dtype auto|float32|bfloat16] [--overwrite]

The ZeRO-2 or ZeRO-3 checkpoint is consolidated (DeepSpeed's ``zero_to_fp32``: the fp32 master weights,
merged from every rank's partition) and written as:

* ``model.safetensors`` (or shards of ``--max-shard-size`` with ``model.safetensors.index.json``) under the
  real Qwen3 key names, without ``lm_head.weight`` when the head is tied to the embedding;
* ``config.json``: ``model_type`` ``qwen3``, ``architectures`` ``["Qwen3ForCausalLM"]``, ``is_causal``
  false, ``mask_token_id``;
* the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) with the ``<|mask|>`` mask token;
* ``tide_ds_export.json`` (source checkpoint, step, BD3LM block size, dtype, weight file hashes) and
  ``tide_ds_run_config.yaml`` (the run's config).

``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`` and ``tide_ds.models.qwen3.load_student``
load it; sample from it with ``python -m tide_ds.generate --checkpoint HF_DIR``. ``--dtype auto`` writes
the weights in the dtype the engine computed in (bf16 runs: the engine's own bf16 copies of the master
weights; CPU runs: fp32). The directory is written aside and published with one rename; an existing
directory is refused unless ``--overwrite``. Before publishing, the written directory is loaded back
and must give the same logits as the consolidated model.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from tide_ds.sampling.load import (
    EXPORT_RECORD,
    EXPORT_RUN_CONFIG,
    load_checkpoint_model,
    parse_dtype,
    resolve_checkpoint,
)
from tide_ds.utils.files import publish_dir, sha256_file, staging_dir

__all__ = ["export_checkpoint", "main"]

logger = logging.getLogger("tide_ds.export")  # not __name__: "__main__" under python -m


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"4096"`` (bytes) -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size={text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")


def _probe_logits(model, block_size: int) -> torch.Tensor:
    """BD3LM logits of a fixed probe batch (the check that the written files hold these weights)."""
    from tide_ds.models.qwen3 import BD3LMStudent

    g = torch.Generator().manual_seed(0)
    x_0 = torch.randint(0, model.config.vocab_size, (2, 2 * block_size), generator=g).to(model.device)
    x_t = x_0.clone()
    x_t[:, ::3] = model.config.mask_token_id
    with torch.no_grad():
        return model.lm_head(BD3LMStudent(model, block_size=block_size)(x_t, x_0))


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    """Consolidate a run's (or one checkpoint's) student into the Hugging Face directory ``out``.

    Returns the published directory. Raises ``FileExistsError`` when ``out`` exists and not ``overwrite``.
    """
    from tide_ds.models.qwen3 import load_student, save_student

    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; choose another directory or pass --overwrite to replace it")
    kind, ckpt = resolve_checkpoint(checkpoint)
    if kind == "hf":
        raise ValueError(f"{ckpt} is already a Hugging Face directory; export takes a run or checkpoint directory")
    loaded, trained_in = load_checkpoint_model(ckpt, dtype=None if dtype == "auto" else parse_dtype(dtype))
    model = loaded.model
    model.config.dtype = model.dtype
    staged = staging_dir(out)
    try:
        save_student(model, staged, max_shard_bytes=max_shard_bytes)
        loaded.tokenizer.save_pretrained(str(staged))
        shutil.copyfile(ckpt / "config.yaml", staged / EXPORT_RUN_CONFIG)
        weights = sorted(p.name for p in staged.glob("*.safetensors"))
        record = {
            "source": str(ckpt.absolute()),
            "step": loaded.step,
            "block_size": loaded.block_size,
            "dtype": str(model.dtype).removeprefix("torch."),
            "engine_dtype": str(trained_in).removeprefix("torch."),
            "mask_token_id": loaded.special.mask_id,
            "sha256": {name: sha256_file(staged / name) for name in weights},
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        for path in staged.iterdir():
            path.chmod(0o644)  # readable like any published model (the weight writer leaves its temp files 0600)
        reloaded = load_student(staged, attn_implementation="sdpa", dtype=model.dtype).eval()
        if not torch.equal(_probe_logits(reloaded, loaded.block_size), _probe_logits(model, loaded.block_size)):
            raise RuntimeError(f"the written directory {staged} does not reproduce the checkpoint's logits; not published")
        if not publish_dir(staged, out, replace=overwrite):
            raise FileExistsError(f"--out {out} was created by someone else meanwhile; nothing was replaced")
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    logger.info("exported %s (step %s, %s) to %s: %s", ckpt, loaded.step, record["dtype"], out, ", ".join(weights))
    return out


def main(argv: list[str] | None = None) -> int:
    from tide_ds.log import setup_cli_logging

    parser = argparse.ArgumentParser(prog="python -m tide_ds.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run directory (newest complete checkpoint) or one checkpoint directory")
    parser.add_argument("--out", required=True, help="Hugging Face directory to create")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights dtype (auto: the dtype the engine computed in)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    setup_cli_logging()
    try:
        out = export_checkpoint(
            args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite,
            max_shard_bytes=parse_size(args.max_shard_size),
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"tide-ds export: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
