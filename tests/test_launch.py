"""launch/run.py: a user error is one line on every rank (exit 2); any other exception keeps its traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import tide_ds.trainer.loop as loop
import tide_ds.worlds as worlds
from tide_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("tide_run", ROOT / "launch" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(loop, "init_distributed", lambda *a, **kw: None)
    monkeypatch.setattr(module, "_prepare_run", lambda cfg: cfg)  # the weight-free checks: tests/trainer/test_start_checks.py
    monkeypatch.setattr(loop, "shutdown", lambda: None)
    monkeypatch.setattr(worlds, "prepare_world", lambda cfg: (cfg, None))
    return module


ARGS = ["--data.dataset=/d", "--distill.preset=none", "--train.progress_bar=false"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_config_error_is_one_line_on_every_rank(run_py, monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)

    def train(cfg):
        raise ConfigError("data.dataset='/d' is not an existing dataset directory")

    monkeypatch.setattr(loop, "train", train)
    assert run_py.main(ARGS) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"tide-ds: error (rank {rank}): data.dataset='/d' is not an existing dataset directory"


def test_config_error_in_the_arguments_names_the_rank(run_py, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert run_py.main(["--train.max_stpes=3"]) == 2
    assert "tide-ds: configuration error (rank 1): unknown option 'train.max_stpes'" in capsys.readouterr().err


def test_other_exceptions_keep_their_traceback(run_py, monkeypatch):
    def train(cfg):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(ValueError, match="an internal bug"):
        run_py.main(ARGS)


def test_checks_run_before_the_world_and_again_on_what_it_built(run_py, monkeypatch):
    """The weight-free checks come before any world work; a world's dataset is checked (and counted) after it."""
    import dataclasses

    seen = []

    def prepare_run(cfg):
        seen.append(("checks", cfg.data.dataset))
        return cfg

    def prepare_world(cfg):
        seen.append(("world", cfg.data.dataset))
        if cfg.data.dataset:
            return cfg, None
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="/built")), None

    monkeypatch.setattr(run_py, "_prepare_run", prepare_run)
    monkeypatch.setattr(worlds, "prepare_world", prepare_world)
    monkeypatch.setattr(loop, "train", lambda cfg: seen.append(("train", cfg.data.dataset)) or {"nll": 1.0})
    assert run_py.main(["--world.name=code", "--distill.preset=none", "--train.progress_bar=false"]) == 0
    assert seen == [("checks", ""), ("world", ""), ("checks", "/built"), ("train", "/built")]
    seen.clear()
    assert run_py.main(ARGS) == 0  # a named dataset: checked once, no world
    assert seen == [("checks", "/d"), ("world", "/d"), ("train", "/d")]
