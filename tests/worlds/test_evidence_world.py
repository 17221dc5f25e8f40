"""The evidence world (tide_ds/worlds/evidence.py): bits-per-byte arithmetic against hand values, and a tiny build
with the project's own tokenizers, preprocessing and teacher pretraining (a few files, a few steps)."""

from __future__ import annotations

import dataclasses
import json
import math

import datasets
import pytest

from tide_ds.data.tokenizers import load_tokenizer
from tide_ds.experiments import evidence, report
from tide_ds.models.qwen3 import load_student
from tide_ds.worlds.evidence import EvidenceSpec, bits_per_byte, build_evidence_world, response_bytes


def test_bits_per_byte_hand_values():
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)  # 8 bits over 8 bytes
    assert bits_per_byte(100.0, 50) == pytest.approx(100.0 / (math.log(2) * 50))  # 2.8854 bits per byte
    assert bits_per_byte(100.0, 50) == pytest.approx(2.885390, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        bits_per_byte(1.0, 0)


def test_student_bits_per_byte_in_the_report():
    """The report turns NLL per token into bits per byte with the world's held-out token and byte counts."""
    world = evidence.World("A", "/d", "/t", 3.0, student_vocab=10, teacher_bits_per_byte=1.0, heldout_tokens=300,
                           heldout_bytes=900)
    s = report.VariantSummary(variant="A/none", label="none", seeds=[1, 2], runs=[], values={1: 3.0, 2: 3.3},
                              mean=3.15, std=0.2)
    bpb = evidence.bits_per_byte_summary([s], {"A": world})
    # seed 1: 3.0 nats x 300 tokens / (ln 2 x 900 bytes) = 1.442695
    assert bpb["A/none"]["by_seed"]["1"] == pytest.approx(1.442695, abs=1e-6)
    assert bpb["A/none"]["mean"] == pytest.approx(3.15 * 300 / (math.log(2) * 900))
    refs = {"A@full": {"unigram_nll": 4.5}}  # the unigram of all training responses
    check = evidence.world_checks([s], {"A": world}, refs, bpb)["A"]
    assert check["student_minus_unigram"] == pytest.approx(-1.35) and check["student_beats_unigram_by_1_nat"]
    assert check["teacher_fewer_bits_fraction"] == pytest.approx(1 - 1.0 / bpb["A/none"]["mean"])
    assert check["teacher_25pct_better"]


TINY_A = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
TINY_B = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              head_dim=16, tie_word_embeddings=True)


def test_tiny_world_builds_with_two_tokenizers_both_settings_and_measured_teachers(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDE_DS_CACHE", str(tmp_path / "cache"))
    spec = EvidenceSpec(max_files=12, max_heldout=8, student_vocab=400, teacher_vocab=450, teacher_steps=3,
                        teacher_steps_b=3, source_windows=32, limited_fraction=0.25, eval_draws=1, teacher_config_a=TINY_A,
                        teacher_config_b=TINY_B, student_init_steps=2, student_init_batch=4)
    world = build_evidence_world(tmp_path / "worlds", spec)
    s_tok, t_tok = load_tokenizer(world.student_tokenizer), load_tokenizer(world.teacher_tokenizer)
    assert len(s_tok) != len(t_tok) and s_tok.tokenize("def f(self):") != t_tok.tokenize("def f(self):")
    full, limited = (datasets.load_from_disk(str(world.dataset("A", k))) for k in ("full", "limited"))
    assert len(limited["train"]) == round(len(full["train"]) * 0.25) == world.sizes["train_limited"]
    assert limited["heldout"]["input_ids"] == full["heldout"]["input_ids"]  # the same held-out responses
    assert set(limited["train"]["input_ids"][0:1][0]) <= set(range(world.student_vocab_size))
    # the teachers saw more text than any student: every training sample plus the source windows
    assert world.sizes["teacher_rows_a"] == world.sizes["train_full"] + 32
    for pipeline in "AB":
        t = world.teacher[pipeline]
        assert t["tokens"] > 0 and t["bytes"] > 0
        assert t["bits_per_byte"] == pytest.approx(t["heldout_nats"] / (math.log(2) * t["bytes"]))
        assert t["pretraining"]["steps"] == 3
    # the student's held-out units: maskable tokens and the bytes they spell
    units = world.heldout
    ids = [[x for x in lab if x >= 0] for lab in full["heldout"]["labels"]]
    assert units["tokens"] == sum(map(len, ids)) and units["bytes"] == response_bytes(s_tok, ids) > 0
    # the students' starting point: the recipe's student after 2 CE steps on the limited samples, exported
    init = world.student_init
    assert init["steps"] == 2 and init["samples"] == 8 and {"0", "2"} <= set(init["heldout_nll_by_step"])
    assert math.isfinite(init["heldout_nll"]) and init["heldout_nll"] == init["heldout_nll_by_step"]["2"]
    hf = load_student(world.student_init_path, attn_implementation="sdpa")
    assert hf.config.hidden_size == 96 and hf.config.vocab_size >= world.student_vocab_size  # launch/recipes/evidence.yaml
    assert json.loads((world.student_init_path / "tide_ds_export.json").read_text())["step"] == 2
    # cached: a second call reads the record, builds nothing
    again = build_evidence_world(tmp_path / "worlds", spec)
    assert again == world and json.loads((world.root / "world.json").read_text())["student_vocab_size"] > 400
    # another pipeline-B teacher: a new world that retrains B and reuses A's teacher file for file
    a_files = {f.name: f.stat().st_mtime_ns for f in world.teacher_a.iterdir()}
    longer_b = dataclasses.replace(spec, teacher_steps_b=4, student_init_steps=0)  # random students this time
    assert longer_b.teacher_key("A") == spec.teacher_key("A") and longer_b.teacher_key("B") != spec.teacher_key("B")
    other = build_evidence_world(tmp_path / "worlds", longer_b)
    assert other.root != world.root and other.teacher_a == world.teacher_a and other.teacher_b != world.teacher_b
    assert {f.name: f.stat().st_mtime_ns for f in other.teacher_a.iterdir()} == a_files
    assert other.teacher["B"]["pretraining"]["steps"] == 4 and other.teacher["A"]["pretraining"]["steps"] == 3
    assert other.teacher["A"]["bits_per_byte"] == pytest.approx(world.teacher["A"]["bits_per_byte"])
    assert other.student_init == {} and other.student_init_path is None


def test_teacher_keys_follow_only_what_decides_each_teacher():
    base = EvidenceSpec()
    for field, value, changes in [("teacher_steps", 1, "A"), ("teacher_steps_b", 1, "B"), ("eval_draws", 9, ""),
                                  ("teacher_lr", 1e-3, "AB"), ("student_vocab", 600, "AB"),
                                  ("student_init_steps", 5, ""), ("student_init_lr", 1e-3, "")]:
        other = dataclasses.replace(base, **{field: value})
        for pipeline in "AB":
            assert (other.teacher_key(pipeline) != base.teacher_key(pipeline)) == (pipeline in changes), (field, pipeline)
    assert base.teacher_key("A") != base.teacher_key("B")
    # the students' starting point is part of the world's key, not of the teachers'; the teachers are not part of its
    assert dataclasses.replace(base, student_init_steps=5).key() != base.key()
    assert dataclasses.replace(base, student_init_steps=5).student_init_key() != base.student_init_key()
    for field, value in [("teacher_steps", 1), ("teacher_steps_b", 1), ("teacher_lr", 1e-3), ("eval_draws", 9)]:
        assert dataclasses.replace(base, **{field: value}).student_init_key() == base.student_init_key(), field
    assert dataclasses.replace(base, limited_fraction=0.5).student_init_key() != base.student_init_key()
    with pytest.raises(ValueError, match="student_init_steps=-1"):
        EvidenceSpec(student_init_steps=-1)


def test_spec_refuses_one_tokenizer_for_pipeline_a():
    with pytest.raises(ValueError, match="two different tokenizers"):
        EvidenceSpec(student_vocab=500, teacher_vocab=500)
