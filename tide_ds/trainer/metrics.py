"""Rank-0 metrics sinks: a JSONL file and TensorBoard scalars, truncated consistently on resume."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tide_ds.trainer.divergence import finite_or_none

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
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

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
