"""LM-head loss benchmarks: the student's CE + Reverse CALM (forward+backward) and the teacher's target
log-probs (forward, no gradient), at the paper's shapes (``shapes.py``).

Providers (``loss_paths.py``):
    authors:           the reference implementation's path: LM head on both halves, float32 logits,
                       cross_entropy, gather - logsumexp, dense alignment bmm, clipped probabilities, autograd
                       (teacher: full float32 logits, log_softmax, gather);
    authors_compiled:  the same under ``torch.compile``;
    chunked:           ours in plain PyTorch (``--model.loss_implementation=pytorch``: row tiles, gradients
                       in the forward pass);
    triton:            ours with the Triton kernels (``--model.loss_implementation=triton``, the default on GPUs).

TFLOP/s counts the useful work of the x_t half only, the same for every provider: the student ``6 N V D``
(logits, dh, dW; N = B x L) and the teacher ``2 N V D``. Peak memory is the allocator's peak during one
call above what was allocated before it (inputs excluded, gradients included). Each benchmark first checks
Triton against the authors' path run in float32 on the same inputs.

The CE part alone (``student_ce``: mean CE over the masked x_t rows, fwd+bwd) is also measured against the
libraries users would pick instead (``peers.py``): Liger-Kernel's fused linear cross-entropy (``liger_flce``)
and Apple's Cut Cross-Entropy (``cce``), with the same inputs; speed-ups and memory ratios are reported
against both, and the best peer is the target. Peers are GPU-only and skipped (with the reason) when their
package is missing.

Run: ``python -m pytest -m bench -s tests/benchmarks/test_bench_fused_head.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.benchmarks.harness import (
    BENCH_MARKS,
    DRY_RUN,
    bench_device,
    peak_mib,
    time_ms,
)
from tests.benchmarks.loss_paths import (
    authors_student_loss,
    authors_teacher_logprobs,
    fused_student_loss,
    fused_teacher_logprobs,
    student_problem,
    teacher_problem,
)
from tests.benchmarks.peers import cce_available, cce_ce, liger_available, liger_flce
from tests.benchmarks.shapes import (
    STUDENT_LOSS_SHAPES,
    TEACHER_LOGPROB_SHAPES,
    HeadShape,
)

pytestmark = BENCH_MARKS

DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


# Ours first and the compiled baseline last: a run cut by its time limit keeps the numbers that matter most.
STUDENT_PROVIDERS = {
    "triton": lambda p: fused_student_loss(p, implementation="triton"),
    "authors": authors_student_loss,
    "chunked": lambda p: fused_student_loss(p, implementation="pytorch"),
    "authors_compiled": lambda p: _compiled(authors_student_loss)(p),
}


def _relative(actual: torch.Tensor, ref: torch.Tensor) -> float:
    actual, ref = actual.double(), ref.double()
    return ((actual - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", STUDENT_LOSS_SHAPES, ids=lambda s: s.id)
def test_bench_student_loss(shape: HeadShape, bench_recorder) -> None:
    op = "student_loss"
    bench_recorder.set_baselines(op, ("authors", "authors_compiled"))
    device = bench_device()
    size = {"batch": shape.batch, "seq_len": shape.seq_len, "hidden": shape.hidden, "vocab": shape.vocab}
    problem = student_problem(**size, dtype=DTYPE, device=device)

    # Correctness at the benchmark shape: Triton on the benchmark inputs against the authors' path in float32.
    reference = student_problem(**size, dtype=torch.float32, device=device)
    ref_loss = authors_student_loss(reference)
    ref_loss.backward()
    loss = STUDENT_PROVIDERS["triton"](problem)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for name, ref, ours in zip(("dh", "dW"), reference.leaves, problem.leaves):
        rel = _relative(ours.grad, ref.grad)
        assert rel < 3e-2, f"{name}: relative RMS error {rel:.2e} against the float32 authors' path"
    del reference, ref_loss
    for x in problem.leaves:
        x.grad = None

    flops = 6 * shape.rows * shape.vocab * shape.hidden
    for provider, loss_fn in STUDENT_PROVIDERS.items():
        fn = lambda loss_fn=loss_fn: loss_fn(problem).backward()
        fn()  # compile / autotune outside the timed region
        ms = time_ms(fn, grad_to_none=list(problem.leaves))
        bench_recorder.add(op=op, mode="fwd+bwd", shape=shape.id, provider=provider, ms=ms,
                           peak_mib=peak_mib(fn, problem.leaves), tflops=flops / (ms[0] * 1e-3) / 1e12)


def _ours_ce(implementation: str):
    from tide_ds.losses.fused_head import fused_masked_ce

    def ce(h, w, y, rows):
        coeff = rows.float() / rows.sum().clamp_min(1)
        return fused_masked_ce(h, w, y, coeff, implementation=implementation)[0]

    return ce


def _ce_providers() -> dict:
    providers = {"triton": _ours_ce("triton"), "chunked": _ours_ce("pytorch")}
    for name, available, fn in (("liger_flce", liger_available, liger_flce), ("cce", cce_available, cce_ce)):
        reason = available()
        if reason is None:
            providers[name] = fn
        else:
            print(f"student_ce: provider {name} skipped: {reason}")
    return providers


@pytest.mark.parametrize("shape", STUDENT_LOSS_SHAPES, ids=lambda s: s.id)
def test_bench_student_ce_vs_peers(shape: HeadShape, bench_recorder) -> None:
    """Mean CE over the masked x_t rows, fwd+bwd: ours against Liger's FLCE and Cut Cross-Entropy."""
    op = "student_ce"
    providers = _ce_providers()
    peers = tuple(name for name in ("liger_flce", "cce") if name in providers)
    bench_recorder.set_baselines(op, peers)
    size = {"batch": shape.batch, "seq_len": shape.seq_len, "hidden": shape.hidden, "vocab": shape.vocab}
    p = student_problem(**size, dtype=DTYPE, device=bench_device())
    h = p.hidden_B2LD[:, : shape.seq_len].flatten(0, 1).detach().requires_grad_()
    w, y, rows = p.weight_VD, p.x0_BL.flatten(), p.masked_BL.flatten()
    values = {}
    for name, fn in providers.items():  # the same loss from every provider, on the same inputs
        values[name] = fn(h, w, y, rows).item()
    ref = values["triton"]
    for name, value in values.items():
        assert abs(value - ref) <= 1e-2 * abs(ref), f"{name} gives {value}, ours {ref}"
    flops = 6 * shape.rows * shape.vocab * shape.hidden
    for provider, fn in providers.items():
        call = lambda fn=fn: fn(h, w, y, rows).backward()
        call()
        ms = time_ms(call, grad_to_none=[h, w])
        bench_recorder.add(op=op, mode="fwd+bwd", shape=shape.id, provider=provider, ms=ms,
                           peak_mib=peak_mib(call, (h, w)), tflops=flops / (ms[0] * 1e-3) / 1e12)


TEACHER_PROVIDERS = {
    "triton": lambda h, w, y, rows: fused_teacher_logprobs(h, w, y, rows, implementation="triton"),
    "authors": lambda h, w, y, rows: authors_teacher_logprobs(h, w, y),
    "chunked": lambda h, w, y, rows: fused_teacher_logprobs(h, w, y, rows, implementation="pytorch"),
    "authors_compiled": lambda h, w, y, rows: _compiled(authors_teacher_logprobs)(h, w, y),
}


@pytest.mark.parametrize("shape", TEACHER_LOGPROB_SHAPES, ids=lambda s: s.id)
@torch.no_grad()
def test_bench_teacher_logprobs(shape: HeadShape, bench_recorder) -> None:
    op = "teacher_logprobs"
    bench_recorder.set_baselines(op, ("authors", "authors_compiled"))
    size = {"batch": shape.batch, "seq_len": shape.seq_len, "hidden": shape.hidden, "vocab": shape.vocab}
    h, w, y, rows = teacher_problem(**size, dtype=DTYPE, device=bench_device())

    ref = authors_teacher_logprobs(h.float(), w.float(), y)
    ours = TEACHER_PROVIDERS["triton"](h, w, y, rows)
    err = (ours - ref)[rows].abs().max().item()
    assert err < 2e-2 and (ours[~rows] == 0).all(), f"max abs error {err:.2e} against the float32 authors' path"
    del ref, ours

    flops = 2 * shape.rows * shape.vocab * shape.hidden
    for provider, logprobs in TEACHER_PROVIDERS.items():
        fn = lambda logprobs=logprobs: logprobs(h, w, y, rows)
        fn()
        ms = time_ms(fn)
        bench_recorder.add(op=op, mode="fwd", shape=shape.id, provider=provider, ms=ms, peak_mib=peak_mib(fn, ()),
                           tflops=flops / (ms[0] * 1e-3) / 1e12)


if DRY_RUN and not torch.cuda.is_available():
    # torch.compile on a CPU takes about a minute per graph here: the dry run checks the other providers.
    STUDENT_PROVIDERS.pop("authors_compiled")
    TEACHER_PROVIDERS.pop("authors_compiled")
