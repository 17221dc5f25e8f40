"""Items 2 and 4 of issue 16: checkpoints verify themselves; a full disk stops the run with the last one intact.

Two real ranks (gloo, DeepSpeed ZeRO-2) write checkpoints 1 and 2; each test case corrupts one kind of file
of checkpoint 2 (on one rank's files or on all) and a fresh pair of engines resumes: both ranks must skip
checkpoint 2, name it and the file, and load checkpoint 1's weights.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tide_ds.trainer import checkpoint, manifest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
S2 = "step_00000002"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(*args: str) -> list[str]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "ckpt_worker.py"), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink()
    return outputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ckpt")
    _two_ranks("save", str(out))
    return out, [json.loads((out / f"save.{r}.json").read_text()) for r in range(2)]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _files(ckpt: Path, pattern: str) -> list[Path]:
    found = sorted(ckpt.glob(pattern))
    assert found, (pattern, sorted(p.name for p in ckpt.iterdir()))
    return found


CASES = {  # name: (how to corrupt checkpoint 2, the words rank 0's / rank 1's report must contain)
    "trainer_state_emptied": (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json has 0 bytes"),
    "model_state_truncated": (lambda c: [_truncate(p) for p in _files(c, "mp_rank_*_model_states.pt")],
                              "model_states.pt has"),
    "optimizer_truncated_on_rank_1": (lambda c: _truncate(_files(c, "*zero_pp_rank_1_*optim_states.pt")[0]),
                                      "zero_pp_rank_1_mp_rank_00_optim_states.pt has"),
    "optimizer_truncated_on_all": (lambda c: [_truncate(p) for p in _files(c, "*zero_pp_rank_*optim_states.pt")],
                                   "optim_states.pt has"),
    "manifest_unreadable": (lambda c: (c / manifest.MANIFEST).write_text("{"), "manifest.json is unreadable"),
    "config_flipped_byte": (lambda c: (c / "config.yaml").write_text((c / "config.yaml").read_text().replace("2", "3")),
                            "config.yaml does not match its SHA-256"),
}


@pytest.mark.slow
def test_corrupt_checkpoints_are_skipped_on_every_rank(saved, tmp_path: Path, capfd) -> None:
    out, save = saved
    runs = {}
    for name, (corrupt, _) in CASES.items():
        run = tmp_path / name
        shutil.copytree(out / "run", run)
        corrupt(run / "checkpoints" / S2)
        runs[name] = run
    none_left = tmp_path / "none_left"
    shutil.copytree(out / "run", none_left)
    for c in ("step_00000001", S2):
        (none_left / "checkpoints" / c / "trainer_state.json").write_text("")
    legacy = tmp_path / "legacy"  # both written before manifests: the newest is loaded, unchecked, with a warning
    shutil.copytree(out / "run", legacy)
    for c in ("step_00000001", S2):
        (legacy / "checkpoints" / c / manifest.MANIFEST).unlink()
    healthy = tmp_path / "healthy"
    shutil.copytree(out / "run", healthy)
    load_out = tmp_path / "load"
    load_out.mkdir()
    outputs = _two_ranks("load", str(load_out), str(healthy), *map(str, runs.values()), str(none_left), str(legacy))
    loads = [json.loads((load_out / f"load.{r}.json").read_text()) for r in range(2)]
    warning = f"resuming from {legacy / 'checkpoints' / S2}: written before manifests; not verified"
    assert sum(o.count(warning) for o in outputs) == 1, [o[-2000:] for o in outputs]  # once, by rank 0
    assert not any("written before manifests" in o.replace(warning, "") for o in outputs)
    for rank in range(2):
        assert loads[rank][str(healthy)]["step"] == 2
        assert loads[rank][str(healthy)]["weights"] == save[rank]["weights_2"]
        assert loads[rank][str(legacy)]["step"] == 2 and loads[rank][str(legacy)]["loaded_from"].endswith(S2)
        assert loads[rank][str(legacy)]["weights"] == save[rank]["weights_2"]
        for name, run in runs.items():
            got = loads[rank][str(run)]
            assert got["step"] == 1, (name, rank, got)  # the previous complete checkpoint, on both ranks
            assert got["loaded_from"].endswith("step_00000001")
            assert got["weights"] == save[rank]["weights_1"], (name, rank)
        error = loads[rank][str(none_left)]["error"]
        assert "no checkpoint in" in error and "passed verification on every rank" in error
        assert "step_00000001: trainer_state.json has 0 bytes" in error


@pytest.mark.slow
def test_the_skipped_checkpoint_and_its_file_are_named(saved, tmp_path: Path) -> None:
    """Rank-local check: the reason a rank gives for skipping checkpoint 2, per corruption."""
    out, _ = saved
    for name, (corrupt, words) in CASES.items():
        run = tmp_path / name
        shutil.copytree(out / "run", run)
        corrupt(run / "checkpoints" / S2)
        reports = [manifest.problems(run / "checkpoints" / S2, rank=r, world_size=2) for r in range(2)]
        if name == "optimizer_truncated_on_rank_1":  # only rank 1 reads that file
            assert reports[0] == [] and any(words in p for p in reports[1]), reports
        else:
            assert all(any(words in p for p in rep) for rep in reports), (name, reports)
        assert manifest.problems(run / "checkpoints" / "step_00000001", rank=0, world_size=2) == []


@pytest.mark.slow
def test_full_disk_stops_before_writing_with_the_previous_checkpoint_intact(saved) -> None:
    out, save = saved
    errors = [s["space_error"] for s in save]
    assert errors[0] == errors[1]  # the same decision on every rank
    root = out / "run" / "checkpoints"
    assert errors[0].startswith(f"[Errno {errno.ENOSPC}] not enough disk space for checkpoint step_00000003 in {root}")
    size = manifest.total_bytes(root / S2)
    assert "free 0.0 MiB" in errors[0] and f"the previous checkpoint {root / S2} is intact" in errors[0]
    assert f"needed {size * 1.05 / 2**20:.1f} MiB" in errors[0]
    assert not (root / "step_00000003").exists() and not (root / ".staging" / "step_00000003").exists()
    assert (root / "latest").read_text() == S2
    assert manifest.problems(root / S2, rank=0, world_size=2) == []


def test_write_errors_name_the_path_and_the_cause(tmp_path: Path, monkeypatch) -> None:
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.pt"))
    assert checkpoint._describe_write_error(err, tmp_path) == f"No space left on device [ENOSPC] at {tmp_path / 'x.pt'}"
    # torch reports a full disk without errno: the free space says what happened
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 4096)
    text = checkpoint._describe_write_error(RuntimeError("basic_ios::clear: iostream error"), tmp_path)
    assert text == (f"RuntimeError: basic_ios::clear: iostream error (No space left on device: 0.0 MiB free on the "
                    f"file system of {tmp_path})")
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 2**40)
    assert checkpoint._describe_write_error(RuntimeError("boom"), tmp_path) == "RuntimeError: boom"


def test_space_estimate_before_the_first_checkpoint(tmp_path: Path) -> None:
    import torch

    class Engine:
        module = torch.nn.Linear(10, 10)  # 110 parameters

    needed, basis = checkpoint.space_needed(Engine(), tmp_path)
    assert needed == 110 * checkpoint.ESTIMATE_BYTES_PER_PARAM and basis == "110 parameters x 16 bytes"


@pytest.mark.slow
def test_readers_of_a_run_skip_a_corrupt_checkpoint(saved, tmp_path: Path) -> None:
    """generate / eval / export resolve a run directory to its newest checkpoint that verifies."""
    from tide_ds.sampling.load import resolve_checkpoint

    out, _ = saved
    run = tmp_path / "run"
    shutil.copytree(out / "run", run)
    assert resolve_checkpoint(run) == ("deepspeed", run / "checkpoints" / S2)
    _truncate(_files(run / "checkpoints" / S2, "*zero_pp_rank_1_*optim_states.pt")[0])  # a reader reads every file
    assert resolve_checkpoint(run) == ("deepspeed", run / "checkpoints" / "step_00000001")
    (run / "checkpoints" / "step_00000001" / manifest.MANIFEST).unlink()  # a legacy checkpoint: read, unchecked
    assert resolve_checkpoint(run) == ("deepspeed", run / "checkpoints" / "step_00000001")
    (run / "checkpoints" / "step_00000001" / "trainer_state.json").write_text("")  # no manifest and damaged: skipped
    with pytest.raises(ValueError, match=r"no checkpoint passes its manifest check: step_00000002: "
                                         r"zero_pp_rank_1_mp_rank_00_optim_states.pt has .*; step_00000001: no manifest"):
        resolve_checkpoint(run)


def test_manifest_cli(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"step": 1}')
    (ckpt / "model.pt").write_bytes(b"x" * 100)
    assert manifest._main(["check", str(ckpt)]) == 1
    assert "no manifest.json" in capsys.readouterr().out
    assert manifest._main(["write", str(ckpt)]) == 0
    assert f"{ckpt}: manifest of 2 files, 111 bytes" in capsys.readouterr().out
    assert manifest._main(["check", str(ckpt)]) == 0
    (ckpt / "model.pt").write_bytes(b"x" * 99)
    assert manifest._main(["check", str(ckpt)]) == 1
    assert "model.pt has 99 bytes, the manifest says 100" in capsys.readouterr().out


def _fake_checkpoint(root: Path, step: int, *, with_manifest: bool) -> Path:
    ckpt = root / "checkpoints" / checkpoint.tag_for(step)
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "data": {}}))
    (ckpt / "config.yaml").write_text("train:\n  max_steps: 2\n")
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(bytes(range(200)))
    if with_manifest:
        manifest.write(ckpt)
    return ckpt


def test_a_checkpoint_from_before_manifests_is_read_with_one_warning(tmp_path: Path, caplog) -> None:
    """Item (a) of the merge: a complete legacy checkpoint (no manifest.json) is not lost; one that has a
    manifest and fails it is skipped for the previous one, legacy or not."""
    legacy = _fake_checkpoint(tmp_path, 1, with_manifest=False)
    assert manifest.is_legacy(legacy) and manifest.problems(legacy) == []
    with caplog.at_level("WARNING", logger="tide_ds.trainer.checkpoint"):
        assert checkpoint.latest_verified_checkpoint(tmp_path) == (legacy, {})
    assert [r.getMessage() for r in caplog.records] == [
        f"loading checkpoint {legacy}: written before manifests; not verified"]
    caplog.clear()

    newer = _fake_checkpoint(tmp_path, 2, with_manifest=True)
    with caplog.at_level("WARNING", logger="tide_ds.trainer.checkpoint"):
        assert checkpoint.latest_verified_checkpoint(tmp_path) == (newer, {})
    assert caplog.records == []  # a verified checkpoint: no word
    _truncate(newer / "mp_rank_00_model_states.pt")
    with caplog.at_level("WARNING", logger="tide_ds.trainer.checkpoint"):
        found, skipped = checkpoint.latest_verified_checkpoint(tmp_path)
    assert found == legacy and list(skipped) == [newer.name]
    assert skipped[newer.name] == ["mp_rank_00_model_states.pt has 100 bytes, the manifest says 200 (truncated or rewritten)"]
    assert [r.getMessage() for r in caplog.records][-1] == (
        f"loading checkpoint {legacy}: written before manifests; not verified")
    assert manifest._main(["check", str(legacy)]) == 0

    (legacy / "trainer_state.json").write_text("")  # no manifest and a damaged state: not complete, skipped
    assert not manifest.is_legacy(legacy)
    assert manifest.problems(legacy) == ["no manifest.json, and its trainer_state.json or config.yaml is missing or "
                                         "unreadable (an incomplete or damaged checkpoint)"]
    assert checkpoint.latest_verified_checkpoint(tmp_path)[0] is None


def test_a_legacy_checkpoint_is_agreed_on_in_one_process(tmp_path: Path, caplog) -> None:
    """agree_on_checkpoint (the resume path) without a process group: a failing newest checkpoint is skipped
    for a legacy one, which is named once as unverified."""
    legacy = _fake_checkpoint(tmp_path, 1, with_manifest=False)
    newer = _fake_checkpoint(tmp_path, 2, with_manifest=True)
    (newer / "config.yaml").write_text("train:\n  max_steps: 3\n")
    with caplog.at_level("WARNING", logger="tide_ds.trainer.checkpoint"):
        assert checkpoint.agree_on_checkpoint(newer) == legacy
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1] == f"resuming from {legacy}: written before manifests; not verified"
    assert sum("written before manifests" in m for m in messages) == 1
    assert any(f"checkpoint {newer} fails its check on rank 0: config.yaml does not match its SHA-256" in m
               for m in messages)
