"""Issue 16 item 7: one pass of start checks, in the issue's order, each check once, the same function for
``launch/run.py``, the planner (``python -m tide_ds.plan``) and ``launch/slurm/submit.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from real_size_world import build_world  # noqa: E402

import tide_ds.trainer.engine as engine  # noqa: E402
from tide_ds import failfast  # noqa: E402
from tide_ds.plan import checks  # noqa: E402
from tide_ds.plan.__main__ import main as plan_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE_A = ROOT / "launch/recipes/paper_pipeline_a.yaml"
#: The issue's order: ds_config JSON and keys -> output directory -> dataset schema and split sizes -> teacher and
#: student files and headers -> tokenizer ids, student layout, teacher layout and mask id -> ids and teacher lengths.
ORDER = ["ds_config", "output_dir", "dataset", "checkpoint_files", "tokenizer", "student", "teacher", "dataset_ids"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("real_size"))


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []

    def record(module, attr, name):
        original = getattr(module, attr)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    record(engine, "load_ds_json", "ds_config")
    for attr, name in [("check_output_dir", "output_dir"), ("check_dataset", "dataset"),
                       ("check_checkpoint_dirs", "checkpoint_files"), ("check_tokenizer", "tokenizer"),
                       ("student_footprint", "student"), ("check_teacher", "teacher"),
                       ("check_dataset_ids", "dataset_ids")]:
        record(checks, attr, name)
    return seen


def _args(world, out: Path) -> list[str]:
    return [f"--model.path={world['student']}", "--model.tokenizer=qwen3", f"--teacher.path={world['llada2']}",
            f"--data.dataset={world['data_a']}", f"--train.output_dir={out}"]


def test_launch_planner_and_submit_run_the_same_pass_once_in_order(world, calls, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "8")
    spec = importlib.util.spec_from_file_location("tide_run", ROOT / "launch" / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    started = []
    monkeypatch.setattr(failfast, "install", lambda: None)
    monkeypatch.setattr(failfast, "run", lambda job, cfg, argv, **kw: started.append(cfg.train.max_steps))
    import tide_ds.trainer.loop as loop

    monkeypatch.setattr(loop, "shutdown", lambda: None)
    assert run_py.main(["--recipe", str(RECIPE_A), *_args(world, tmp_path / "run")]) == 0
    assert calls == ORDER and started, calls  # every check once, in order, then the job
    calls.clear()
    assert plan_main(["--recipe", str(RECIPE_A), "--world-size", "8", *_args(world, tmp_path / "run")]) == 0
    assert calls == ORDER, calls
    calls.clear()
    spec = importlib.util.spec_from_file_location("tide_submit", ROOT / "launch" / "slurm" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    submit.resolve_run(["--recipe", str(RECIPE_A), *_args(world, tmp_path / "run")], world_size=8)
    assert calls == ORDER, calls
    assert not (tmp_path / "run").exists()  # the checks create nothing


def test_a_world_is_checked_again_without_the_engine_json_and_output_dir(world, calls, tmp_path):
    from tide_ds.config import build_config

    cfg = build_config(recipe=RECIPE_A, overrides=_args(world, tmp_path / "run"))
    checks.validate_run(cfg, world_size=8, world_built=True)
    assert calls == ORDER[2:], calls


def test_an_early_check_stops_the_pass(world, calls, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine\n")  # not a tide-ds run: refused before the dataset is read
    assert plan_main(["--recipe", str(RECIPE_A), "--world-size", "8", *_args(world, tmp_path / "run")]) == 2
    assert calls == ORDER[:2], calls
    assert "is not a tide-ds run" in capsys.readouterr().err
