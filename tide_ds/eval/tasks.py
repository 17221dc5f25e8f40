"""The generation benchmarks of the paper's protocol (docs/method.md §13.2): prompts, answer extraction, scoring.

Prompts are those of lm-evaluation-harness's ``humaneval_instruct``, ``mbpp_instruct`` and ``gsm8k_cot``
tasks, zero-shot, in the student's chat template (:func:`tide_ds.sampling.text.chat_prompt`, which adds
the empty think block); the task's ``gen_prefix`` starts the assistant's answer. Decoding: 256 new
tokens, 256 steps (1 token per step with 8 blocks of 32), greedy, low-confidence remasking.

* **HumanEval**: the model completes the function after ``Here is the completed function:`` and the
  function's own prompt; the program is prompt + completion (up to a closing code fence) + the tests +
  ``check(entry_point)``, run in the sandbox; pass@1.
* **MBPP**: task text and its three asserts; the answer starts inside a python code block; the program is
  the answer up to the closing fence + the test setup code + the asserts; pass@1. (lm-eval's own extraction
  prepends a fence and matches ``````(?:\\w+)?``, which eats a leading ``def`` of an answer that starts right
  after the opening fence; we cut at the closing fence instead.)
* **GSM8K**: ``Q: ... A:`` chain of thought; exact match of the number after ``The answer is`` (strict)
  and of the last number in the answer (flexible), both normalised as lm-eval does (commas, ``$``, a
  trailing period removed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from tide_ds.eval.sandbox import SandboxLimits, run_program
from tide_ds.sampling.text import chat_prompt, cut_at_stops, strip_think

__all__ = ["TASKS", "Task", "gsm8k_extract", "humaneval_program", "mbpp_program"]

_FENCE = "```"


@dataclass(frozen=True)
class Task:
    """A generation benchmark.

    Attributes:
        name: the task's name (also its data source in :mod:`tide_ds.eval.fetch`).
        metric: the headline metric's name.
        prompt: problem -> the full chat-formatted prompt.
        stops: strings the decoded answer is cut at.
        score: (problem, answer, sandbox limits) -> a record with at least ``metric`` (0 or 1) and ``id``.
        max_new_tokens / steps: the protocol's decoding budget.
    """

    name: str
    metric: str
    prompt: Callable[[dict], str]
    stops: tuple[str, ...]
    score: Callable[[dict, str, SandboxLimits], dict]
    max_new_tokens: int = 256
    steps: int = 256


def clean_answer(text: str, stops: tuple[str, ...]) -> str:
    """Post-processing of every answer: think spans removed, cut at the first stop string."""
    return cut_at_stops(strip_think(text), stops)


def _code_until_fence(answer: str) -> str:
    end = answer.find(_FENCE)
    return answer if end < 0 else answer[:end]


# ------------------------------------------------------------------------------------------ HumanEval


def humaneval_prompt(problem: dict) -> str:
    user = "Write a solution to the following problem and make sure that it passes the tests:\n```" + problem["prompt"]
    return chat_prompt(user, gen_prefix="Here is the completed function:\n```python\n" + problem["prompt"] + "\n")


def humaneval_program(problem: dict, answer: str) -> str:
    """Prompt + completion + the task's tests + ``check(entry_point)``."""
    return problem["prompt"] + _code_until_fence(answer) + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def _score_program(program: str, limits: SandboxLimits, metric: str, task_id) -> dict:
    result = run_program(program, limits=limits)
    return {"id": task_id, metric: float(result.status == "passed"), "status": result.status,
            "detail": result.detail[-500:], "seconds": round(result.seconds, 3), "isolation": result.isolation}


def humaneval_score(problem: dict, answer: str, limits: SandboxLimits) -> dict:
    return _score_program(humaneval_program(problem, answer), limits, "pass@1", problem["task_id"])


# ------------------------------------------------------------------------------------------ MBPP


def mbpp_prompt(problem: dict) -> str:
    tests = "\n".join(problem["test_list"][:3])
    user = f"You are an expert Python programmer, and here is your task:\n{problem['text']}\nYour code should pass these tests:\n{tests}"
    return chat_prompt(user, gen_prefix="\n```python\n")


def mbpp_program(problem: dict, answer: str) -> str:
    """The answer's code + the test setup code (it may use the answer's classes) + the three asserts."""
    setup = problem.get("test_setup_code") or ""
    return _code_until_fence(answer) + "\n\n" + setup + "\n" + "\n".join(problem["test_list"]) + "\n"


def mbpp_score(problem: dict, answer: str, limits: SandboxLimits) -> dict:
    return _score_program(mbpp_program(problem, answer), limits, "pass@1", problem["task_id"])


# ------------------------------------------------------------------------------------------ GSM8K

_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _normalise(text: str) -> str:
    text = text.strip().lower().replace(",", "").replace("$", "")
    text = re.sub(r"(?s).*#### ", "", text)
    return re.sub(r"\.$", "", text)


def gsm8k_extract(answer: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answers: the number after "The answer is", and the last number in the text."""
    strict = _STRICT.search(answer)
    numbers = [a or b for a, b in _FLEXIBLE.findall(answer)]
    return (strict.group(1) if strict else None), (numbers[-1] if numbers else None)


def gsm8k_prompt(problem: dict) -> str:
    # lm-eval's YAML folds its line breaks, so the 0-shot question reads exactly like this.
    return chat_prompt(f"Q: {problem['question']} Please reason step by step A:")


def gsm8k_score(problem: dict, answer: str, limits: SandboxLimits) -> dict:
    target = _normalise(problem["answer"].split("####")[-1])
    strict, flexible = gsm8k_extract(answer)
    return {
        "id": problem.get("id"),
        "exact_match": float(strict is not None and _normalise(strict) == target),
        "exact_match_flexible": float(flexible is not None and _normalise(flexible) == target),
        "target": target,
        "extracted": strict if strict is not None else flexible,
    }


TASKS: dict[str, Task] = {
    "humaneval": Task(
        name="humaneval", metric="pass@1", prompt=humaneval_prompt, score=humaneval_score,
        stops=("\nclass", "\n#", "\nif", "\nprint", "\n```", "<|im_end|>", "<|endoftext|>"),
    ),
    "mbpp": Task(name="mbpp", metric="pass@1", prompt=mbpp_prompt, score=mbpp_score, stops=("<|im_end|>", "<|endoftext|>")),
    "gsm8k": Task(
        name="gsm8k", metric="exact_match", prompt=gsm8k_prompt, score=gsm8k_score,
        stops=("Q:", "</s>", "<|im_end|>", "<|endoftext|>"),
    ),
}
