"""The fused token divergences (both models' rows and heads, no [N, V'] logits) against the dense naive
reference: float64, odd shapes, small tiles so that every loop runs several times; both implementations
(Triton in its CPU interpreter, and the tiled PyTorch path); gradcheck; edge cases; input errors."""

from __future__ import annotations

import pytest
import torch
from tide_kernels.fused_divergence import dense_token_divergences, fused_token_divergence
from tide_kernels.fused_divergence.pytorch import divergence_sweeps_pytorch

from tests.tolerances import TOLERANCES, assert_close

F64 = torch.float64
EXACT = {"atol": TOLERANCES[("token_divergence", F64)].atol, "rtol": TOLERANCES[("token_divergence", F64)].rtol}
# Small tiles: several row tiles, vocabulary tiles and hidden slices on the odd test shapes.
BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_D": 16}
IMPLS = ("triton", "pytorch")


def _problem(n, ds, dt, v, vt, *, seed, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    sh = (scale * torch.randn(n, ds, generator=g, dtype=F64)).to(dtype).requires_grad_()
    sw = (0.5 * torch.randn(v, ds, generator=g, dtype=F64)).to(dtype).requires_grad_()
    th = (scale * torch.randn(n, dt, generator=g, dtype=F64)).to(dtype)
    tw = (0.5 * torch.randn(vt, dt, generator=g, dtype=F64)).to(dtype)
    coeff = torch.rand(n, 3, generator=g, dtype=F64) + 0.1
    lam = torch.rand(n, generator=g, dtype=F64)
    return sh, sw, th, tw, coeff, lam


def _fused(impl, sh, sw, th, tw, coeff, lam, *, vocab, temperature):
    return fused_token_divergence(sh, sw, th, tw, coeff, lam, vocab=vocab, temperature=temperature, implementation=impl,
                                  chunk_rows=5, vocab_tile=16, block_config=BLOCKS if impl == "triton" else None)


def _grads(fn, sh, sw):
    sh.grad = sw.grad = None
    total, div = fn()
    (1.3 * total).backward()
    return total.detach(), div, sh.grad.clone(), sw.grad.clone()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "n,ds,dt,v,vt,vocab,temperature",
    [(1, 3, 5, 7, 9, 5, 1.0), (21, 17, 33, 53, 61, 47, 2.0), (19, 24, 9, 40, 40, 40, 0.7)],
    ids=["one-row", "odd-prefix", "full-vocab-T0.7"],
)
def test_matches_dense_reference_float64(impl, n, ds, dt, v, vt, vocab, temperature):
    sh, sw, th, tw, coeff, lam = _problem(n, ds, dt, v, vt, seed=n * 7 + v)

    def dense():
        div = dense_token_divergences(sh, sw, th, tw, lam, temperature=temperature, vocab=vocab)
        return (coeff * div).sum(), div.detach()

    ref = _grads(dense, sh, sw)
    out = _grads(lambda: _fused(impl, sh, sw, th, tw, coeff, lam, vocab=vocab, temperature=temperature), sh, sw)
    for name, r, o in zip(("total", "div", "dh", "dw"), ref, out):
        torch.testing.assert_close(o, r, **EXACT, msg=lambda m, name=name: f"{impl} {name}: {m}")
    assert torch.count_nonzero(out[3][vocab:]) == 0  # no gradient beyond the shared prefix


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("column", [0, 1, 2], ids=["forward", "reverse", "tidal"])
def test_each_divergence_alone(impl, column):
    sh, sw, th, tw, coeff, lam = _problem(13, 11, 7, 37, 37, seed=column)
    coeff = torch.zeros_like(coeff)
    coeff[:, column] = torch.linspace(0.2, 1.0, 13, dtype=F64)

    def dense():
        div = dense_token_divergences(sh, sw, th, tw, lam, temperature=1.5, vocab=33)
        return (coeff * div).sum(), div.detach()

    ref = _grads(dense, sh, sw)
    out = _grads(lambda: _fused(impl, sh, sw, th, tw, coeff, lam, vocab=33, temperature=1.5), sh, sw)
    torch.testing.assert_close(out[0], ref[0], **EXACT)
    torch.testing.assert_close(out[1][:, column], ref[1][:, column], **EXACT)
    torch.testing.assert_close(out[2], ref[2], **EXACT)
    torch.testing.assert_close(out[3], ref[3], **EXACT)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_tiny_float64(impl):
    """Forward and reverse KL are true gradients. TIDAL's is not (its target r is detached by definition,
    docs/method.md §7.3), so its column is checked against the dense reference above, not by finite differences."""
    sh, sw, th, tw, coeff, lam = _problem(3, 4, 5, 9, 11, seed=5)
    coeff[:, 2] = 0

    def fn(h, w):
        return _fused(impl, h, w, th, tw, coeff, lam, vocab=7, temperature=1.7)[0]

    assert torch.autograd.gradcheck(fn, (sh, sw), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_active_rows_gives_zero_loss_and_gradient(impl):
    sh, sw, th, tw, coeff, lam = _problem(9, 6, 5, 20, 20, seed=6)
    total, div, dh, dw = _grads(lambda: _fused(impl, sh, sw, th, tw, torch.zeros_like(coeff), lam, vocab=20,
                                               temperature=2.0), sh, sw)
    assert total.item() == 0.0
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_teacher_equal_to_student_gives_zero(impl):
    sh, sw, _, _, coeff, lam = _problem(10, 8, 8, 30, 30, seed=7)
    total, div, dh, dw = _grads(lambda: _fused(impl, sh, sw, sh.detach(), sw.detach(), coeff, lam, vocab=30,
                                               temperature=2.0), sh, sw)
    assert div.abs().max().item() < 1e-14 and abs(total.item()) < 1e-13
    assert dh.abs().max().item() < 1e-14 and dw.abs().max().item() < 1e-14


@pytest.mark.parametrize("impl", IMPLS)
def test_float32_extreme_logits_stay_finite_and_close(impl):
    sh, sw, th, tw, coeff, lam = _problem(12, 16, 16, 48, 48, seed=8, scale=60.0, dtype=torch.float32)

    def dense():
        div = dense_token_divergences(sh, sw, th, tw, lam, temperature=2.0, vocab=48)
        return (coeff * div).sum(), div.detach()

    ref = _grads(dense, sh, sw)
    out = _grads(lambda: _fused(impl, sh, sw, th, tw, coeff, lam, vocab=48, temperature=2.0), sh, sw)
    for name, r, o in zip(("total", "div", "dh", "dw"), ref, out):
        assert_close(f"{impl} {name}", r, o, op="token_divergence", dtype=torch.float32)


def test_pytorch_path_visits_only_rows_with_a_coefficient_on_the_cpu():
    sh, sw, th, tw, coeff, lam = _problem(8, 5, 5, 12, 12, seed=9)
    coeff[::2] = 0
    div, dh, dw = divergence_sweeps_pytorch(sh.detach(), sw.detach(), th, tw, coeff, lam, temperature=1.0,
                                              rows_N=coeff.ne(0).any(1), vocab_tile=5, chunk_rows=3)
    ref = dense_token_divergences(sh, sw, th, tw, lam, temperature=1.0, vocab=12).detach()
    assert torch.count_nonzero(div[::2]) == 0 and torch.count_nonzero(dh[::2]) == 0
    torch.testing.assert_close(div[1::2], ref[1::2], **EXACT)


def test_bad_inputs_are_rejected_before_any_work():
    sh, sw, th, tw, coeff, lam = _problem(4, 3, 5, 7, 9, seed=10)
    cases = [
        (dict(vocab=8), "shared vocabulary V'=8"),
        (dict(t_hidden=th[:3]), "the same N"),
        (dict(t_weight=tw[:, :4]), "hidden sizes disagree"),
        (dict(coeff=coeff[:, :2]), r"must be \[N, 3\]"),
        (dict(temperature=0.0), "must be > 0"),
        (dict(implementation="cuda"), "is not one of"),
        (dict(s_weight=sw.detach().float()), "share a dtype"),
    ]
    for change, message in cases:
        args = dict(s_hidden=sh, s_weight=sw, t_hidden=th, t_weight=tw, coeff=coeff, lam=lam, vocab=5,
                    temperature=1.0, implementation="pytorch")
        args.update(change)
        with pytest.raises(ValueError, match=message):
            fused_token_divergence(args.pop("s_hidden"), args.pop("s_weight"), args.pop("t_hidden"), args.pop("t_weight"),
                                   args.pop("coeff"), args.pop("lam"), **args)


def test_heads_are_not_copied():
    """The op reads the heads through views: a bf16 teacher head is never converted as a whole (PyTorch path,
    traced allocations stay far below one float32 copy of the head)."""
    sh, sw, _, _, coeff, lam = _problem(4, 8, 8, 16, 16, seed=11)
    th = torch.randn(4, 64, dtype=torch.bfloat16)
    tw = torch.randn(20_000, 64, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fused_token_divergence(sh.detach().float(), sw.detach().float()[:16].expand(16, 8).contiguous(), th, tw,
                               coeff, lam, vocab=16, temperature=1.0, implementation="pytorch")
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < 20_000 * 64 * 4 // 100, largest


def test_empty_is_nan_filled_in_kernel_tests() -> None:
    """tests/kernels/conftest.py poisons torch.empty, so an unwritten kernel output cannot pass a comparison."""
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert torch.empty(2, dtype=torch.int64).dtype == torch.int64


@pytest.mark.any_device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_cuda(dtype):
    """The compiled kernels (autotuned GPU configs) against the float64 dense reference, on an odd shape."""
    sh, sw, th, tw, coeff, lam = _problem(333, 96, 160, 1531, 1600, seed=12)
    sh = sh.detach().cuda().to(dtype).requires_grad_()
    sw = sw.detach().cuda().to(dtype).requires_grad_()
    th, tw, coeff, lam = th.cuda().to(dtype), tw.cuda().to(dtype), coeff.cuda(), lam.cuda()
    ref64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (sh, sw)]
    div = dense_token_divergences(*ref64, th, tw, lam, temperature=2.0, vocab=1500)
    (coeff * div).sum().backward()
    total, out_div = fused_token_divergence(sh, sw, th, tw, coeff, lam, vocab=1500, temperature=2.0)
    total.backward()
    bound = 1e-4 if dtype == torch.float32 else 3e-2
    for name, r, o in (("div", div.detach(), out_div), ("dh", ref64[0].grad, sh.grad), ("dw", ref64[1].grad, sw.grad)):
        assert torch.isfinite(o).all(), name
        rel = ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert rel < bound, f"{dtype} {name}: relative error {rel:.2e}"
