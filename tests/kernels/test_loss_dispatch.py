"""``model.loss_implementation``: resolution, the one log line, and the equality of the two implementations
behind every entry point of :mod:`tide_ds.losses.fused_head` (Triton in the interpreter, float64)."""

from __future__ import annotations

import logging

import pytest
import torch

from tide_ds.losses import fused_head as dispatch
from tide_ds.losses.diffusion_ce import fused_linear_masked_ce
from tide_ds.teacher.forward import target_logprobs as teacher_target_logprobs


@pytest.mark.parametrize(
    "choice, device, expected",
    [("auto", "cpu", "pytorch"), ("auto", "cuda", "triton"), ("pytorch", "cuda", "pytorch"),
     ("reference", "cuda", "pytorch"), ("triton", "cuda", "triton"), ("triton", "cpu", "triton")],  # cpu + triton: the interpreter is on here
)
def test_resolve_loss_implementation(choice, device, expected):
    assert dispatch.resolve_loss_implementation(choice, torch.device(device)) == expected


@pytest.mark.any_device
def test_triton_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"model.loss_implementation='triton' needs a CUDA device.*runs on cpu"):
        dispatch.resolve_loss_implementation("triton", torch.device("cpu"))
    assert dispatch.resolve_loss_implementation("auto", torch.device("cpu")) == "pytorch"
    with pytest.raises(ValueError, match=r"model.loss_implementation='cuda' is not one of"):
        dispatch.resolve_loss_implementation("cuda", torch.device("cpu"))


@pytest.mark.any_device
def test_choice_is_logged_once(caplog):
    dispatch._logged_choices.clear()
    with caplog.at_level(logging.INFO, logger=dispatch.__name__):
        for _ in range(3):
            dispatch.resolve_loss_implementation("auto", torch.device("cpu"))
    expected = ("LM-head losses (student loss, teacher log-probs): pytorch implementation "
                "(model.loss_implementation=auto, device cpu)")
    assert [r.getMessage() for r in caplog.records] == [expected]


@pytest.mark.any_device
def test_old_name_reference_still_works_with_a_deprecation_message(caplog):
    """``reference`` was the tiled PyTorch path's name (it was never the naive reference): accepted, warned once."""
    dispatch._warn_deprecated.cache_clear()
    with pytest.warns(FutureWarning, match=r"model.loss_implementation='reference' is deprecated.*'pytorch'"):
        assert dispatch.resolve_loss_implementation("reference", torch.device("cpu")) == "pytorch"
    assert any("--model.loss_implementation=pytorch" in r.getMessage() for r in caplog.records)


def _inputs(n=37, d=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    coeff = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.6)
    coeff[0] = 0.25
    return h, w, y, coeff


def _grads(fn, h, w):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(h, w)
    (1.5 * out[0]).backward()
    return [x.detach() for x in out[:2]] + [h.grad, w.grad]


def test_fused_masked_ce_triton_matches_reference():
    """The CE path of the trainer (DiffusionCEModule): loss, nll_sum and both gradients."""
    h, w, y, c = _inputs()
    ref = _grads(lambda a, b: fused_linear_masked_ce(a, b, y, c), h, w)
    for impl in ("pytorch", "triton"):
        out = _grads(lambda a, b, impl=impl: dispatch.fused_masked_ce(a, b, y, c, implementation=impl), h, w)
        for name, r, o in zip(("loss", "nll_sum", "dh", "dw"), ref, out):
            torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10, msg=lambda m, n=f"{impl} {name}": f"{n}: {m}")


def test_fused_head_loss_dispatch():
    h, w, y, c = _inputs(seed=1)
    rows = c != 0

    def loss_fn(lp):
        ce = -(c * lp).sum()
        return ce + (lp**2).sum() * 0.1, {"ce": ce}

    outs = [_grads(lambda a, b, impl=impl: dispatch.fused_head_loss(a, b, y, rows, loss_fn, implementation=impl), h, w)
            for impl in ("pytorch", "triton")]
    for name, r, o in zip(("loss", "lp", "dh", "dw"), *outs):
        torch.testing.assert_close(o, r, atol=1e-10, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_teacher_target_logprobs_dispatch():
    """The teacher engine's entry point: float32 out, 0 on rows not needed, the same for both implementations."""
    h, w, y, c = _inputs(n=21, d=8, v=203, seed=2)
    rows = c != 0
    y[~rows] = -100  # ignore ids on rows not needed are harmless in both implementations
    ref = teacher_target_logprobs(h, w, y, rows, implementation="pytorch")
    tri = teacher_target_logprobs(h, w, y, rows, implementation="triton")
    assert ref.dtype == tri.dtype == torch.float32
    assert (tri[~rows] == 0).all()
    dense = torch.log_softmax(h @ w.t(), -1).gather(-1, y.clamp_min(0)[:, None])[:, 0] * rows
    torch.testing.assert_close(tri, dense.float())
    torch.testing.assert_close(tri, ref)


@pytest.mark.parametrize("entry", ["fused_masked_ce", "fused_head_loss"])
@pytest.mark.parametrize("impl", ["pytorch", "triton"])
def test_repeated_backward_rescales_the_stored_gradients(entry, impl):
    """The fused losses scale their stored gradients in place (one copy of dW at the peak); a second backward
    through the same forward (retain_graph) still gets exactly its own upstream factor."""
    h, w, y, c = _inputs(seed=3)

    def run(h, w):
        if entry == "fused_masked_ce":
            return dispatch.fused_masked_ce(h, w, y, c, implementation=impl)[0]
        return dispatch.fused_head_loss(h, w, y, c != 0, lambda lp: (-(c * lp).sum(), {}), implementation=impl)[0]

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = run(h1, w1)
    (2.0 * loss).backward(retain_graph=True)
    (-3.0 * loss).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    (-1.0 * run(h2, w2)).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-12, rtol=1e-12)
