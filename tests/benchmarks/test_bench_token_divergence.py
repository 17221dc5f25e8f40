"""Pipeline-B token divergence benchmark (forward KL at T = 2, forward+backward) at the paper's shape (``shapes.py``).

Providers, on the same inputs (student rows + head, teacher rows + head, shared prefix V'):
    triton:     ours, :func:`tide_ds.losses.token_divergence.token_divergences` with the Triton kernels (the
                default on GPUs): online log-sum-exp of both models over vocabulary tiles, no ``[N, V']``;
    chunked:    ours in PyTorch tiles (``--model.loss_implementation=pytorch``);
    logits:     the path before issue 17: the teacher's float32 row logits ``[N, V']``, then the LM-head-fused
                student divergence (:func:`tide_ds.losses.fused_divergence.fused_head_divergence`);
    liger_jsd:  Liger-Kernel's fused linear JSD at beta = 0 (forward KL; ``peers.py``), both heads sliced to V'.

TFLOP/s counts the same useful work for every provider: both logits ``2 N V' (D_s + D_t)`` and the student's
gradients ``4 N V' D_s``. Peak memory: allocator peak above the inputs (gradients included). Speed-ups and
memory ratios are reported against Liger (the peer) and the logits path. Ours is first checked against the
logits path in float32 on the same inputs.

Run: ``python -m pytest -m bench -s tests/benchmarks/test_bench_token_divergence.py``.
"""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.harness import BENCH_MARKS, bench_device, peak_mib, time_ms
from tests.benchmarks.peers import liger_available, liger_jsd, liger_jsd_name
from tests.benchmarks.shapes import TOKEN_DIVERGENCE_SHAPES, DivergenceShape

pytestmark = BENCH_MARKS

DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
TEMPERATURE = 2.0


def _problem(shape: DivergenceShape, dtype: torch.dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(shape.rows, shape.hidden, generator=g) / shape.hidden**0.5 * 4
    sw = torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02 * 4
    th = torch.randn(shape.rows, shape.teacher_hidden, generator=g) / shape.teacher_hidden**0.5 * 4
    tw = torch.randn(shape.teacher_vocab, shape.teacher_hidden, generator=g) * 0.02 * 4
    return (sh.to(device, dtype).requires_grad_(), sw.to(device, dtype).requires_grad_(), th.to(device, dtype),
            tw.to(device, dtype))


def _ours(implementation: str):
    from tide_ds.losses.fused_divergence import DivergenceTerm
    from tide_ds.losses.token_divergence import token_divergences

    terms = (DivergenceTerm("kl", "forward"),)

    def loss(sh, sw, th, tw, shared):
        selected = torch.ones(sh.shape[0], dtype=torch.bool, device=sh.device)
        return token_divergences(sh, sw, th, tw, selected, terms, temperature=TEMPERATURE, shared_vocab_size=shared,
                                 implementation=implementation)[0]

    return loss


def _logits_path(sh, sw, th, tw, shared):
    from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
    from tide_ds.teacher.forward import row_logits

    logits = row_logits(th[None], tw, torch.arange(th.shape[0], device=th.device)[None], vocab_limit=shared)[0]
    selected = torch.ones(sh.shape[0], dtype=torch.bool, device=sh.device)
    return fused_head_divergence(sh, sw, logits, selected, (DivergenceTerm("kl", "forward"),), temperature=TEMPERATURE)[0]


def _providers() -> dict:
    providers = {"triton": _ours("triton"), "chunked": _ours("pytorch"), "logits": _logits_path}
    reason = liger_available()
    if reason is None:
        providers[liger_jsd_name(TEMPERATURE)] = lambda sh, sw, th, tw, shared: liger_jsd(
            sh, sw, th, tw, vocab=shared, temperature=TEMPERATURE)
    else:
        print(f"token_divergence: provider liger_jsd skipped: {reason}")
    return providers


@pytest.mark.parametrize("shape", TOKEN_DIVERGENCE_SHAPES, ids=lambda s: s.id)
def test_bench_token_divergence(shape: DivergenceShape, bench_recorder) -> None:
    op = "token_divergence"
    providers = _providers()
    peers = tuple(name for name in providers if name.startswith("liger"))
    bench_recorder.set_baselines(op, (*peers, "logits"))
    device = bench_device()
    sh, sw, th, tw = _problem(shape, DTYPE, device)

    # Correctness at the benchmark shape: ours on the benchmark inputs against the logits path in float32.
    ref_inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in (sh, sw, th, tw)]
    ref = _logits_path(*ref_inputs, shape.shared)
    ref.backward()
    ours = providers["triton"](sh, sw, th, tw, shape.shared)
    ours.backward()
    assert abs(ours.item() - ref.item()) <= 2e-2 * abs(ref.item()), (ours.item(), ref.item())
    for name, r, o in (("dh", ref_inputs[0], sh), ("dW", ref_inputs[1], sw)):
        rel = ((o.grad.double() - r.grad.double()).norm() / r.grad.double().norm().clamp_min(1e-30)).item()
        assert rel < 5e-2, f"{name}: relative RMS error {rel:.2e} against the float32 logits path"
    del ref_inputs, ref
    sh.grad = sw.grad = None

    flops = 2 * shape.rows * shape.shared * (shape.hidden + shape.teacher_hidden) + 4 * shape.rows * shape.shared * shape.hidden
    for provider, fn in providers.items():
        call = lambda fn=fn: fn(sh, sw, th, tw, shape.shared).backward()
        call()  # compile / autotune outside the timed region
        ms = time_ms(call, grad_to_none=[sh, sw])
        bench_recorder.add(op=op, mode="fwd+bwd", shape=shape.id, provider=provider, ms=ms,
                           peak_mib=peak_mib(call, (sh, sw)), tflops=flops / (ms[0] * 1e-3) / 1e12)
