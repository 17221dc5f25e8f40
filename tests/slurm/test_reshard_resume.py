"""Resume at another world size (2 -> 1 -> 2 ranks) through the verified universal checkpoint.

One 2-rank reference run A (6 steps, checkpoints at 3 and 6). From A's step-3 checkpoint:
B resumes on 1 rank and saves at once (same state, new layout), then D resumes B's 1-rank checkpoint
on 2 ranks and must reproduce A's steps 4..6 exactly; B also continues on 1 rank (the same samples per
step through gradient accumulation, other noise) with losses close to A's. A tampered conversion must
stop the resume before any step.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from test_train_e2e import _records, _run

from tide_ds.trainer.universal import convert_to_universal

pytestmark = pytest.mark.slow

STEPS = ["--train.max_steps=6", "--train.save_every=3", "--train.eval_every=0"]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every per-parameter tensor of the checkpoint (fp32, exp_avg, exp_avg_sq, step), layout-free."""
    universal = convert_to_universal(ckpt)
    out = {}
    for path in sorted((universal / "zero").glob("*/*.pt")):
        data = torch.load(path, map_location="cpu", weights_only=False)
        out[f"{path.parent.name}/{path.stem}"] = data["param"] if isinstance(data, dict) else data
    return out


def _assert_same_state(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sorted(sa) == sorted(sb)
    assert len(sa) > 40  # fp32 + 2 moments + step for every parameter of the tiny student
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def _only_step(src: Path, dst: Path, step: int) -> Path:
    """Copy run ``src`` keeping only the checkpoint at ``step`` (as if the run had stopped there)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if ckpt.name != _ckpt(dst, step).name:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(_ckpt(dst, step).name)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    a = root / "a"
    proc = _run(a, *STEPS)
    assert proc.returncode == 0
    # B: A's step-3 checkpoint on one rank, saved again right away (max_steps = the checkpoint's step)
    b = _only_step(a, root / "b", 3)
    proc_b = _run(b, "--train.max_steps=3", "--train.eval_every=0", "--train.gradient_accumulation_steps=2",
                  "--train.resume=auto", nproc=1)
    assert proc_b.returncode == 0
    shutil.copytree(b, root / "d")  # B's one-rank step-3 checkpoint, before B trains on
    return root, a, b, proc_b


def test_two_to_one_rank_loads_the_same_state(runs):
    _, a, b, proc_b = runs
    assert "world size 2 -> 1" in proc_b.stdout and "resharded resume verified" in proc_b.stdout
    state = json.loads((_ckpt(b, 3) / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == 3
    assert [p.name for p in _ckpt(b, 3).glob("*zero_pp_rank_*")] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    _assert_same_state(_ckpt(a, 3), _ckpt(b, 3))


def test_one_to_two_ranks_continues_exactly_like_the_reference(runs):
    root, a, _, _ = runs
    d = root / "d"
    proc = _run(d, *STEPS, "--train.resume=auto")
    assert proc.returncode == 0
    assert "world size 1 -> 2" in proc.stdout and "resharded resume verified" in proc.stdout
    ref, got = _records(a, "train"), _records(d, "train")
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):  # same world size, data, noise and state as A: the same numbers
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-6, abs=1e-7), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
    _assert_same_state(_ckpt(a, 6), _ckpt(d, 6))


def test_one_rank_continues_sensibly(runs):
    _, a, b, _ = runs
    proc = _run(b, *STEPS, "--train.gradient_accumulation_steps=2", "--train.resume=auto", nproc=1)
    assert proc.returncode == 0
    ref, got = _records(a, "train"), _records(b, "train")
    assert sorted(got) == list(range(1, 7))
    for step in (4, 5, 6):
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
    # Same samples per step (2 micro-batches of 4 on one rank = 4 + 4 on two) but other noise, so single
    # training losses scatter (this tiny run: 10.0 to 12.6); the held-out NLL (fixed noise) is steady.
    def mean(rec: dict) -> float:
        return sum(rec[s]["loss"] for s in (4, 5, 6)) / 3

    assert mean(got) == pytest.approx(mean(ref), rel=0.15)
    ev_ref, ev_got = _records(a, "eval"), _records(b, "eval")
    assert ev_got[6]["nll"] == pytest.approx(ev_ref[6]["nll"], abs=0.2), (ev_got, ev_ref)
    # and clearly below the untrained student's (a silently lost state would start over from there)
    assert ev_got[6]["nll"] < ev_ref[0]["nll"] - 0.5


def test_a_conversion_that_does_not_match_stops_the_resume(runs):
    root, a, _, _ = runs
    e = _only_step(a, root / "e", 3)
    universal = convert_to_universal(_ckpt(e, 3))
    target = min((universal / "zero").glob("*.mlp.down_proj.weight")) / "exp_avg.pt"
    data = torch.load(target, weights_only=False)
    data["param"] = data["param"] + 1e-3
    torch.save(data, target)
    proc = _run(e, "--train.max_steps=3", "--train.eval_every=0", "--train.resume=auto", nproc=1)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # the engine loaded the tampered file faithfully; the totals over the original ZeRO partitions catch it
    assert "does not reproduce the saved state" in out and "exp_avg: totals" in out
    assert "resumed from" not in out
    assert sorted(p.name for p in (e / "checkpoints").glob("step_*")) == ["step_00000003"]
