"""The demo world is keyed by ``data.demo_seed``, not by the student's ``train.seed``."""

from __future__ import annotations

from pathlib import Path

import pytest

import tide_ds.demo
from tide_ds.config import build_config
from tide_ds.demo import DemoWorld
from tide_ds.trainer.build import prepare_demo_run


@pytest.fixture
def calls(monkeypatch, tmp_path):
    seen = []

    def fake_prepare_demo(**kwargs):
        seen.append(kwargs)
        return DemoWorld(dataset=tmp_path / "ds", teacher=tmp_path / "t", teacher_tokenizer=tmp_path / "tok",
                         teacher_heldout_nll=1.0, key="k")

    monkeypatch.setattr(tide_ds.demo, "prepare_demo", fake_prepare_demo)
    return seen


def test_student_seed_does_not_rebuild_the_world(calls):
    for seed in ("1", "2"):
        cfg, _ = prepare_demo_run(build_config(overrides=[f"--train.seed={seed}"]), Path("tok"))
        assert cfg.train.seed == int(seed)
    assert calls[0]["seed"] == calls[1]["seed"] == 42  # the default data.demo_seed: the cached worlds' key
    cfg, _ = prepare_demo_run(build_config(overrides=["--train.seed=1", "--data.demo_seed=7"]), Path("tok"))
    assert calls[2]["seed"] == 7
    assert cfg.data.dataset.endswith("ds")
