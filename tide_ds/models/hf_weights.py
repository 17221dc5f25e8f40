"""Hugging Face safetensors checkpoints: save and load, single file or sharded with an index.

Layouts (the ones ``transformers`` reads and writes):

* single: ``<dir>/model.safetensors``
* sharded: ``<dir>/model-00001-of-0000N.safetensors`` ... plus ``<dir>/model.safetensors.index.json``
  holding ``{"metadata": {"total_size": <bytes>}, "weight_map": {key: shard file name}}``.

When both are present the index wins (as in ``transformers``). Key names are whatever the caller
passes; architecture-specific renaming lives with each model file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tide_ds.errors import ConfigError
from tide_ds.utils.files import atomic_path

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "check_checkpoint_files",
    "list_checkpoint_keys",
    "load_safetensors_checkpoint",
    "save_safetensors_checkpoint",
    "tensor_locations",
]

logger = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PREFIX = "model-"


def _shard_name(i: int, n: int) -> str:
    return f"{_SHARD_PREFIX}{i:05d}-of-{n:05d}.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _prepare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copies-or-views; tensors sharing storage are cloned (safetensors refuses them).

    Tied weights should be dropped by the caller (e.g. ``lm_head.weight``); otherwise they are saved twice.
    """
    out: dict[str, torch.Tensor] = {}
    storages: dict[tuple[str, int], int] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, expected a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        sid = (t.device.type, t.untyped_storage().data_ptr())
        storages[sid] = storages.get(sid, 0) + 1
        out[key] = t
    for key, t in out.items():
        if storages[(t.device.type, t.untyped_storage().data_ptr())] > 1:
            out[key] = t.clone()
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy, in key order: a new shard starts when the next tensor would overflow the current one."""
    if max_shard_bytes is None:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(t)
    return shards


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_safetensors_checkpoint(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state_dict`` to ``out_dir`` in the Hugging Face safetensors layout.

    Args:
        state_dict: key -> tensor (any device; copied to CPU). Must be non-empty.
        out_dir: directory, created if missing; other files in it (config.json, tokenizer) are kept.
        max_shard_bytes: ``None`` writes one ``model.safetensors``; otherwise tensors are packed in key
            order into shards of at most this many bytes (a single larger tensor gets its own shard) and an
            index is written. One shard is still written as ``model.safetensors`` with no index.
        metadata: string key/values stored in every file's header (``format: pt`` is always added).

    Every file is written under a temporary name and renamed into place; the index comes last, and weight
    files of an earlier save that the new layout does not use are removed afterwards, so a reader never
    sees an index pointing at missing shards.

    Returns:
        the weight file names written.
    """
    if not state_dict:
        raise ValueError(f"save_safetensors_checkpoint: empty state_dict for {out_dir}; nothing to save")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0 (or None for a single file)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _prepare(state_dict)
    header = {"format": "pt", **(metadata or {})}
    for k, v in header.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str to str; got {k!r}: {v!r}")

    shards = _plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [_shard_name(i + 1, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: tensors[k] for k in keys}
        _write_atomic(out / name, lambda p, part=part: save_file(part, str(p), metadata=header))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in sorted(keys)},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        _write_atomic(out / INDEX_NAME, lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    _remove_stale(out, keep=set(names) | ({INDEX_NAME} if len(shards) > 1 else set()))
    logger.info("saved %d tensors to %s in %d file(s)", len(tensors), out, len(names))
    return names


def _remove_stale(out: Path, *, keep: set[str]) -> None:
    for child in out.iterdir():
        stale = child.name == INDEX_NAME or child.name == SINGLE_NAME or (
            child.name.startswith(_SHARD_PREFIX) and child.name.endswith(".safetensors")
        )
        if stale and child.name not in keep and child.is_file():
            child.unlink()


def _read_index(path: Path) -> dict[str, str]:
    index_file = path / INDEX_NAME
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_file} is not a safetensors index (need a 'weight_map' object): {exc}") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has an empty or malformed 'weight_map'; re-save the checkpoint")
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
        raise FileNotFoundError(
            f"{index_file} refers to shard file(s) {missing[:3]} that do not exist in {path}; "
            "the checkpoint is incomplete: copy the missing shards or re-save it"
        )
    return weight_map


def _locate(path: str | os.PathLike) -> tuple[Path, dict[str, str] | None]:
    """(directory, weight_map or None for the single-file layout), with the errors a user can act on."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {p} does not exist (or is not a directory)")
    if (p / INDEX_NAME).is_file():
        return p, _read_index(p)
    if (p / SINGLE_NAME).is_file():
        return p, None
    raise FileNotFoundError(
        f"no weights in {p}: expected {SINGLE_NAME} or {INDEX_NAME} (safetensors; .bin checkpoints are not "
        "supported, convert them with save_safetensors_checkpoint)"
    )


def list_checkpoint_keys(path: str | os.PathLike) -> list[str]:
    """Sorted tensor names of the checkpoint in directory ``path``, read from headers only (no tensor data)."""
    p, weight_map = _locate(path)
    if weight_map is not None:
        return sorted(weight_map)
    with _open(p / SINGLE_NAME) as fh:
        return sorted(fh.keys())


def _unreadable(path: Path, err: BaseException) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (f"{path} ({size} bytes) is not a readable safetensors file: {type(err).__name__}: {err}; it is probably "
            "truncated or damaged (an interrupted download or copy): fetch or save it again")


@contextlib.contextmanager
def _open(path: Path):
    """``safe_open(path)``; a damaged file gives a ``ConfigError`` naming it instead of safetensors' own error."""
    try:
        fh = safe_open(str(path), framework="pt")
    except Exception as err:  # noqa: BLE001 -- SafetensorError, OSError: the message must name the file
        raise ConfigError(_unreadable(path, err)) from None
    with fh:
        yield fh


def check_checkpoint_files(path: str | os.PathLike) -> int:
    """Open the header of every safetensors file of the checkpoint (a truncated file fails here, named); the count."""
    p, weight_map = _locate(path)
    names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    for name in names:
        if not (p / name).is_file():
            raise ConfigError(f"{p / INDEX_NAME} names {name}, which does not exist in {p}")
        with _open(p / name):
            pass
    return len(names)


def _file_of(p: Path, weight_map: dict[str, str] | None) -> dict[str, list[str]]:
    """file name -> keys, for every tensor of the checkpoint."""
    if weight_map is None:
        with _open(p / SINGLE_NAME) as fh:
            return {SINGLE_NAME: sorted(fh.keys())}
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    return by_file


def load_safetensors_checkpoint(path: str | os.PathLike, *, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint in directory ``path`` (single or sharded layout), on CPU, dtypes as stored.

    ``keys`` restricts the read to those tensors (the others are never read from disk); ``None`` reads all.
    """
    p, weight_map = _locate(path)
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for name, names in sorted(_file_of(p, weight_map).items()):
        names = [k for k in names if wanted is None or k in wanted]
        if not names:
            continue
        with _open(p / name) as fh:
            present = set(fh.keys())
            absent = [k for k in names if k not in present]
            if absent:
                raise ValueError(
                    f"{p / INDEX_NAME} maps {absent[:3]} to {name}, but that file does not hold them; "
                    "the index and shards are from different saves: re-save the checkpoint"
                )
            for key in names:
                try:
                    out[key] = fh.get_tensor(key)
                except Exception as err:  # noqa: BLE001 -- a short or damaged file: name it
                    raise ConfigError(_unreadable(p / name, err)) from None
    if wanted is not None and len(out) != len(wanted):
        raise KeyError(f"{p}: no tensor(s) {sorted(wanted - set(out))[:3]} in the checkpoint")
    return dict(sorted(out.items()))


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's data lies: ``file`` bytes ``[offset, offset + numel * dtype.itemsize)``, C order."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_locations(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Every tensor of the checkpoint in directory ``path`` located in its file, from the headers alone."""
    p, weight_map = _locate(path)
    out: dict[str, TensorLocation] = {}
    for name in sorted(_file_of(p, weight_map)):
        with open(p / name, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ConfigError(f"{p / name}: tensor {key} has dtype {info['dtype']}, which tide-ds does not read")
            out[key] = TensorLocation(p / name, 8 + size + int(info["data_offsets"][0]), dtype, tuple(info["shape"]))
    return dict(sorted(out.items()))


def meta_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as a ``meta`` tensor (shape and dtype from the headers, no data read)."""
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensor_locations(path).items()}
