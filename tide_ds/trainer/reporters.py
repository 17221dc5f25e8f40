"""Where training metrics go besides ``metrics.jsonl`` and TensorBoard: ``train.report_to``.

``train.report_to`` is a comma-separated list (or a YAML list) of ``tensorboard``, ``jsonl`` and ``wandb``;
the default ``tensorboard,jsonl`` is what the trainer always wrote. ``metrics.jsonl`` and TensorBoard stay
in :class:`tide_ds.trainer.metrics.MetricsWriter`; this module adds the optional Weights & Biases logger
(``pip install -e '.[wandb]'``) behind a three-call interface the training loop uses on rank 0 only:

* ``open(config, run_dir, resume_step)``: start (or continue) the run;
* ``log(record, step)``: one record as ``MetricsWriter.write`` gets it (``kind`` + values); numbers are
  logged as ``<kind>/<name>`` at ``step``, the same keys as the TensorBoard scalars;
* ``close()``.

W&B: the run config is the resolved config (``RunConfig.to_dict()``), the project ``train.wandb_project``
(default ``tide-ds``, or ``$WANDB_PROJECT``), the run name the run directory's name. The run id is kept in
``<run dir>/wandb_run.json``, written before the first log: a resumed run (or a restart in the same
directory) continues the same W&B run (``resume="allow"``); ``train.overwrite`` moves the directory aside
and with it the id, so a fresh start gets a fresh W&B run. Offline runs (``WANDB_MODE=offline``) write
under ``<run dir>/wandb`` and are uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tide_ds.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["REPORTERS", "ReportingMetrics", "WandbReporter", "build_reporters", "parse_report_to", "report_tensorboard", "with_reporters"]

REPORTERS = ("tensorboard", "jsonl", "wandb")
RUN_ID_FILE = "wandb_run.json"


def parse_report_to(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` or ``["tensorboard", "wandb"]`` -> ``("tensorboard", "wandb")``; checked."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(v).strip().lower() for v in items if str(v).strip()))
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(
            f"train.report_to={value!r}: unknown reporter(s) {unknown}; use a comma-separated list of {', '.join(REPORTERS)}"
        )
    if "wandb" in names and importlib.util.find_spec("wandb") is None:  # checked on every rank, before any work
        raise ConfigError(f"train.report_to={value!r} includes wandb but wandb is not installed; "
                         "pip install -e '.[wandb]' or drop wandb from train.report_to")
    return names


class WandbReporter:
    """Weights & Biases logging of the trainer's records (rank 0)."""

    def __init__(self, *, project: str | None = None) -> None:
        self.project = project
        self.run = None
        self.run_id: str | None = None
        self._pending: dict[str, float] = {}
        self._pending_step: int | None = None

    def open(self, config, run_dir: str | Path, resume_step: int) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("train.report_to includes wandb but wandb is not installed; pip install -e '.[wandb]' "
                             "or drop wandb from train.report_to") from err
        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = json.loads(id_file.read_text())["id"]
            logger.info("wandb: continuing run %s (from %s, step %d)", self.run_id, id_file, resume_step)
        else:
            self.run_id = uuid.uuid4().hex[:16]
            tmp = id_file.with_name(f".{RUN_ID_FILE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"id": self.run_id}) + "\n")
            os.replace(tmp, id_file)
        self.run = wandb.init(
            project=self.project or os.environ.get("WANDB_PROJECT") or "tide-ds",
            name=run_dir.name, id=self.run_id, resume="allow", dir=str(run_dir),
            config=config.to_dict() if hasattr(config, "to_dict") else dict(config),
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        kind = record.get("kind", "train")
        values = {f"{kind}/{k}": v for k, v in record.items()
                  if k not in ("step", "kind", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._pending_step is not None and step != self._pending_step:
            self._flush()
        if values:
            # one W&B history row per step (eval and train records of a step together), committed explicitly
            self._pending_step = step
            self._pending.update(values)

    def _flush(self) -> None:
        if self._pending:
            self.run.log(self._pending, step=self._pending_step, commit=True)
        self._pending, self._pending_step = {}, None

    def close(self) -> None:
        if self.run is not None:
            self._flush()
            self.run.finish()
            self.run = None


def build_reporters(report_to: str | Sequence[str], *, project: str | None = None) -> list[WandbReporter]:
    """The reporters beyond MetricsWriter's own sinks (today: W&B when asked for)."""
    return [WandbReporter(project=project)] if "wandb" in parse_report_to(report_to) else []


def report_tensorboard(train_cfg) -> bool:
    """TensorBoard on: ``tensorboard`` in ``train.report_to`` and the deprecated ``train.tensorboard`` not false."""
    wanted = "tensorboard" in parse_report_to(train_cfg.report_to)
    if wanted and not train_cfg.tensorboard:
        logger.warning("train.tensorboard=false is deprecated: leave tensorboard out of train.report_to instead "
                       "(e.g. --train.report_to=jsonl); TensorBoard is off")
    return wanted and train_cfg.tensorboard


class ReportingMetrics:
    """A ``MetricsWriter`` whose records also go to the reporters (same ``write`` / ``close`` calls)."""

    def __init__(self, writer, reporters: list[WandbReporter]) -> None:
        self.writer = writer
        self.reporters = reporters

    def __getattr__(self, name: str):
        return getattr(self.writer, name)

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        self.writer.write(step, kind, values)
        for reporter in list(self.reporters):
            try:
                reporter.log({"kind": kind, **values}, step)
            except Exception as err:  # noqa: BLE001 - rank 0 only: raising would hang the other ranks
                logger.error("train.report_to: %s failed at step %d (%s: %s); dropped, metrics.jsonl keeps every "
                             "record", type(reporter).__name__, step, type(err).__name__, err)
                self.reporters.remove(reporter)

    def close(self) -> None:
        self.writer.close()
        for reporter in self.reporters:
            try:
                reporter.close()
            except Exception as err:  # noqa: BLE001
                logger.error("train.report_to: closing %s failed (%s: %s)", type(reporter).__name__, type(err).__name__, err)


def with_reporters(writer, cfg, *, enabled: bool, start_step: int):
    """``writer`` plus the reporters of ``cfg.train.report_to``, opened now (rank 0: ``enabled``)."""
    if not enabled:
        return writer
    reporters = build_reporters(cfg.train.report_to, project=cfg.train.wandb_project or None)
    if not reporters:
        return writer
    opened = []
    for reporter in reporters:
        # Rank 0 alone opens reporters: an exception here would leave the other ranks waiting in the next
        # collective, so a reporter that cannot start is reported and skipped (metrics.jsonl has every record).
        try:
            reporter.open(cfg, cfg.train.output_dir, start_step)
        except Exception as err:  # noqa: BLE001 - any failure of a third-party logger
            logger.error("train.report_to: %s could not start (%s: %s); continuing without it, every record is "
                         "still in metrics.jsonl", type(reporter).__name__, type(err).__name__, err)
            continue
        opened.append(reporter)
    return ReportingMetrics(writer, opened) if opened else writer
