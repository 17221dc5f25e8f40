"""After training, end to end: checkpoints of real 2-rank runs (ZeRO-2 and ZeRO-3) are exported, sampled
and evaluated by the documented commands (``tide_ds.export``, ``tide_ds.generate``, ``tide_ds.eval``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tide_ds.eval.sandbox import STATUSES
from tide_ds.models.qwen3 import BD3LMStudent, load_student

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("train_runs_worker.py")
pytestmark = pytest.mark.slow
sys.path.insert(0, str(WORKER.parent))
from train_runs_worker import probe_batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    assert proc.returncode == 0
    return out


def bd3lm_logits(model, block_size: int = 16) -> torch.Tensor:
    x_t, x_0 = probe_batch(model.config.vocab_size, model.config.mask_token_id, block_size)
    with torch.no_grad():
        return model.lm_head(BD3LMStudent(model, block_size=block_size)(x_t, x_0)).float()


@pytest.fixture(scope="module")
def zero3_export(runs, tmp_path_factory):
    """The documented command on the ZeRO-3 run, into two shards."""
    from tide_ds.export import main as export_main

    out = tmp_path_factory.mktemp("zero3-export") / "hf"
    assert export_main([str(runs / "zero3"), "--out", str(out), "--max-shard-size", "8MB"]) == 0
    return out


@pytest.fixture(scope="module")
def zero2_loaded(runs):
    from tide_ds.sampling.load import load_checkpoint_model
    from tide_ds.trainer.checkpoint import latest_checkpoint

    return load_checkpoint_model(latest_checkpoint(runs / "zero2"), dtype=None)


def test_export_of_a_zero3_checkpoint_reproduces_the_engine_logits(runs, zero3_export):
    import transformers

    out = zero3_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["is_causal"] is False and config["mask_token_id"] == 151669 and config["tie_word_embeddings"] is True
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and "lm_head.weight" not in index["weight_map"]
    assert "model.layers.1.self_attn.q_norm.weight" in index["weight_map"]
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (151936, 32)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["mask_token"] == "<|mask|>"
    record = json.loads((out / "tide_ds_export.json").read_text())
    assert record["step"] == 2 and record["block_size"] == 16 and record["dtype"] == "float32"
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # no staging directory left

    engine = torch.load(runs / "zero3" / "engine_logits.pt")
    student = load_student(out).eval()
    assert torch.equal(bd3lm_logits(student), engine)
    auto = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(auto) is transformers.Qwen3ForCausalLM and auto.lm_head.weight is auto.model.embed_tokens.weight
    assert torch.equal(bd3lm_logits(auto), engine)


def test_export_of_a_zero2_checkpoint_holds_the_engine_weights(runs, zero2_loaded, tmp_path, monkeypatch, capsys):
    from tide_ds import export

    # the consolidation itself is what the documented command runs; reuse its result for the file handling
    monkeypatch.setattr(export, "load_checkpoint_model", lambda ckpt, dtype: zero2_loaded)
    out = export.export_checkpoint(runs / "zero2", tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    ckpt = runs / "zero2" / "checkpoints" / "step_00000002"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    exported = load_student(out).state_dict()
    for key, value in module.items():
        assert torch.equal(exported[key.removeprefix("student.hf.")], value), key
    assert len(module) == len(exported)  # lm_head.weight: the tied embedding on both sides

    # an existing directory is refused; a failure half-way leaves it as it was and no staging behind
    (out / "keep.txt").write_text("mine")
    assert export.main([str(runs / "zero2"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr("tide_ds.models.qwen3.save_student", broken)
        with pytest.raises(OSError, match="disk full"):
            export.export_checkpoint(runs / "zero2", out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "keep.txt").is_file()
    assert export.main([str(runs / "zero2"), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_generate_from_run_checkpoint_and_export_gives_the_same_tokens(runs, zero3_export, capsys):
    from tide_ds.generate import main as generate_main
    from tide_ds.sampling.load import resolve_checkpoint

    ckpt = runs / "zero3" / "checkpoints" / "step_00000002"
    assert resolve_checkpoint(runs / "zero3") == ("deepspeed", ckpt) == resolve_checkpoint(ckpt)
    assert resolve_checkpoint(zero3_export) == ("hf", zero3_export)
    with pytest.raises(ValueError, match="neither a run directory"):
        resolve_checkpoint(runs / "zero3" / "checkpoints")
    outputs = []
    for source in (runs / "zero3", zero3_export):
        argv = ["--checkpoint", str(source), "--prompt", "def add(a, b):", "--prompt", "import os",
                "--max-new-tokens", "24", "--steps", "24", "--template", "raw", "--json"]
        assert generate_main(argv) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["prompt"] for line in lines] == ["def add(a, b):", "import os"]
        assert all(0 < line["tokens"] <= 24 for line in lines)
        outputs.append([line["completion"] for line in lines])
    assert outputs[0] == outputs[1]


def test_eval_runs_humaneval_mbpp_and_nll_end_to_end(runs, tmp_path, capsys):
    from tide_ds.eval.__main__ import main as eval_main

    out = tmp_path / "results.json"
    argv = ["--checkpoint", str(runs / "zero2"), "--tasks", "humaneval,mbpp,nll", "--limit", "2",
            "--max-new-tokens", "16", "--out", str(out)]
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "humaneval  2" in printed and "mbpp       2" in printed and "nll (ELBO/token)" in printed
    results = json.loads(out.read_text())
    assert results["step"] == 2 and results["limit"] == 2
    for task in ("humaneval", "mbpp"):
        r = results["tasks"][task]
        assert r["n"] == 2 and r["pass@1"] == sum(s["pass@1"] for s in r["samples"]) / 2
        assert r["sampler"] == {"max_new_tokens": 16, "steps": 16, "block_size": 16, "steps_per_block": 16,
                                "temperature": 0.0, "remasking": "low_confidence"}
        for sample in r["samples"]:
            assert sample["status"] in STATUSES and "answer" in sample and sample["tokens"] <= 16
    nll = results["tasks"]["nll"]
    assert nll["samples"] == 2 and 0 < nll["masked_ce"] < 20 and nll["nll"] > 0 and nll["tokens"] > 0
