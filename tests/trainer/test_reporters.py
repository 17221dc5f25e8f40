"""``train.report_to``: option checks, and W&B offline logging of a real 2-rank run and its resume.

The offline run files are read back record by record (the ``.wandb`` transaction log: 32 KiB blocks of
length-prefixed chunks holding ``wandb_internal_pb2.Record`` protobufs) and their history must hold every
number of ``metrics.jsonl`` at the same step under ``<kind>/<name>``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tide_ds.config import build_config
from tide_ds.trainer.reporters import parse_report_to

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--data.dataset=stdlib", "--distill.preset=none", "--data.max_files=40", "--data.seq_len=64",
    "--diffusion.block_size=16", "--data.eval_samples=8", "--model.hidden_size=32", "--model.intermediate_size=64",
    "--model.head_dim=16", "--train.micro_batch_size=2", "--train.lr=1e-2", "--train.log_every=1",
    "--train.progress_bar=false", "--train.eval_every=2", "--train.save_every=2",
]


def test_report_to_is_checked():
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")
    assert parse_report_to(["jsonl", "jsonl"]) == ("jsonl",)
    assert build_config(overrides=["--train.report_to=jsonl,wandb"]).train.report_to == "jsonl,wandb"
    with pytest.raises(ValueError, match=r"unknown reporter\(s\) \['mlflow'\]"):
        build_config(overrides=["--train.report_to=tensorboard,mlflow"])


def read_wandb_log(path: Path) -> list:
    """Every Record of an offline ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last piece
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (2, 3):  # first / middle piece
            pending += chunk
    return records


def _complete_log(run_file: Path, timeout: float = 30.0) -> list:
    """The records once the file ends with its exit record (W&B's service writes after ``finish`` returns)."""
    deadline = time.time() + timeout
    while True:
        records = read_wandb_log(run_file)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.time() > deadline:
            return records
        time.sleep(0.2)


def _history(run_file: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for record in _complete_log(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out.setdefault(row["_step"], {}).update(row)
    return out


def _compare(out: Path, history: dict[int, dict]) -> int:
    checked = 0
    for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in r.items():
            if key in ("step", "kind", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            assert history[r["step"]][f"{r['kind']}/{key}"] == pytest.approx(value, rel=1e-12), (r["step"], key)
            checked += 1
    return checked


def test_wandb_reporter_in_process_resume_and_rank_gate(tmp_path, monkeypatch):
    """The trainer's hooks without DeepSpeed: MetricsWriter + with_reporters, a 'resume' at step 2, rank gate."""
    pytest.importorskip("wandb", reason="needs the wandb extra: pip install -e '.[wandb]'")
    from tide_ds.trainer.metrics import MetricsWriter
    from tide_ds.trainer.reporters import with_reporters

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    cfg = build_config(overrides=[f"--train.output_dir={out}", "--train.report_to=jsonl,wandb"])
    assert isinstance(with_reporters(MetricsWriter(out, enabled=False, tensorboard=False, start_step=0), cfg,
                                     enabled=False, start_step=0), MetricsWriter)  # ranks > 0: nothing opened
    assert not (out / "wandb").exists()

    def launch(start: int, stop: int) -> None:
        metrics = with_reporters(MetricsWriter(out, enabled=True, tensorboard=False, start_step=start), cfg,
                                 enabled=True, start_step=start)
        for step in range(start + 1 if start else 0, stop + 1):  # a resume continues after its checkpoint
            if step % 2 == 0:
                metrics.write(step, "eval", {"nll": 5.0 - step / 7, "masked_ce": 4.0 - step / 9})
            if step:
                metrics.write(step, "train", {"loss": 1.0 / step, "lr": 1e-3 * step, "tokens": 128 * step})
        metrics.close()

    launch(0, 3)  # a launch that logged step 3 and whose last checkpoint was step 2
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    time.sleep(1.1)  # W&B names offline run directories by the second: two launches in one second share one
    launch(2, 4)  # the resume: MetricsWriter keeps steps <= 2, W&B continues the same run
    assert json.loads((out / "wandb_run.json").read_text())["id"] == run_id
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in run_files] == [f"run-{run_id}.wandb"] * 2
    history: dict[int, dict] = {}
    for f in run_files:  # later launches win for a step logged twice (the resume's own record of step 3)
        for step, row in _history(f).items():
            history.setdefault(step, {}).update(row)
    assert _compare(out, history) == 3 * 2 + 4 * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", WANDB_MODE="offline", WANDB_SILENT="true",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tide_ds.cli", "train", "--num_gpus", "2", "--master_port", str(_free_port()), "--",
           f"--train.output_dir={out}", *TINY, "--train.report_to=jsonl,wandb", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
    return proc


@pytest.mark.slow
def test_wandb_offline_holds_the_metrics_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("wandb", reason="needs the wandb extra: pip install -e '.[wandb]'")
    out = tmp_path / "run"
    assert _train(out, "--train.max_steps=2").returncode == 0
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    assert not (out / "tensorboard").exists()  # report_to without tensorboard
    assert _train(out, "--train.max_steps=4", "--train.resume=auto").returncode == 0
    assert json.loads((out / "wandb_run.json").read_text())["id"] == run_id

    # rank 0 only: one offline run directory per launch, both for the same W&B run
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in run_files] == [f"run-{run_id}.wandb"] * 2, run_files
    config = [r.run.config for r in read_wandb_log(run_files[0]) if r.WhichOneof("record_type") == "run"][0]
    train_cfg = {u.key: json.loads(u.value_json) for u in config.update}["train"]
    assert train_cfg["max_steps"] == 2 and train_cfg["report_to"] == "jsonl,wandb"  # the resolved config

    history: dict[int, dict] = {}
    for f in run_files:
        for step, row in _history(f).items():
            history.setdefault(step, {}).update(row)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records} == {0, 1, 2, 3, 4}
    assert _compare(out, history) >= 5 * 3
    assert any("eval/nll" in row for row in history.values())
