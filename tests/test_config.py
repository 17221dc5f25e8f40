import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tide_ds.config import RunConfig, build_config, config_from_dict, option_table, parse_override
from tide_ds.errors import ConfigError
from tide_ds.trainer.engine import build_ds_config, lr_lambda

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo_and_valid():
    cfg = build_config()
    assert cfg.distill.preset == "tide_cross" and cfg.distill.objective.mode == "reverse_alm"
    assert cfg.data.dataset == "" and cfg.world.name == "instruct" and cfg.model.tokenizer == "qwen3" and not cfg.teacher.path
    assert cfg.data.seq_len % cfg.diffusion.block_size == 0


def test_recipe_then_overrides_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n  max_steps: 7\ndiffusion:\n  schedule: cosine\n")
    cfg = build_config(recipe=recipe, overrides=["--train.max_steps=9", "--train.overwrite=true", "--model.path=none"])
    assert cfg.train.lr == 1e-4 and cfg.train.max_steps == 9 and cfg.train.overwrite is True
    assert cfg.diffusion.schedule == "cosine"
    assert cfg.model.path == "none"  # str fields keep the literal text


def test_shipped_recipes_parse():
    for recipe in sorted((ROOT / "launch" / "recipes").glob("*.yaml")):
        build_config(recipe=recipe)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_stpes=3"], r"unknown option 'train.max_stpes'.*did you mean 'train.max_steps'"),
        (["--trian.max_steps=3"], r"unknown section 'trian'.*did you mean 'train'"),
        (["--train.max_steps=abc"], r"train.max_steps='abc' \(command line\) is not an int; expected an int"),
        (["--train.lr=fast"], r"train.lr='fast' .* expected a float"),
        (["--train.overwrite=maybe"], r"train.overwrite='maybe' .* expected true or false"),
        (["--data.seq_len=100"], r"data.seq_len=100 is not a multiple of diffusion.block_size=32"),
        (["--model.attn_implementation=flex"], r"'flex' is not one of .*did you mean 'flex_attention'"),
        (["--diffusion.time_epsilon=0"], r"diffusion.time_epsilon=0.0 must lie in \(0, 1\)"),
        (["--train.resume=yes"], r"train.resume='yes' is not one of \['auto', 'never'\]"),
        (["--train.resume=auto", "--train.overwrite=true"], r"contradict"),
        (["--model.num_heads=5"], r"model.num_heads=5 is not a multiple of model.num_kv_heads=2"),
        (["--distill.preset=tide"], r"distill.preset='tide' is not one of"),
        (["train.lr=1"], r"overrides are written --section.field=value"),
    ],
)
def test_config_errors_name_option_value_and_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=overrides)


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown field 'train.learning_rate' in recipe .*"):
        build_config(recipe=bad)
    with pytest.raises(ValueError, match=r"--recipe='missing.yaml' does not exist"):
        build_config(recipe="missing.yaml")
    with pytest.raises(ValueError, match="must be a mapping"):
        config_from_dict({"train": 3})


def test_parse_override_keeps_equals_in_value():
    assert parse_override("--train.output_dir=runs/a=b") == ("train", "output_dir", "runs/a=b")


def test_option_table_documents_every_field():
    table = option_table()
    assert "| `train.resume` | `'never'` |" in table
    for line in table.splitlines()[2:]:
        assert line.rstrip(" |").split("|")[-1].strip(), f"undocumented option: {line}"


def _write_ds(tmp_path, data):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_ds_config_takes_batch_and_optim_from_recipe(tmp_path):
    cfg = build_config(overrides=[f"--train.ds_config={ROOT / 'ds_configs/zero3.json'}", "--train.micro_batch_size=3",
                                  "--train.gradient_accumulation_steps=2", "--train.grad_clip=0.5"])
    ds = build_ds_config(cfg, world_size=4, has_accelerator=False)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False  # auto -> fp32 on the CPU
    assert build_ds_config(cfg, world_size=1, has_accelerator=True)["bf16"]["enabled"] is True


@pytest.mark.parametrize("key", ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler"])
def test_ds_config_conflict_names_both_sources(tmp_path, key):
    path = _write_ds(tmp_path, {"zero_optimization": {"stage": 2}, key: 8})
    cfg = build_config(overrides=[f"--train.ds_config={path}"])
    with pytest.raises(ValueError, match=rf"{path} sets '{key}'=8, but that value comes from the recipe \(train\."):
        build_ds_config(cfg, world_size=1)


def test_ds_config_missing_and_invalid(tmp_path):
    cfg = build_config(overrides=["--train.ds_config=nope.json"])
    with pytest.raises(ValueError, match="train.ds_config='nope.json' does not exist"):
        build_ds_config(cfg, world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ValueError, match="is not valid JSON"):
        build_ds_config(build_config(overrides=[f"--train.ds_config={bad}"]), world_size=1)


def test_lr_schedule_warmup_then_cosine():
    cfg = build_config(overrides=["--train.max_steps=100", "--train.warmup_ratio=0.1", "--train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_run_py_reports_config_errors_before_any_work():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "run.py"), "--local_rank=0", "--train.max_stpes=3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "did you mean 'train.max_steps'" in proc.stderr


def test_to_yaml_round_trip():
    cfg = build_config(overrides=["--train.lr=0.25"])
    import yaml

    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and isinstance(again, RunConfig)


def test_readme_option_table_is_current():
    assert option_table() in (ROOT / "README.md").read_text(), (
        "README's option table is stale: regenerate it with "
        "python tools/update_readme_options.py"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--distill.preset=tide_cross", "--data.dataset=/d"], r"teacher.path is empty; set --teacher.path"),
        (["--distill.preset=kl", "--distill.pipeline=A", "--teacher.path=/t"], r"defined for pipeline B only"),
        (["--distill.preset=calm", "--distill.pipeline=B", "--teacher.path=/t"], r"defined for pipeline A only"),
        (["--distill.preset=kl", "--distill.shared_vocab_size=0", "--teacher.path=/t"], r"distill.shared_vocab_size"),
        (["--teacher.concat_order=x0x1"], r"teacher.concat_order='x0x1' is not one of"),
        (["--distill.preset=calm", "--distill.comp_demo=maybe", "--teacher.path=/t"], r"distill.comp_demo='maybe' .*is not a bool"),
        (["--distill.mode=reverse_almm", "--teacher.path=/t"], r"reverse_alm"),
        (["--teacher.placement=zero"], r"teacher.placement='zero' is not one of .*did you mean 'zero3'"),
        (["--distill.demo_ratio=1.5"], r"distill.demo_ratio=1.5 must lie in \(0, 1\)"),
    ],
)
def test_distill_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(overrides=overrides)


def test_presets_resolve_to_typed_objectives():
    def spec(*args):
        return build_config(overrides=["--teacher.path=/t", *args]).distill.objective

    assert spec("--distill.preset=tide_cross", "--distill.pipeline=A").mode == "reverse_alm"
    assert spec("--distill.preset=calm").loss_terms == ("ce", "calm")
    shared = spec("--distill.preset=tide_shared", "--distill.pipeline=A")
    assert shared.mode == "alm_taid" and shared.comp_demo
    assert not spec("--distill.preset=tide_shared", "--distill.pipeline=A", "--distill.comp_demo=false").comp_demo
    assert spec("--distill.preset=calm", "--distill.mode=reverse_alm").mode == "reverse_alm"
    assert spec("--distill.preset=kl").mode == "kl_aligned"
    assert spec("--distill.preset=tide_cross", "--distill.pipeline=B").mode == "reverse_kl_aligned"
    shared_b = spec("--distill.preset=tide_shared", "--distill.pipeline=B")
    assert shared_b.mode == "taid_aligned" and shared_b.comp_demo and shared_b.pipeline.value == "B"
    assert spec("--distill.mode=taid+kl").loss_terms == ("ce", "tidal", "kl")


def test_relative_recipe_and_ds_config_work_from_any_directory(tmp_path, monkeypatch):
    from tide_ds.config import REPO_ROOT, load_recipe
    from tide_ds.trainer.engine import load_ds_json

    monkeypatch.chdir(tmp_path)
    assert load_recipe("launch/recipes/demo.yaml") == load_recipe(REPO_ROOT / "launch/recipes/demo.yaml")
    assert "zero_optimization" in load_ds_json("ds_configs/zero2.json")
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2.json").write_text('{"steps_per_print": 7}')
    assert load_ds_json("ds_configs/zero2.json") == {"steps_per_print": 7}  # the working directory's file wins
    with pytest.raises(ValueError, match=r"train.ds_config='nope.json' does not exist \(looked in .* and "):
        load_ds_json("nope.json")
    with pytest.raises(ValueError, match=r"--recipe='nope.yaml' does not exist \(looked in"):
        load_recipe("nope.yaml")


def test_comp_demo_is_an_optional_bool():
    def comp(*args):
        return build_config(overrides=["--teacher.path=/t", "--distill.preset=tide_shared", *args]).distill

    for empty in ("", "none", "null"):
        assert comp(f"--distill.comp_demo={empty}").comp_demo is None
    assert comp().objective.comp_demo is True  # None follows the preset: on for tide_shared
    assert comp("--distill.comp_demo=false").comp_demo is False and not comp("--distill.comp_demo=false").objective.comp_demo
    assert config_from_dict({"distill": {"comp_demo": True, "preset": "calm"}, "teacher": {"path": "/t"}}).distill.objective.comp_demo


def test_choices_are_the_field_types_and_validated_on_construction():
    from typing import get_args

    from tide_ds.config import ModelArgs, choices
    from tide_ds.errors import ConfigError

    hints = typing.get_type_hints(ModelArgs)
    assert choices(hints["attn_implementation"]) == get_args(hints["attn_implementation"]) == (
        "sdpa", "flex_attention", "eager", "tide_bd3lm")
    with pytest.raises(ConfigError, match=r"model.loss_implementation='tritn' is not one of .*did you mean 'triton'"):
        ModelArgs(loss_implementation="tritn")
    with pytest.raises(ConfigError, match=r"train.resume='always' is not one of \['auto', 'never'\]"):
        build_config(overrides=["--train.resume=always"])


def test_user_errors_are_config_errors_and_value_errors():
    from tide_ds.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config(overrides=["--train.max_steps=0"])
    assert isinstance(info.value, ValueError)


def test_objective_is_parsed_once_per_config():
    cfg = build_config(overrides=["--teacher.path=/t"])
    assert cfg.distill.objective is cfg.distill.objective
    assert "objective" not in cfg.to_dict()["distill"]


def test_help_text_is_field_metadata():
    import dataclasses

    from tide_ds.config import TrainArgs

    meta = {f.name: f.metadata.get("help") for f in dataclasses.fields(TrainArgs)}
    assert all(meta.values()), [k for k, v in meta.items() if not v]
    assert f"| `train.max_steps` | `100` | {meta['max_steps']} |" in option_table()


def test_training_size_options_are_checked():
    cfg = build_config(overrides=["--train.global_batch_size=64", "--train.epochs=2.5", "--train.dist_timeout_minutes=90"])
    assert (cfg.train.global_batch_size, cfg.train.epochs, cfg.train.dist_timeout_minutes) == (64, 2.5, 90.0)
    assert build_config().train.dist_timeout_minutes == 60.0  # longer than DeepSpeed's 10 minutes
    for bad, message in (("--train.global_batch_size=-8", r"train.global_batch_size=-8 must be >= 0"),
                         ("--train.epochs=-1", r"train.epochs=-1.0 must be >= 0"),
                         ("--train.dist_timeout_minutes=0", r"train.dist_timeout_minutes=0.0 must be > 0")):
        with pytest.raises(ConfigError, match=message):
            build_config(overrides=[bad])


def test_data_teacher_seq_len_checks_a_dataset_and_no_longer_sets_the_world():
    """data.teacher_seq_len is the check of a prebuilt dataset's teacher length (0 = not checked); the world's own
    length is world.teacher_seq_len. The old meaning (the demo's length) is refused with the fix, never guessed."""
    assert build_config().data.teacher_seq_len == 0 and build_config().world.teacher_seq_len == 256
    cfg = build_config(overrides=["--data.dataset=/some/dataset", "--teacher.path=/t", "--data.teacher_seq_len=1024"])
    assert cfg.data.teacher_seq_len == 1024 and cfg.world.teacher_seq_len == 256
    # a world: agreeing with what it builds is fine, anything else names the option to use
    assert build_config(overrides=["--data.teacher_seq_len=256"]).data.teacher_seq_len == 256
    with pytest.raises(ConfigError, match=r"data.teacher_seq_len=512 checks .* world.teacher_seq_len=256; .* "
                                          r"--world.teacher_seq_len=512"):
        build_config(overrides=["--data.teacher_seq_len=512"])
    with pytest.raises(ConfigError, match=r"world.name='code' builds no teacher columns"):
        build_config(overrides=["--world.name=code", "--distill.preset=none", "--data.teacher_seq_len=256"])
