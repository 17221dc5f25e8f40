"""The lm-eval model class ``tide_bd3lm`` on a tiny exported student, through lm-eval's own CLI and Python API.

Two local tasks (YAML over JSONL): a generation task scored by exact match and a multiple-choice task
scored by accuracy. The expected scores are computed here from the sampler and the ELBO directly: the
targets are chosen so that the right answer is 2 of 3 (the model's own greedy output / highest-ELBO
choice for two documents, something else for the third), so a wrong prompt, a wrong stop handling or a
wrong likelihood changes the score.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from tide_ds.eval.harness import TideBD3LM, continuation_nelbo  # noqa: E402  (registers tide_bd3lm)

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_tasks import Req as _Req  # noqa: E402
from lm_eval_tasks import free_port, write_mc_task  # noqa: E402
from tiny_export import build_tiny_export  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GEN_TOKENS, MC_NUM, SEED = 12, 6, 3
QUESTIONS = ["The capital of France is", "def add(a, b):", "Q: What is 2 + 3? A:"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_tiny_export(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def loaded(exported):
    from tide_ds.sampling.load import load_inference_model

    return load_inference_model(exported, device="cpu")


def _greedy(loaded, prompts):
    from tide_ds.generate import complete
    from tide_ds.sampling.sampler import SamplerConfig
    from tide_ds.sampling.text import cut_at_stops, strip_think

    config = SamplerConfig(max_new_tokens=GEN_TOKENS, block_size=8, steps=GEN_TOKENS)
    return [cut_at_stops(strip_think(c.text), ["\n\n"]) for c in complete(loaded, prompts, config=config)]


def _choice_lls(loaded, context, choices):
    tok = loaded.tokenizer
    lls = []
    for choice in choices:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[: len(ctx)] == ctx
        [(nelbo, _)] = continuation_nelbo(loaded.model, [(ctx, whole[len(ctx):])], block_size=8,
                                          mask_id=loaded.special.mask_id, mc_num=MC_NUM, seed=SEED)
        lls.append(-nelbo)
    return lls


@pytest.fixture(scope="module")
def tasks(loaded, tmp_path_factory):
    """Task YAMLs + JSONL, with the expected scores computed by hand."""
    d = tmp_path_factory.mktemp("tasks")
    own = _greedy(loaded, QUESTIONS)
    assert all(own), own  # a random model still writes something in 12 tokens
    answers = [own[0], own[1], own[2] + " (not what the model says)"]
    with open(d / "gen.jsonl", "w") as fh:
        for q, a in zip(QUESTIONS, answers):
            fh.write(json.dumps({"question": q, "answer": a}) + "\n")
    write_mc_task(d, "tide_tiny_mc", lambda context, choices: _choice_lls(loaded, context, choices))
    (d / "tide_tiny_gen.yaml").write_text(f"""\
task: tide_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {GEN_TOKENS}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return d


def _model_args(exported) -> str:
    return f"pretrained={exported},mc_num={MC_NUM},seed={SEED},block_size=8,max_gen_toks={GEN_TOKENS}"


def _check_scores(results: dict) -> None:
    gen, mc = results["tide_tiny_gen"], results["tide_tiny_mc"]
    assert gen["exact_match,none"] == pytest.approx(2 / 3)
    assert mc["acc,none"] == pytest.approx(2 / 3)


def test_python_api_scores_match_hand_computed(exported, tasks):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="tide_bd3lm", model_args=_model_args(exported), tasks=["tide_tiny_gen", "tide_tiny_mc"],
        task_manager=TaskManager(include_path=str(tasks)), batch_size=2, device="cpu",
    )
    _check_scores(out["results"])


def test_lm_eval_cli_scores_match_hand_computed(exported, tasks, tmp_path):
    """The venv's own ``lm_eval`` console script: tide_bd3lm is found through the start-up hook that pip install
    puts in site-packages (tide_ds_lm_eval.pth), without importing anything of tide_ds first."""
    lm_eval_script = Path(sys.executable).parent / "lm_eval"
    assert lm_eval_script.is_file(), f"{lm_eval_script} is missing: pip install -e '.[eval]'"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(lm_eval_script), "--model", "tide_bd3lm",
           "--model_args", _model_args(exported), "--tasks", "tide_tiny_gen", "tide_tiny_mc",
           "--include_path", str(tasks), "--batch_size", "3", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert "no model for this name found" not in proc.stderr, (
        "lm_eval does not know tide_bd3lm: the start-up hook tide_ds_lm_eval.pth is not in site-packages; "
        "reinstall with pip install -e '.[eval]'")
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result_file] = list((tmp_path / "out").rglob("results*.json"))
    _check_scores(json.loads(result_file.read_text())["results"])
    assert "tide_tiny_gen" in proc.stdout and "exact_match" in proc.stdout  # lm-eval's own table


def test_tide_ds_lm_eval_command_scores_match_hand_computed(exported, tasks, tmp_path):
    """``tide-ds lm-eval run`` (python -m tide_ds.eval.harness): the same scores."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tide_ds.cli", "lm-eval", "run", "--model", "tide_bd3lm",
           "--model_args", _model_args(exported), "--tasks", "tide_tiny_mc",
           "--include_path", str(tasks), "--batch_size", "3", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result_file] = list((tmp_path / "out").rglob("results*.json"))
    assert json.loads(result_file.read_text())["results"]["tide_tiny_mc"]["acc,none"] == pytest.approx(2 / 3)


def test_elbo_is_deterministic_and_independent_of_batching(exported):
    lm = TideBD3LM(pretrained=str(exported), device="cpu", mc_num=4, seed=1, batch_size=1)
    reqs = [_Req("Hello", " world"), _Req("A longer context that spans blocks,", " and a continuation"),
            _Req("", "no context at all")]
    one = lm.loglikelihood(reqs)
    lm.batch_size = 3
    assert lm.loglikelihood(reqs) == one  # the same call, the same numbers
    batched = list(reversed(lm.loglikelihood(list(reversed(reqs)))))
    assert [v for v, _ in batched] == pytest.approx([v for v, _ in one], rel=1e-5)  # same noise, other matmul shapes
    assert [g for _, g in batched] == [g for _, g in one]
    lm.mc_batch_size = 3  # samples stacked in one forward: the same noise
    assert [v for v, _ in lm.loglikelihood(reqs)] == pytest.approx([v for v, _ in one], rel=1e-5)
    lm.seed = 2
    assert [v for v, _ in lm.loglikelihood(reqs)] != [v for v, _ in one]
    assert all(v < 0 for v, _ in one)
    rolling = lm.loglikelihood_rolling([_Req("no context at all")])
    assert rolling[0] < 0


def test_elbo_of_one_token_converges_to_its_cross_entropy(loaded):
    """One masked token: E[w(t) 1{masked}] = 1 - eps, so the NELBO is the token's CE given the clean context."""
    from tide_ds.models.qwen3 import BD3LMStudent

    tok = loaded.tokenizer
    ctx = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    y = tok(" Paris", add_special_tokens=False)["input_ids"][:1]
    mask = loaded.special.mask_id
    x0 = torch.tensor([ctx + y + [mask] * (-(len(ctx) + 1) % 8)])
    xt = x0.clone()
    xt[0, len(ctx)] = mask
    with torch.no_grad():
        student = BD3LMStudent(loaded.model, block_size=8)
        logits = student.logits(student(xt, x0))[0, len(ctx)].float()
    ce = float(torch.nn.functional.cross_entropy(logits[None], torch.tensor(y)))
    [(nelbo, greedy)] = continuation_nelbo(loaded.model, [(ctx, y)], block_size=8, mask_id=mask, mc_num=4000, seed=0,
                                           mc_batch_size=500)
    # X = CE / t with probability t: mean CE (1 - eps), variance CE^2 (ln(1/eps) - 1): 4 sigma over 4000 draws
    assert abs(nelbo - ce * (1 - 1e-3)) < 4 * ce * (6.9 / 4000) ** 0.5
    assert greedy == (int(logits.argmax()) == y[0])


def test_bad_model_args_fail_before_loading(exported):
    with pytest.raises(ValueError, match="unknown model_args"):
        TideBD3LM(pretrained=str(exported), blocksize=8)
    with pytest.raises(ValueError, match="remasking"):
        TideBD3LM(pretrained=str(exported), remasking="best")
    with pytest.raises(ValueError, match="mc_num=0"):
        TideBD3LM(pretrained=str(exported), mc_num=0)


def test_two_processes_give_the_single_process_scores(exported, tasks, tmp_path):
    """lm-eval's data-parallel mode: torchrun with 2 CPU processes (gloo), each scoring its share of the requests."""
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "tide_ds.eval.harness", "run", "--model", "tide_bd3lm", "--model_args", _model_args(exported),
           "--tasks", "tide_tiny_gen", "tide_tiny_mc", "--include_path", str(tasks), "--batch_size", "2",
           "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result_file] = list((tmp_path / "out").rglob("results*.json"))  # written by rank 0 only
    _check_scores(json.loads(result_file.read_text())["results"])
    assert "tide_bd3lm: data-parallel rank 1 of 2" in proc.stderr
    # lm-eval gives rank r the documents r, r + 2, ...: rank 0 reports all three, so rank 1's answer was gathered
    for task in ("tide_tiny_gen", "tide_tiny_mc"):
        [samples] = list((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
        assert sorted(json.loads(line)["doc_id"] for line in samples.read_text().splitlines()) == [0, 1, 2]


def test_long_requests_keep_the_end_within_max_length(exported):
    lm = TideBD3LM(pretrained=str(exported), device="cpu", mc_num=3, seed=0, max_length=16)
    ctx, cont = list(range(1000, 1040)), list(range(2000, 2005))
    assert lm._fit(ctx, cont) == (ctx[-11:], cont)
    assert lm._fit([], list(range(30))) == ([], list(range(14, 30)))
    [(ll, _)] = lm._score_pairs([(ctx, cont)])
    [(nelbo, _)] = continuation_nelbo(lm.loaded.model, [(ctx[-11:], cont)], block_size=8,
                                      mask_id=lm.loaded.special.mask_id, mc_num=3, seed=0)
    assert ll == pytest.approx(-nelbo, rel=1e-6)
    windows = lm.loglikelihood_rolling([_Req(" ".join(["word"] * 40))])  # 40+ tokens in windows of 16
    assert windows[0] < 0


def test_paper_suite_runs_lm_eval_benchmarks_through_tide_bd3lm(exported, loaded, tasks, monkeypatch, tmp_path):
    """The suite's lm-eval branch, with the MMLU column pointed at the local multiple-choice task: the value is
    lm-eval's own for the protocol's settings (chat template), in percent."""
    import argparse
    import dataclasses

    from tide_ds.eval import suite

    benches = tuple(dataclasses.replace(b, task="tide_tiny_mc", metric="acc,none", num_fewshot=0, max_gen_toks=None)
                    for b in suite.BENCHMARKS if b.name == "MMLU")
    monkeypatch.setattr(suite, "BENCHMARKS", benches)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = argparse.Namespace(wheel_dir=None, batch_size=2, seed=SEED, mc_num=MC_NUM, limit=0,
                              include_path=str(tasks), data_dir=None)
    result = suite.run_paper_suite(loaded, args=args, block_size=8)
    from lm_eval.tasks import TaskManager

    direct = lm_eval.simple_evaluate(
        model="tide_bd3lm", model_args=_model_args(exported), tasks=["tide_tiny_mc"], device="cpu", batch_size=2,
        task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True,
    )["results"]["tide_tiny_mc"]["acc,none"]
    assert result["benchmarks"]["MMLU"]["value"] == pytest.approx(100 * direct)
    assert result["benchmarks"]["MMLU"]["n"] == 3
    assert result["missing"] == {}  # (missing benchmarks: test_lm_eval_agrees_with_tide_eval.py)
    assert f"{100 * direct:.2f}" in suite.format_paper_table(result)
