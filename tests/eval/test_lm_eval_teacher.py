"""The lm-eval model class ``tide_teacher`` on tiny teachers in their real checkpoint layouts.

The teachers are written by the models' own tiny-checkpoint writers (real key names, random weights), with
a real SentencePiece tokenizer trained here copied beside them. The NELBO is recomputed by hand in this file
(the same per-request seeds, one MC sample at a time, on the unpadded sequence); a local multiple-choice task
runs through the venv's own ``lm_eval`` console script with labels chosen so that the right accuracy is 2/3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_tasks import MC_DOCS, Req, free_port, write_mc_task  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

from tide_ds.eval.diffusion_lm import request_seed  # noqa: E402
from tide_ds.eval.teacher_harness import TideTeacher, teacher_nelbo  # noqa: E402

MC_NUM, SEED, EPS = 5, 11, 1e-3
CORPUS = ("The sky is blue and the grass is green. Two plus two equals four. Water boils at one hundred degrees. "
          "A cat sat on the mat while the dog slept by the door. ") * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(CORPUS)
    return train_sentencepiece_tokenizer([d / "corpus.txt"], d / "tokenizer", vocab_size=300, seed=0)


def _teacher(root: Path, family: str, tokenizer_dir: Path) -> Path:
    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.models.teachers import get_family

    mask = resolve_special_ids(load_tokenizer(tokenizer_dir)).mask_id  # config.json and tokenizer must agree
    out = get_family(family).write_tiny_checkpoint(root / family, seed=3, mask_token_id=mask)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".model"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def teachers(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {f: _teacher(root, f, tokenizer_dir) for f in ("llada2_moe", "llada", "dream", "wedlm")}


def _hand_nelbo(lm: TideTeacher, ctx: list[int], y: list[int]) -> float:
    """The linear-schedule NELBO, one sample at a time: t ~ U[eps, 1), mask each y token if u < t, w = 1/t."""
    g = torch.Generator().manual_seed(request_seed(SEED, ctx, y))
    ts = EPS + (1 - EPS) * torch.rand(MC_NUM, generator=g, dtype=torch.float64)
    us = torch.rand((MC_NUM, len(y)), generator=g, dtype=torch.float64)
    fam, model = lm.family, lm.model
    x0 = torch.tensor([ctx + y])
    total = 0.0
    for t, u in zip(ts.tolist(), us):
        masked = torch.zeros_like(x0, dtype=torch.bool)
        masked[0, len(ctx):] = u < t
        x_t = torch.where(masked, torch.full_like(x0, lm.mask_id), x0)
        if fam.bidirectional:
            hidden = fam.forward_hidden(model, x_t)
        else:  # WeDLM: BD3LM forward, the sequence filled up to whole blocks with mask tokens
            pad = -x0.shape[1] % lm.block_length
            full = torch.cat([x0, torch.full((1, pad), lm.mask_id)], 1)
            hidden = fam.forward_hidden(model, torch.cat([x_t, full[:, x0.shape[1]:]], 1), x_0_BL=full,
                                        block_size=lm.block_length)[:, : x0.shape[1]]
        logp = (hidden[0] @ fam.lm_head_weight(model).T).double().log_softmax(-1)
        nll = -logp[masked[0], x0[0, masked[0]]].sum().item()
        total += nll / (t + 1e-6)
    return total / MC_NUM


def _pairs(lm, context, choices):
    return [lm._pair_tokens(context, " " + c) for c in choices]


@pytest.mark.parametrize("family", ["llada2_moe", "llada", "dream", "wedlm"])
def test_nelbo_matches_hand_computation(teachers, family):
    lm = TideTeacher(pretrained=str(teachers[family]), device="cpu", mc_num=MC_NUM, seed=SEED, batch_size=3,
                     block_length=4)
    assert lm.family.name == family  # detected from config.json as the trainer does
    pairs = _pairs(lm, *MC_DOCS[0]) + _pairs(lm, *MC_DOCS[2])
    assert all(len(y) >= 1 for _, y in pairs)
    got = [nelbo for nelbo, _ in teacher_nelbo(lm.model, pairs, mask_id=lm.mask_id, mc_num=MC_NUM, seed=SEED,
                                                block_length=4)]
    want = [_hand_nelbo(lm, list(c), list(y)) for c, y in pairs]
    assert got == pytest.approx(want, rel=1e-4)
    assert len(set(round(v, 3) for v in want)) == len(want)  # distinct values: the check can fail
    # lm-eval's request path, batched (right padding hidden by key padding / whole blocks): the same numbers
    lls = lm.loglikelihood([Req(MC_DOCS[0][0], " " + c) for c in MC_DOCS[0][1]])
    assert [ll for ll, _ in lls] == pytest.approx([-v for v in want[:3]], rel=1e-4)
    # loglikelihood_rolling: one window (the text fits), the whole text given only the EOS before it
    text = "A cat sat on the mat."
    [rolling] = lm.loglikelihood_rolling([Req(text)])
    assert rolling == pytest.approx(-_hand_nelbo(lm, [lm.tokenizer.eos_token_id], lm._encode(text)), rel=1e-4)


@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "two_processes"])
def test_lm_eval_cli_multiple_choice_on_a_teacher(teachers, tmp_path, nproc):
    """The venv's ``lm_eval`` script, alone and under torchrun with 2 CPU processes (gloo): the same 2/3."""
    lm = TideTeacher(pretrained=str(teachers["llada"]), device="cpu", mc_num=MC_NUM, seed=SEED)
    write_mc_task(tmp_path, "tide_teacher_mc", lambda context, choices: [
        -_hand_nelbo(lm, list(c), list(y)) for c, y in _pairs(lm, context, choices)])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "lm_eval")]
    if nproc > 1:
        cmd = [str(bin_dir / "torchrun"), "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
               "--no-python", *cmd]
    cmd += ["--model", "tide_teacher",
           "--model_args", f"pretrained={teachers['llada']},mc_num={MC_NUM},seed={SEED}", "--tasks", "tide_teacher_mc",
           "--include_path", str(tmp_path), "--batch_size", "2", "--device", "cpu", "--output_path", str(tmp_path / "out"),
           "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [result_file] = list((tmp_path / "out").rglob("results*.json"))  # rank 0 writes it
    assert json.loads(result_file.read_text())["results"]["tide_teacher_mc"]["acc,none"] == pytest.approx(2 / 3)
    [samples] = list((tmp_path / "out").rglob("samples_tide_teacher_mc_*.jsonl"))
    assert sorted(json.loads(line)["doc_id"] for line in samples.read_text().splitlines()) == [0, 1, 2]
    assert ("tide_teacher: data-parallel rank 1 of 2" in proc.stderr) == (nproc == 2)


def test_generate_until_uses_the_masked_diffusion_sampler(teachers):
    from tide_ds.sampling.denoisers import FullCanvasDenoiser
    from tide_ds.sampling.sampler import SamplerConfig, generate

    lm = TideTeacher(pretrained=str(teachers["dream"]), device="cpu", seed=SEED, batch_size=2, block_length=4, steps=4)

    prompts = ["The sky is", "Two plus two equals", "A cat"]
    got = lm.generate_until([Req(p, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}) for p in prompts])
    config = SamplerConfig(max_new_tokens=8, block_size=4, steps=4)
    unused = list(range(len(lm.tokenizer), lm.model.config.vocab_size))
    want = []
    for p in prompts:  # one at a time: greedy decoding does not depend on the batch
        [tokens] = generate(FullCanvasDenoiser(lm.model), [lm._encode(p)], config=config, mask_id=lm.mask_id,
                            pad_id=lm.tokenizer.pad_token_id, stop_ids=[lm.tokenizer.eos_token_id],
                            suppress_ids=unused).tokens
        want.append(lm.tokenizer.decode(tokens, skip_special_tokens=True).split("\n\n")[0])
    assert got == want and any(got)


def test_wedlm_generation_is_refused_by_name_and_bad_args_fail_first(teachers, tmp_path):
    lm = TideTeacher(pretrained=str(teachers["wedlm"]), device="cpu", block_length=4)

    with pytest.raises(NotImplementedError, match="'wedlm' teacher family"):
        lm.generate_until([Req("The sky is", {"until": ["\n"]})])
    with pytest.raises(ValueError, match="unknown model_args"):
        TideTeacher(pretrained=str(teachers["llada"]), mcnum=3)
    with pytest.raises(ValueError, match="no config.json"):
        TideTeacher(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="'llada' checkpoint"):
        TideTeacher(pretrained=str(teachers["llada"]), family="dream")
