"""``python -m tide_ds.eval`` and lm-eval (``tide_bd3lm``) on the same HumanEval, MBPP and GSM8K problems.

The lm-eval tasks here are the protocol's (zero-shot, chat template with the empty think block, the
task's ``gen_prefix``, the tide-ds stop strings) over the first problems of the pinned benchmark files;
lm-eval builds the prompts itself from the YAML. Both routes must send the same prompt text, produce the
same answers and, for GSM8K, the same strict and flexible exact match. Then the paper-suite command runs
on what is available offline and lists the rest as missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

import tide_ds.eval.harness  # noqa: E402,F401  (registers tide_bd3lm)
from tide_ds.eval.fetch import fetch, load_problems  # noqa: E402
from tide_ds.eval.tasks import TASKS  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_export import build_tiny_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LIMIT, NEW_TOKENS = 2, 16
EXTRA_FIELDS = {"humaneval": ("prompt",), "mbpp": ("text", "test_list"), "gsm8k": ("question", "answer")}
PROMPTS = {
    "humaneval": ('Write a solution to the following problem and make sure that it passes the tests:\\n```{{prompt}}',
                  'Here is the completed function:\\n```python\\n{{prompt}}\\n'),
    "mbpp": ('You are an expert Python programmer, and here is your task:\\n{{text}}\\nYour code should pass these '
             'tests:\\n{{test_list[0]}}\\n{{test_list[1]}}\\n{{test_list[2]}}', '\\n```python\\n'),
    "gsm8k": ('Q: {{question}} Please reason step by step A:', None),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("tiny") / "hf")


def _task_yaml(name: str, data: Path) -> str:
    text, prefix = PROMPTS[name]
    until = json.dumps(list(TASKS[name].stops))
    lines = [
        f"task: agree_{name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
        "test_split: test", "output_type: generate_until", "num_fewshot: 0", f'doc_to_text: "{text}"',
        'doc_to_target: "{{answer.split(\'####\')[-1].strip() if answer is defined else \'\'}}"',
        "generation_kwargs:", f"  until: {until}", f"  max_gen_toks: {NEW_TOKENS}", "  do_sample: false",
    ]
    if prefix:
        lines.append(f'gen_prefix: "{prefix}"')
    if name == "gsm8k":  # gsm8k_cot's filters and metric
        lines += [
            "filter_list:",
            "  - name: strict-match", "    filter:",
            '      - {function: regex, regex_pattern: "The answer is (\\\\-?[0-9\\\\.\\\\,]+)."}', "      - {function: take_first}",
            "  - name: flexible-extract", "    filter:",
            '      - {function: regex, group_select: -1, regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"}',
            "      - {function: take_first}",
            "metric_list:", "  - metric: exact_match", "    aggregation: mean", "    higher_is_better: true",
            "    ignore_case: true", "    ignore_punctuation: false",
            '    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]',
        ]
    else:
        lines += ["metric_list:", "  - metric: bypass"]
    return "\n".join(lines) + "\n"


def test_lm_eval_and_tide_eval_agree_on_the_same_problems(exported, tmp_path):
    from lm_eval.tasks import TaskManager

    from tide_ds.eval.__main__ import main as eval_main

    fetch(list(TASKS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in TASKS:
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in load_problems(name)[:LIMIT]))
        (tasks / f"agree_{name}.yaml").write_text(_task_yaml(name, data))

    ours_path = tmp_path / "tide.json"
    assert eval_main(["--checkpoint", str(exported), "--tasks", "humaneval,mbpp,gsm8k", "--limit", str(LIMIT),
                      "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--out", str(ours_path)]) == 0
    ours = json.loads(ours_path.read_text())["tasks"]

    out = lm_eval.simple_evaluate(
        model="tide_bd3lm", model_args=f"pretrained={exported},max_gen_toks={NEW_TOKENS}", device="cpu",
        tasks=[f"agree_{n}" for n in TASKS], task_manager=TaskManager(include_path=str(tasks)),
        apply_chat_template=True, log_samples=True, batch_size=8,
    )
    for name in TASKS:
        problems = load_problems(name)[:LIMIT]
        key = EXTRA_FIELDS[name][0]  # a field that identifies the problem (lm-eval may reorder documents)
        lm_prompts = {s["doc"][key]: s["arguments"][0][0] for s in out["samples"][f"agree_{name}"]}
        lm_answers = {s["doc"][key]: s["resps"][0][0] for s in out["samples"][f"agree_{name}"]}
        assert lm_prompts == {p[key]: TASKS[name].prompt(p) for p in problems}, name
        assert lm_answers == {p[key]: r["answer"] for p, r in zip(problems, ours[name]["samples"])}, name
        assert all(lm_answers.values()), name  # the tiny model writes something: the comparison is not ''==''
    gsm = out["results"]["agree_gsm8k"]
    assert gsm["exact_match,strict-match"] == ours["gsm8k"]["exact_match"]
    assert gsm["exact_match,flexible-extract"] == ours["gsm8k"]["exact_match_flexible"]


def test_paper_suite_runs_what_is_available_and_lists_the_rest(exported, tmp_path):
    fetch(list(TASKS))
    empty_cache = tmp_path / "hf"
    empty_cache.mkdir()
    cmd = [sys.executable, "-m", "tide_ds.cli", "eval", "--suite", "paper", "--checkpoint", str(exported),
           "--limit", str(LIMIT), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--data-dir", str(empty_cache),
           "--out", str(tmp_path / "suite.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    assert table[0].split() == ["model", "GSM8K", "MATH", "BBH", "MMLU-Pro", "HellaSwag", "MMLU", "HumanEval", "MBPP", "Avg"]
    paper = next(line for line in table if line.startswith("TIDE-Cross, pipeline A (paper)"))
    assert paper.split()[-9:] == ["52.24", "13.20", "27.37", "14.52", "39.88", "39.59", "48.17", "38.60", "34.20"]
    result = json.loads((tmp_path / "suite.json").read_text())
    assert sorted(result["benchmarks"]) == ["GSM8K", "HumanEval", "MBPP"]
    assert sorted(result["missing"]) == ["BBH", "HellaSwag", "MATH", "MMLU", "MMLU-Pro"]
    for name in result["missing"]:
        assert any(line.startswith(f"missing {name}: ") for line in table)
    bbh = next(line for line in table if line.startswith("missing BBH: "))  # the exact --data-dir layout to fix it
    assert f"HF_HOME={empty_cache} " in bbh and "get_task_dict(['bbh_cot_fewshot'], TaskManager())" in bbh
    assert f"{empty_cache}/hub/datasets--SaylorTwift--bbh" in bbh and f"--data-dir {empty_cache}" in bbh
    ours = next(line for line in table if line.startswith("this checkpoint")).split()
    assert ours[2:][ours[2:].index("missing")] == "missing" and ours[-1] == "(3/8)"
    assert all(result["benchmarks"][n]["n"] == LIMIT for n in ("GSM8K", "HumanEval", "MBPP"))
