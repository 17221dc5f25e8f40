"""The transfer test: the teacher's knowledge reaches the student, on both pipelines, through the real trainer.

World (:mod:`tide_ds.experiments.transfer`): a synthetic chat language (8 topics of 3 made-up words; a
response is 12 words of its prompt's topic). The student's training responses pass a noisy channel
(each word is, with probability 0.4, one of two junk words of its topic, so junk words are exactly as
frequent as real ones); its held-out split is clean. The teachers are trained on clean text only, the
held-out samples included: pipeline A a LLaDA2-layout MoE with its own SentencePiece tokenizer (words
split differently from the student's; its tokenizer also saw the junk words, so only its weights tell
junk from words), pipeline B a WeDLM-layout BD3LM with the student's tokenizer. Each student run is
``tide_ds.trainer.loop.train`` (DeepSpeed engine, teacher engine, ``train_step``, held-out evaluation) on
one gloo rank, 80 steps of 16 samples, the same initial weights, data order and masks for every variant.
CE alone learns the channel; a teacher that knows the clean language tells junk from words.

Measured when written (seed 1, 80 steps; held-out NLL per student token; CE alone 3.3509 on both
pipelines -- pipeline A's CE baseline is CALM with calm_weight=0, i.e. the same chunk-widened masks):

    variant          trained teacher   random-weight teacher
    A calm           3.1611 (-0.190)   3.4595 (+0.109)
    A tide_cross     3.2604 (-0.091)   3.4379 (+0.087)
    A tide_shared    3.2625 (-0.088)   3.3001 (-0.051)
    B kl             2.6459 (-0.705)   3.5489 (+0.198)
    B tide_shared    3.1313 (-0.220)   3.4779 (+0.127)

Asserted: each trained-teacher student ends at least ``MARGIN[preset]`` below CE and at least ``GAP[preset]`` below
the same preset with the random teacher; no random-teacher student ends more than ``RANDOM_SLACK`` below
CE; each teacher's held-out NLL is below half the CE student's (per own token; the teacher's tokens are
shorter, so per byte its lead is larger). Runs are deterministic given the seed (perturbing CALM's
weight to 1e-4 moves the CE result by 0.0002), so the margins are about the method, not run noise.

Breaking the path on purpose (``python -m tide_ds.experiments.transfer --break ...``, same world and plan;
``TIDE_TRANSFER_BREAK=<kind>`` runs this test that way) makes the test fail, measured when written:

* ``zero_teacher`` (the teacher's target log-probs of pipeline A and row logits of pipeline B replaced by
  zeros, for the trained and the random teacher alike): fails for all five presets. A: CALM 3.1757,
  TIDE-Cross 3.1421, TIDE-Shared 3.2677, identical for both teachers, so every ``GAP`` check fails (and
  ``RANDOM_SLACK``); B: KL 3.6171, TIDE-Shared 3.4879, above CE, so the margins fail too. Note the A
  numbers: a flat teacher (every chunk probability 1) still beats CE by 0.08-0.21 nats here, because it
  acts as extra CE weight on a student 80 steps into training; the margin against CE alone would not
  catch this break, the comparison with the random-weight teacher does.
* ``shuffle_alignment`` (each row's teacher chunk ids permuted among its chunks; pipeline-B aligned pairs
  rolled by one): fails for CALM (3.3064, -0.044 against CE; random 3.4502) and TIDE-Cross (3.4998,
  +0.149). It does not fail for A's TIDE-Shared (3.2980, -0.053; random 3.3362) nor for pipeline B
  (KL 2.7121, TIDE-Shared 3.0568): in this world every response position has the same distribution (the
  topic's words), so a teacher row from the neighbouring position carries the same knowledge; rolled
  pairs remove no information here, and chunk TIDAL's weak, lambda-scaled term keeps some of its effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

#: About half of each measured effect (nats per token): against CE alone, and against a random-weight teacher.
MARGIN = {"A/calm": 0.10, "A/tide_cross": 0.05, "A/tide_shared": 0.05, "B/kl": 0.35, "B/tide_shared": 0.11}
GAP = {"A/calm": 0.15, "A/tide_cross": 0.09, "A/tide_shared": 0.02, "B/kl": 0.45, "B/tide_shared": 0.17}
RANDOM_SLACK = 0.06


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Pipelines A and B in two processes at once (one thread each); the world is built once, by whichever
    process takes its lock first."""
    out = tmp_path_factory.mktemp("transfer")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    breakage = os.environ.get("TIDE_TRANSFER_BREAK")
    procs = []
    for pipeline in ("A", "B"):
        cmd = [sys.executable, "-m", "tide_ds.experiments.transfer", "--out", str(out / pipeline),
               "--pipelines", pipeline, "--world-root", str(out / "worlds")]
        if breakage:
            cmd += ["--break", breakage]
        env_p = {**env, "MASTER_PORT": str(29600 + ord(pipeline) + os.getpid() % 1000)}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_p, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    runs, worlds = {}, []
    for pipeline, proc in zip(("A", "B"), procs):
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, log[-4000:]
        data = json.loads((out / pipeline / f"results-{pipeline}.json").read_text())
        runs.update(data["runs"])
        worlds.append(data["world"])
        print(log[-1500:])
    print(json.dumps({k: round(v["nll"], 4) for k, v in runs.items()}))
    return runs, worlds[0]


def test_teachers_know_the_heldout_text(results):
    runs, world = results
    for pipeline in ("A", "B"):
        nll = world["teacher_heldout_nll"]
        assert nll[pipeline] < 0.5 * nll[f"{pipeline}_before"]
        assert nll[pipeline] < 0.5 * runs[f"{pipeline}/ce"]["nll"], (pipeline, nll, runs[f"{pipeline}/ce"]["nll"])


def test_ce_student_learns(results):
    runs, _ = results
    for pipeline in ("A", "B"):
        r = runs[f"{pipeline}/ce"]
        assert r["nll"] < r["nll_start"] - 2.0


@pytest.mark.parametrize("variant", sorted(MARGIN))
def test_trained_teacher_helps(results, variant):
    runs, _ = results
    ce = runs[variant.split("/")[0] + "/ce"]["nll"]
    trained, random_teacher = runs[variant]["nll"], runs[f"{variant}_random"]["nll"]
    assert trained <= ce - MARGIN[variant], (variant, trained, ce)
    assert trained <= random_teacher - GAP[variant], (variant, trained, random_teacher)


@pytest.mark.parametrize("variant", sorted(MARGIN))
def test_random_teacher_does_not_help(results, variant):
    runs, _ = results
    ce = runs[variant.split("/")[0] + "/ce"]["nll"]
    assert runs[f"{variant}_random"]["nll"] >= ce - RANDOM_SLACK, (variant, runs[f"{variant}_random"]["nll"], ce)
