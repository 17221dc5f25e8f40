"""The instruct world is keyed by ``world.seed``, not by the student's ``train.seed``; ``data.dataset`` skips it."""

from __future__ import annotations

from pathlib import Path

import pytest

import tide_ds.worlds
import tide_ds.worlds.instruct
from tide_ds.config import build_config
from tide_ds.worlds import prepare_world
from tide_ds.worlds.instruct import InstructWorld


@pytest.fixture
def calls(monkeypatch, tmp_path):
    seen = []

    def fake_prepare(**kwargs):
        seen.append(kwargs)
        return InstructWorld(dataset=tmp_path / "ds", teacher=tmp_path / "t", teacher_tokenizer=tmp_path / "tok",
                             teacher_heldout_nll=1.0, key="k")

    monkeypatch.setattr(tide_ds.worlds.instruct, "prepare_instruct_world", fake_prepare)
    monkeypatch.setattr(tide_ds.worlds, "build_tokenizer", lambda cfg: (Path("tok"), None))
    return seen


def test_student_seed_does_not_rebuild_the_world(calls, tmp_path):
    for seed in ("1", "2"):
        cfg, _ = prepare_world(build_config(overrides=[f"--train.seed={seed}"]))
        assert cfg.train.seed == int(seed)
    assert calls[0]["seed"] == calls[1]["seed"] == 42  # the default world.seed: the cached worlds' key
    cfg, world = prepare_world(build_config(overrides=["--train.seed=1", "--world.seed=7"]))
    assert calls[2]["seed"] == 7
    assert cfg.data.dataset == str(tmp_path / "ds") and cfg.teacher.path == str(tmp_path / "t")
    assert world is not None and world.key == "k"


def test_old_option_names_still_reach_the_world(calls):
    with pytest.warns(FutureWarning, match=r"data.demo_seed .* is deprecated; use world.seed"):
        cfg = build_config(overrides=["--data.demo_seed=9", "--data.max_files=5"])
    prepare_world(cfg)
    assert calls[0]["seed"] == 9 and calls[0]["max_files"] == 5


def test_a_named_dataset_builds_no_world(calls, tmp_path):
    cfg = build_config(overrides=[f"--data.dataset={tmp_path}", f"--teacher.path={tmp_path}"])
    assert prepare_world(cfg) == (cfg, None)
    assert calls == []


def test_a_run_config_written_before_the_worlds_still_loads(tmp_path):
    from tide_ds.sampling.load import run_config_of

    (tmp_path / "config.yaml").write_text(
        "data:\n  dataset: demo\n  max_files: 40\n  demo_seed: 3\n  seq_len: 64\ndiffusion:\n  block_size: 16\n"
    )
    with pytest.warns(FutureWarning, match="deprecated"):
        cfg = run_config_of(tmp_path)
    assert cfg.data.dataset == "" and cfg.data.seq_len == 64
    assert (cfg.world.name, cfg.world.max_files, cfg.world.seed) == ("instruct", 40, 3)
