"""metrics.jsonl across restarts: a resumed run reads as one uninterrupted run, without duplicates."""

from __future__ import annotations

import json

from tide_ds.trainer.metrics import MetricsWriter


def _write(tmp_path, start_step: int, records: list[tuple[int, str]]) -> None:
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, start_step=start_step)
    for step, kind in records:
        writer.write(step, kind, {"loss": float(step)})
    writer.close()


def _steps(tmp_path) -> list[tuple[int, str]]:
    return [(r["step"], r["kind"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]


def test_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    _write(tmp_path, 0, [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train")])
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "kind": "tr')  # a line cut by the crash
    _write(tmp_path, 2, [(3, "train"), (4, "train")])  # resumed from the step-2 checkpoint
    assert _steps(tmp_path) == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train")]


def test_restart_before_the_first_checkpoint_logs_step_zero_once(tmp_path):
    _write(tmp_path, 0, [(0, "eval"), (1, "train")])  # killed before any checkpoint
    _write(tmp_path, 0, [(0, "eval"), (1, "train"), (2, "train")])  # started again from scratch
    assert _steps(tmp_path) == [(0, "eval"), (1, "train"), (2, "train")]


def test_disabled_writer_touches_nothing(tmp_path):
    MetricsWriter(tmp_path, enabled=False, tensorboard=False, start_step=0).write(0, "eval", {"nll": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
