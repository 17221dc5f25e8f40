"""Read a safetensors checkpoint straight into the storage where each parameter will live.

A load is planned from the headers alone (:func:`plan_copies`): every checkpoint tensor becomes one or
more :class:`Copy` records, "elements ``[src, src + count)`` of checkpoint tensor ``key`` are elements
``[dst, dst + count)`` of native tensor ``name``" (both flattened in C order). The family's
:class:`~tide_ds.models.adapter_glue.LoadPlan` decides them: its ``convert`` runs on ``meta`` tensors (a
rename keeps the tensor, a split of a fused QKV weight is a view of it, found again by its storage offset),
and its ``slab`` map places per-expert weights inside the stacked expert tensors. Keys, shapes and
coverage are checked before a byte is read.

:func:`fill` then reads each range with ``os.preadv``: straight into the parameter's own bytes when the
dtype matches and the parameter is in host memory, else through one reusable buffer of
:data:`READ_BUFFER_BYTES`, converted chunk by chunk. Nothing is memory-mapped, so no file page is ever
counted in the rank's resident set, and no full tensor is ever held twice. A ZeRO-3 partition is a
window of the flattened parameter: a rank reads only the bytes of its own window.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tide_ds.errors import ConfigError
from tide_ds.models.adapter_glue import LoadPlan
from tide_ds.models.hf_weights import TensorLocation

#: Size of the one host buffer a load reads through when it cannot read into the parameter itself (a dtype
#: conversion, or a parameter on an accelerator).
READ_BUFFER_BYTES = 64 * 2**20
#: Largest single read straight into a parameter (Linux returns at most ~2 GiB per call).
_MAX_READ = 2**30


@dataclass(frozen=True)
class Copy:
    """Elements ``[src, src + count)`` of checkpoint tensor ``key`` -> elements ``[dst, dst + count)`` of ``name``."""

    key: str
    name: str
    src: int
    dst: int
    count: int


@dataclass(frozen=True)
class Target:
    """Where native tensor elements ``[start, start + flat.numel())`` live: ``flat`` is 1-D and contiguous.

    A replica's parameter is its own flat view (``start = 0``); a ZeRO-3 partition is ``param.ds_tensor`` at
    ``start = rank * partition size``.
    """

    flat: torch.Tensor
    start: int = 0


def _region(key: str, name: str, path, view: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(view.shape) != tuple(shape):
        raise ValueError(
            f"{path}: {key} has shape {tuple(shape)}, the model expects {tuple(view.shape)} for {what}; "
            "config.json and the weights disagree"
        )
    assert view.is_contiguous(), f"{name}: a loading route must be a contiguous region"


def plan_copies(
    plan: LoadPlan, locations: dict[str, TensorLocation], shapes: dict[str, tuple[int, ...]], *, expected: Iterable[str]
) -> list[Copy]:
    """The copies that load ``locations`` into native tensors of ``shapes``; every ``expected`` one covered once.

    Raises ``ValueError`` naming the checkpoint key for an unexpected tensor, a shape that disagrees with
    config.json, or an expected tensor the checkpoint does not (fully) hold. Reads no tensor data.
    """
    from tide_ds.teacher.load import checkpoint_groups

    copies: list[Copy] = []
    skip = {plan.tied_head[1]} if plan.tied_head is not None else set()
    cls = plan.native_class.__name__

    def target(name: str, where: str) -> torch.Tensor:
        if name not in shapes:
            raise ValueError(f"{plan.path}: unexpected tensor {where} for {cls}")
        return torch.empty(shapes[name], device="meta")

    for group in checkpoint_groups([k for k in locations if k not in skip]):
        rest: dict[str, torch.Tensor] = {}
        for key in group:
            loc = locations[key]
            slab = plan.slab(key) if plan.slab is not None else None
            if slab is None:
                rest[key] = torch.empty(loc.shape, dtype=loc.dtype, device="meta")
                continue
            name, index = slab
            view = target(name, key)[index]
            _region(key, name, plan.path, view, loc.shape, f"{name}{list(index)}")
            copies.append(Copy(key, name, 0, view.storage_offset(), loc.numel))
        native, source = plan.convert(rest)  # meta in, meta out: renames keep tensors, splits are views
        keys_by_id = {id(t): k for k, t in rest.items()}
        for name, t in native.items():
            if t.numel() == 0:
                continue
            base = t if id(t) in keys_by_id else t._base
            assert base is not None and id(base) in keys_by_id, f"{name} is built, not read: give the plan a slab map"
            key = keys_by_id[id(base)]
            _region(source.get(name, key), name, plan.path, target(name, source.get(name, key)), tuple(t.shape), name)
            copies.append(Copy(key, name, t.storage_offset(), 0, t.numel()))
    filled: dict[str, int] = {}
    for c in copies:
        filled[c.name] = filled.get(c.name, 0) + c.count
    incomplete = sorted(n for n in expected if filled.get(n, 0) != torch.Size(shapes[n]).numel())
    if incomplete:
        detail = ", ".join(f"{n} ({filled.get(n, 0)} of {torch.Size(shapes[n]).numel()} elements)" for n in incomplete[:4])
        raise ValueError(
            f"{plan.path}: {len(incomplete)} tensor(s) missing or incomplete in the checkpoint, e.g. {detail}; "
            "the checkpoint does not match its config.json"
        )
    return sorted(copies, key=lambda c: (str(locations[c.key].file), locations[c.key].offset + c.src))


class Reader:
    """Positional reads from checkpoint files through at most one :data:`READ_BUFFER_BYTES` host buffer."""

    def __init__(self, *, buffer_bytes: int = READ_BUFFER_BYTES) -> None:
        self.buffer_bytes = buffer_bytes
        self._buffer: torch.Tensor | None = None
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffer = None

    def _fd(self, loc: TensorLocation) -> int:
        key = str(loc.file)
        if key not in self._fds:
            self._fds[key] = os.open(key, os.O_RDONLY)
        return self._fds[key]

    def _pread(self, loc: TensorLocation, into: memoryview, offset: int) -> None:
        fd, done = self._fd(loc), 0
        while done < len(into):
            n = os.preadv(fd, [into[done:]], offset + done)
            if n <= 0:
                raise ConfigError(
                    f"{loc.file} ends at byte {offset + done}, inside a tensor its header places up to "
                    f"{offset + len(into)}; the file is truncated: fetch or save it again"
                )
            done += n
        self.bytes_read += done

    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8)
        return self._buffer

    def read(self, loc: TensorLocation, src: int, dst: torch.Tensor) -> None:
        """Elements ``[src, src + dst.numel())`` of the tensor at ``loc`` into the 1-D contiguous ``dst``."""
        size = loc.dtype.itemsize
        offset = loc.offset + src * size
        if dst.dtype == loc.dtype and dst.device.type == "cpu":
            raw = memoryview(dst.view(torch.uint8).numpy())  # the parameter's own bytes
            for i in range(0, len(raw), _MAX_READ):
                self._pread(loc, raw[i : i + _MAX_READ], offset + i)
            return
        buf = self.buffer()
        per = self.buffer_bytes // size
        raw = memoryview(buf.numpy())
        for i in range(0, dst.numel(), per):
            m = min(per, dst.numel() - i)
            self._pread(loc, raw[: m * size], offset + i * size)
            dst[i : i + m].copy_(buf[: m * size].view(loc.dtype))

    def same(self, a: TensorLocation, b: TensorLocation) -> bool:
        """Whether two stored tensors hold the same bytes (read in chunks through the buffer)."""
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        half = self.buffer_bytes // 2
        raw = memoryview(self.buffer().numpy())
        total = a.numel * a.dtype.itemsize
        for i in range(0, total, half):
            m = min(half, total - i)
            self._pread(a, raw[:m], a.offset + i)
            self._pread(b, raw[half : half + m], b.offset + i)
            if raw[:m] != raw[half : half + m]:
                return False
        return True


def fill(copies: list[Copy], locations: dict[str, TensorLocation], targets: dict[str, Target], *, reader: Reader) -> None:
    """Run ``copies`` into ``targets``; a target that is a window (ZeRO-3 partition) gets only its own elements."""
    for c in copies:
        t = targets[c.name]
        lo, hi = max(c.dst, t.start), min(c.dst + c.count, t.start + t.flat.numel())
        if lo < hi:
            reader.read(locations[c.key], c.src + lo - c.dst, t.flat[lo - t.start : hi - t.start])
