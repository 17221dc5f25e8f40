"""Fused LM-head loss (docs/method.md §1.4, §5): Triton kernels against the float64 PyTorch references.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
stay small: N = 1/7/37 rows, D = 3/16, V = 5/101/1000, 16-wide tiles (odd sizes leave partial tiles on
every axis). Losses: CE only, CE + Reverse CALM (chunk sums of lp, so every token of a chunk receives the
chunk's coefficient), and CALM with the teacher equal to the student. The reference is the dense
``log_softmax`` + gather with ordinary autograd (float64), cross-checked against the tiled
:func:`tide_ds.losses.fused_head.fused_head_loss`. bf16 runs only on CUDA (the interpreter mis-handles
bf16 matmuls).
"""

from __future__ import annotations

import math

import pytest
import torch
from tide_kernels.fused_head import (
    dense_target_logprobs,
    fused_head_loss_pytorch,
    fused_head_loss_triton,
    target_logprobs_triton,
)

from tests.kernels.compile_check import assert_compiles_without_interpreter
from tests.tolerances import TOLERANCES
from tide_ds.losses.calm import CHUNK_EPS, calm_loss, chunk_sums

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# This op's rows of the one tolerance table (tests/tolerances.py).
TOL = {dtype: {"atol": tol.atol, "rtol": tol.rtol} for (op, dtype), tol in TOLERANCES.items() if op == "fused_head"}


def _inputs(generator, n, d, v, dtype, *, active=0.6, scale=1.0, device="cpu"):
    h = (torch.randn(n, d, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    w = torch.randn(v, d, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=generator).to(device)
    rows = (torch.rand(n, generator=generator) < active).to(device)
    return h, w, y, rows


def _ce_fn(rows):
    def loss_fn(lp):
        ce = -(lp * rows).sum() / rows.sum().clamp_min(1)
        return ce, {"ce": ce}

    return loss_fn


def _ce_calm_fn(rows, *, reverse=True, teacher_ll=None, num_chunks=4):
    n = rows.shape[0]
    chunk_ids = torch.where(rows, torch.arange(n, device=rows.device) % num_chunks, -1).view(1, -1)
    active = torch.ones(1, num_chunks, dtype=torch.bool, device=rows.device)

    def loss_fn(lp):
        ce = -(lp * rows).sum() / rows.sum().clamp_min(1)
        ll = chunk_sums(lp.view(1, -1), chunk_ids, num_chunks)
        t_ll = ll.detach() if teacher_ll is None else teacher_ll.to(ll.dtype)
        calm = calm_loss(ll, t_ll, active, temperature=2.0, reverse=reverse)
        return ce + 0.5 * calm, {"ce": ce, "calm": calm}

    return loss_fn


def _run(fn, h, w, y, rows, loss_fn, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, lp, terms = fn(h, w, y, rows, loss_fn, **kw)
    loss.backward()
    return loss.detach(), lp, terms, h.grad, w.grad


def _dense(h, w, y, rows, loss_fn):
    h64, w64 = (x.detach().to(torch.float64).requires_grad_() for x in (h, w))
    lp = dense_target_logprobs(h64, w64, y, rows)
    loss, terms = loss_fn(lp)
    loss.backward()
    return loss.detach(), lp.detach(), {k: v.detach() for k, v in terms.items()}, h64.grad, w64.grad


def _check(ref, out, dtype):
    tol = TOL[dtype]
    for name, r, o in zip(("loss", "lp", "terms", "dh", "dw"), ref, out):
        if name == "terms":
            assert r.keys() == o.keys()
            for k in r:
                torch.testing.assert_close(o[k].double(), r[k], **tol, msg=lambda m, k=k: f"term {k}: {m}")
            continue
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
        torch.testing.assert_close(o.double(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")


SHAPES = [(1, 3, 5), (7, 16, 101), (37, 3, 1000), (37, 16, 101)]


@pytest.mark.parametrize("n,d,v", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce_matches_dense_reference(generator, n, d, v, dtype):
    h, w, y, rows = _inputs(generator, n, d, v, dtype)
    rows[0] = True
    loss_fn = _ce_fn(rows)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    _check(_dense(h, w, y, rows, loss_fn), out, dtype)
    assert out[0].dtype == out[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out[3].dtype == dtype and out[4].dtype == dtype
    assert (out[1][~rows] == 0).all()


@pytest.mark.parametrize("n,d,v", [(37, 16, 101), (7, 3, 1000)], ids=lambda x: str(x))
@pytest.mark.parametrize("reverse", [True, False], ids=["reverse_calm", "calm"])
def test_ce_plus_calm_matches_references(generator, n, d, v, reverse):
    h, w, y, rows = _inputs(generator, n, d, v, torch.float64)
    rows[:2] = True
    teacher_ll = -torch.rand(1, 4, generator=generator, dtype=torch.float64) * 3
    loss_fn = _ce_calm_fn(rows, reverse=reverse, teacher_ll=teacher_ll)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    _check(_dense(h, w, y, rows, loss_fn), out, torch.float64)
    # The plain-PyTorch tiled path (implementation="pytorch") gives the same.
    _check(tuple(x for x in _run(fused_head_loss_pytorch, h, w, y, rows, loss_fn)), out, torch.float64)
    ref_impl = _run(fused_head_loss_triton, h, w, y, rows, loss_fn, implementation="pytorch")
    _check(ref_impl, out, torch.float64)


def test_calm_teacher_equals_student(generator):
    """Teacher log-likelihoods equal to the student's: Reverse CALM still pushes by -s/T logit(q), finite."""
    h, w, y, rows = _inputs(generator, 19, 16, 101, torch.float64, active=1.0)
    with torch.no_grad():
        lp = dense_target_logprobs(h, w, y, rows)
    teacher_ll = chunk_sums(lp.view(1, -1), (torch.arange(19) % 4).view(1, -1), 4)
    for reverse in (True, False):
        loss_fn = _ce_calm_fn(rows, reverse=reverse, teacher_ll=teacher_ll)
        out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
        _check(_dense(h, w, y, rows, loss_fn), out, torch.float64)


def test_no_active_chunk(generator):
    """Rows are masked but no chunk is active: the CALM term is 0 and the gradients are CE's alone."""
    h, w, y, rows = _inputs(generator, 19, 16, 101, torch.float64, active=1.0)
    chunk_ids = (torch.arange(19) % 4).view(1, -1)
    teacher_ll = -torch.rand(1, 4, generator=generator, dtype=torch.float64) * 3
    inactive = torch.zeros(1, 4, dtype=torch.bool)

    def loss_fn(lp):
        ce = -(lp * rows).sum() / rows.sum()
        calm = calm_loss(chunk_sums(lp.view(1, -1), chunk_ids, 4), teacher_ll, inactive, temperature=2.0, reverse=True)
        return ce + calm, {"ce": ce, "calm": calm}

    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    _check(_dense(h, w, y, rows, loss_fn), out, torch.float64)
    assert out[2]["calm"].item() == 0.0
    ce_only = _run(fused_head_loss_triton, h, w, y, rows, _ce_fn(rows))
    torch.testing.assert_close(out[3], ce_only[3], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[4], ce_only[4], atol=1e-12, rtol=1e-12)


def _bounded_gradient_case(generator, *, reverse: bool):
    """W = I (V = D), so the kernel's dh *is* dL/dlogits. Logits of +-25 make chunks the student is sure of
    (s -> 1) and chunks it finds implausible (s -> 0); the teacher is sure yes, sure no, or undecided."""
    v = n = 24
    num_chunks, temperature = 6, 2.0
    w = torch.eye(v, dtype=torch.float64)
    y = torch.randperm(v, generator=generator)
    h = torch.randn(n, v, generator=generator, dtype=torch.float64)
    chunk_ids = (torch.arange(n) % num_chunks).view(1, -1)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[chunk_ids[0]]
    h[torch.arange(n), y] = 25.0 * sign  # the target logit: far above or far below the others
    teacher_ll = torch.tensor([[-1e-9, -1e-9, -300.0, -300.0, -temperature * 0.6931, -2.0]], dtype=torch.float64)
    rows = torch.ones(n, dtype=torch.bool)
    active = torch.ones(1, num_chunks, dtype=torch.bool)

    def loss_fn(lp):
        ll = chunk_sums(lp.view(1, -1), chunk_ids, num_chunks)
        term = calm_loss(ll, teacher_ll, active, temperature=temperature, reverse=reverse)
        return term, {"calm": term}

    return h, w, y, rows, loss_fn, temperature, num_chunks


def _token_coefficients(out, y):
    """g_n = dL/dlp_n recovered from the kernel's dh = dL/dlogits (W = I): dlogits[n, y_n] = g_n (1 - p_n)."""
    _, lp, _, dh, _ = out
    return dh.gather(-1, y[:, None])[:, 0] / -torch.expm1(lp)


def test_reverse_calm_gradient_is_bounded_in_the_kernel(generator):
    """docs/method.md §5.4: |dB/dl| <= log((1 - eps) / eps) / T for Reverse CALM whatever the student, and every token of a
    chunk receives its chunk's coefficient (here / C, the mean over active chunks). The kernel's gradients equal
    the reference's, the coefficients they carry respect the bound and reach it where student and teacher are
    both sure; forward CALM on the same inputs exceeds it by orders of magnitude (its 1 / (1 - s))."""
    h, w, y, rows, loss_fn, temperature, num_chunks = _bounded_gradient_case(generator, reverse=True)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    _check(_dense(h, w, y, rows, loss_fn), out, torch.float64)
    bound = math.log((1 - CHUNK_EPS) / CHUNK_EPS) / temperature / num_chunks
    g = _token_coefficients(out, y)
    assert torch.isfinite(g).all() and g.abs().max().item() <= bound * (1 + 1e-6), (g.abs().max().item(), bound)
    assert g.abs().max().item() >= 0.99 * bound  # s ~ 1 and q at its clip: the bound is attained
    assert out[3].abs().sum(dim=-1).max().item() <= 2 * bound  # hence every row of dL/dlogits too

    h, w, y, rows, loss_fn, *_ = _bounded_gradient_case(generator, reverse=False)
    forward = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    dense = _dense(h, w, y, rows, loss_fn)
    # Here dlogits = g (1 - p) with 1 - p ~ 1e-10 formed by a subtraction in either implementation (from two
    # softmax formulas), so its relative precision is ~1e-16 / 1e-10: compare by relative RMS error at 1e-6.
    for r, o in ((dense[3], forward[3]), (dense[4], forward[4])):
        assert ((o - r).norm() / r.norm()).item() < 1e-6
    assert _token_coefficients(forward, y).abs().max().item() > 1e3 * bound


def test_no_active_rows_gives_zero_gradients(generator):
    h, w, y, rows = _inputs(generator, 7, 16, 101, torch.float64)
    rows[:] = False
    y[0] = -100  # an ignore id on a row not needed is harmless
    loss, lp, terms, dh, dw = _run(fused_head_loss_triton, h, w, y, rows, _ce_fn(rows))
    assert loss.item() == 0.0 and (lp == 0).all() and terms["ce"].item() == 0.0
    assert (dh == 0).all() and (dw == 0).all()


def test_one_row(generator):
    h, w, y, rows = _inputs(generator, 1, 16, 1000, torch.float64, active=1.0)
    loss_fn = _ce_fn(rows)
    _check(_dense(h, w, y, rows, loss_fn), _run(fused_head_loss_triton, h, w, y, rows, loss_fn), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits(generator, dtype):
    """Logits of order 1e4 (large hidden states): online log-sum-exp must not overflow, no NaN."""
    h, w, y, rows = _inputs(generator, 7, 16, 101, dtype, active=1.0, scale=3e3)
    loss_fn = _ce_fn(rows)
    ref = _dense(h, w, y, rows, loss_fn)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    # With logits ~1e4, fp32 rounds every logit to ~1e-3 absolute, so compare relative to the scale.
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-1, "rtol": 1e-4}
    for r, o in zip((ref[0], ref[1], ref[3], ref[4]), (out[0], out[1], out[3], out[4])):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, **tol)


def test_tied_weights_and_strided_hidden(generator):
    """The LM head is the embedding (one tensor used twice) and hidden is a transposed view."""
    v, d, n = 101, 16, 13
    emb = torch.randn(v, d, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, v, (n,), generator=generator)
    base = torch.randn(d, n, generator=generator, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=generator)
    rows = torch.rand(n, generator=generator) < 0.7
    rows[0] = True

    def run(fn):
        w = emb.clone().requires_grad_()
        hb = base.clone().requires_grad_()
        h = hb.t() + w[ids]  # strided [N, D], and the same weight enters through the embedding
        loss, lp, _ = fn(h, w, y, rows, _ce_fn(rows))
        loss.backward()
        return loss.detach(), lp, hb.grad, w.grad

    def dense(h, w, y, rows, loss_fn):
        lp = dense_target_logprobs(h, w, y, rows)
        return loss_fn(lp)[0], lp.detach(), {}

    ref, out = run(dense), run(fused_head_loss_triton)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r.detach(), atol=1e-10, rtol=1e-10)


def test_target_logprobs_matches_dense(generator):
    h, w, y, rows = _inputs(generator, 37, 3, 1000, torch.float64)
    lp = target_logprobs_triton(h, w, y, rows)
    torch.testing.assert_close(lp, dense_target_logprobs(h, w, y, rows), atol=1e-12, rtol=1e-12)
    assert not lp.requires_grad


def test_weight_only_or_hidden_only_gradient(generator):
    h, w, y, rows = _inputs(generator, 7, 16, 101, torch.float64)
    rows[0] = True
    ref = _dense(h, w, y, rows, _ce_fn(rows))
    hh = h.clone().requires_grad_()
    fused_head_loss_triton(hh, w, y, rows, _ce_fn(rows))[0].backward()
    torch.testing.assert_close(hh.grad, ref[3], atol=1e-10, rtol=1e-10)
    ww = w.clone().requires_grad_()
    fused_head_loss_triton(h, ww, y, rows, _ce_fn(rows))[0].backward()
    torch.testing.assert_close(ww.grad, ref[4], atol=1e-10, rtol=1e-10)


def test_upstream_gradient_scales(generator):
    h, w, y, rows = _inputs(generator, 7, 16, 101, torch.float64)
    rows[0] = True
    ref = _dense(h, w, y, rows, _ce_fn(rows))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    (2.5 * fused_head_loss_triton(hh, ww, y, rows, _ce_fn(rows))[0]).backward()
    torch.testing.assert_close(hh.grad, 2.5 * ref[3], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ww.grad, 2.5 * ref[4], atol=1e-10, rtol=1e-10)


def test_forced_tile_shapes(generator):
    """Tiles wider than the problem and narrow D tiles give the same answer (block_config bypasses autotune)."""
    h, w, y, rows = _inputs(generator, 7, 40, 101, torch.float64)
    rows[0] = True
    loss_fn = _ce_fn(rows)
    ref = _dense(h, w, y, rows, loss_fn)
    for cfg in ({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 16}, {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_D": 32}):
        _check(ref, _run(fused_head_loss_triton, h, w, y, rows, loss_fn, block_config=cfg), torch.float64)


def test_gradcheck_tiny():
    g = torch.Generator().manual_seed(0)
    h, w, y, rows = _inputs(g, 3, 3, 5, torch.float64, active=1.0)
    loss_fn = _ce_calm_fn(rows, teacher_ll=-torch.rand(1, 4, generator=g, dtype=torch.float64), num_chunks=4)
    fn = lambda hh, ww: fused_head_loss_triton(hh, ww, y, rows, loss_fn)[0]
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_()), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(hidden=a["hidden"][None]), "2-D"),
        (lambda a: a.update(weight=a["weight"][:, :3]), "hidden size"),
        (lambda a: a.update(weight=a["weight"].float()), "one dtype"),
        (lambda a: a.update(hidden=a["hidden"].int(), weight=a["weight"].int()), "not supported"),
        (lambda a: a.update(targets=a["targets"].float()), "targets"),
        (lambda a: a.update(targets=a["targets"][:3]), "targets"),
        (lambda a: a.update(rows=a["rows"][:3]), "rows"),
        (lambda a: a.update(implementation="cuda"), "implementation"),
    ],
)
@pytest.mark.any_device
def test_invalid_inputs_raise(generator, mutate, match):
    h, w, y, rows = _inputs(generator, 7, 16, 101, torch.float64)
    args = {"hidden": h, "weight": w, "targets": y, "rows": rows, "implementation": "triton"}
    mutate(args)
    with pytest.raises(ValueError, match=match):
        fused_head_loss_triton(
            args["hidden"], args["weight"], args["targets"], args["rows"], _ce_fn(rows), implementation=args["implementation"]
        )


@pytest.mark.any_device
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_dtypes(dtype):
    g = torch.Generator().manual_seed(0)
    h, w, y, rows = _inputs(g, 300, 128, 5000, dtype, device="cuda")
    loss_fn = _ce_calm_fn(rows)
    ref = _dense(h, w, y, rows, loss_fn)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    tol = TOL[dtype]
    for name, r, o in zip(("loss", "lp", "dh", "dw"), (ref[0], ref[1], ref[3], ref[4]), (out[0], out[1], out[3], out[4])):
        r, o = r.double(), o.double()
        assert torch.isfinite(o).all(), name
        rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert rel < tol["rtol"], f"{name}: relative error {rel:.2e}"


@pytest.mark.any_device
@needs_cuda
@pytest.mark.parametrize("case", ["one_row", "no_active_rows", "extreme_logits", "reverse_calm_teacher_equals_student"])
def test_edge_cases_cuda(case):
    """CONTRIBUTING.md §4's edge cases through the compiled kernels (float32) against the float64 dense reference."""
    g = torch.Generator().manual_seed(0)
    n, d, v, scale = (1, 64, 5000, 1.0) if case == "one_row" else (97, 64, 5000, 3e2 if case == "extreme_logits" else 1.0)
    h, w, y, rows = _inputs(g, n, d, v, torch.float32, active=0.0 if case == "no_active_rows" else 0.7, scale=scale,
                            device="cuda")
    if case == "one_row":
        rows[:] = True
    if case == "reverse_calm_teacher_equals_student":
        rows[:] = True
        with torch.no_grad():
            lp = dense_target_logprobs(h, w, y, rows)
        teacher_ll = chunk_sums(lp.view(1, -1), (torch.arange(n, device="cuda") % 4).view(1, -1), 4)
        loss_fn = _ce_calm_fn(rows, teacher_ll=teacher_ll)
    else:
        loss_fn = _ce_fn(rows)
    ref = _dense(h, w, y, rows, loss_fn)
    out = _run(fused_head_loss_triton, h, w, y, rows, loss_fn)
    for name, r, o in zip(("loss", "lp", "dh", "dw"), (ref[0], ref[1], ref[3], ref[4]), (out[0], out[1], out[3], out[4])):
        assert torch.isfinite(o).all(), name
        if case == "no_active_rows":
            assert (o == 0).all(), name
            continue
        rel = ((o.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert rel < (1e-2 if case == "extreme_logits" else 5e-5), f"{case} {name}: relative error {rel:.2e}"


def _compile_for_sm90() -> None:
    """Compile both kernels (first GPU config, bf16) for sm_90 without a GPU, interpreter off."""
    import triton
    import triton.language as tl
    from tide_kernels.fused_head import kernel as kernel_module
    from triton.backends.compiler import GPUTarget

    def compile_kernel(fn, config, consts):
        consts = {**consts, **config.kwargs}
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name == "tgt_ptr":
                signature[name] = "*i64"
            elif name == "rows_ptr":
                signature[name] = "*i8"
            elif name in ("lse_ptr", "lp_ptr", "g_ptr", "dh_ptr", "dw_ptr"):
                signature[name] = "*fp32"
            else:
                signature[name] = "*bf16" if name.endswith("_ptr") else "i32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    common = {"ACC_DTYPE": tl.float32, "DOT_PRECISION": "tf32"}
    for kernel, extra in ((kernel_module._lse_fwd_kernel, {}), (kernel_module._grad_kernel, {"NEED_DH": True, "NEED_DW": True})):
        compiled = compile_kernel(kernel.fn, kernel.configs[0], {**common, **extra})
        assert compiled.metadata.shared <= 228 * 1024, (kernel.fn.__name__, compiled.metadata.shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the compiled kernels")
def test_fused_head_compiles_for_sm90() -> None:
    """The GPU path at least compiles (types, layouts, shared memory) on a machine without a GPU."""
    assert_compiles_without_interpreter("tests.kernels.test_fused_head")
