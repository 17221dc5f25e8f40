"""Metrics: the window of training statistics between log lines, and the rank-0 sinks (a JSONL file and
TensorBoard scalars, truncated consistently on resume)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tide_ds import dist
from tide_ds.trainer.divergence import finite_or_none
from tide_ds.utils.files import atomic_write_text

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events under the run directory (rank 0 only).

    On resume from step ``start_step`` the JSONL keeps only records up to that step and TensorBoard
    purges later events, so a resumed run reads as one uninterrupted run. A start from step 0 (a run that
    stopped before its first checkpoint, started again) keeps nothing: its step-0 evaluation is written
    again, and keeping the old one would log step 0 twice.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self._truncate(start_step)
        self._fh = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _truncate(self, start_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if start_step > 0 and record.get("step", 0) <= start_step:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = finite_or_none({"step": step, "kind": kind, "time": round(time.time(), 3), **values})
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: NaN/inf as null + "nonfinite"
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


class MetricsWindow:
    """The training statistics of the steps since the last train record: summed on the device, read once.

    :meth:`add` sums a step's device-side statistics (no host synchronisation); :meth:`record` is the one
    host synchronisation of the loop per log interval: one all-reduce (a collective: every rank calls it
    at the same steps) and one read, giving each statistic's mean over the window's steps and all ranks,
    plus the throughput of the window. It then starts a new window.
    """

    def __init__(self, *, device: torch.device, world_size: int, tokens_per_step: int) -> None:
        self.device = device
        self.world_size = world_size
        self.tokens_per_step = tokens_per_step
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0) + value

    def record(self) -> dict[str, float]:
        """``{statistic: mean over steps and ranks, tokens_per_s, step_time_s}``; starts a new window."""
        names = sorted(self.sums)
        packed = torch.stack([torch.as_tensor(self.sums[k], device=self.device).double() for k in names])
        dist.all_reduce_sum(packed)
        elapsed = time.perf_counter() - self.start
        record = {k: v / (self.steps * self.world_size) for k, v in zip(names, packed.tolist())}
        record["tokens_per_s"] = self.tokens_per_step * self.steps / elapsed
        record["step_time_s"] = elapsed / self.steps
        self._reset()
        return record
