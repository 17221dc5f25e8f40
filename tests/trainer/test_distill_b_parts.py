"""The pieces of the pipeline-B step: pair propagation, row compaction, the student module on the lent teacher head."""

import torch

from tide_ds.trainer.objectives import _scatter_pairs, compact_rows


def test_scatter_pairs_is_a_masked_scatter():
    flags = torch.tensor([[True, False, True, True], [False, True, False, False]])
    pos = torch.tensor([[3, 5, 6, 0], [2, 4, -1, -1]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = _scatter_pairs(flags, pos, valid, 8)
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 3] = expected[0, 6] = True  # the invalid pair (index 0, flag True) writes nothing
    expected[1, 4] = True
    assert torch.equal(out, expected)


def test_scatter_pairs_invalid_pair_does_not_clear_position_zero():
    # A valid pair at teacher position 0 stays masked although invalid padding pairs also carry index 0
    # (the reference's unmasked scatter could overwrite it, docs/method.md §3.3 step 2).
    flags = torch.tensor([[True, False, False]])
    pos = torch.tensor([[0, 0, 0]])
    valid = torch.tensor([[True, False, False]])
    assert _scatter_pairs(flags, pos, valid, 4).tolist() == [[True, False, False, False]]


def test_compact_rows_keeps_selected_rows_in_order():
    rows = torch.arange(12).view(2, 6)
    other = rows + 100
    selected = torch.tensor([[False, True, False, True, True, False], [True, False, False, False, False, False]])
    r, o, sel = compact_rows(rows, other, selected_BN=selected)
    assert r.tolist() == [[1, 3, 4], [6, 7, 8]]
    assert o.tolist() == [[101, 103, 104], [106, 107, 108]]
    assert sel.tolist() == [[True, True, True], [True, False, False]]
    # every selected row survives, each once
    assert sorted(r[sel].tolist()) == sorted(rows[selected].tolist())


def test_compact_rows_with_nothing_selected_keeps_one_unselected_row():
    rows = torch.arange(6).view(2, 3)
    r, sel = compact_rows(rows, selected_BN=torch.zeros(2, 3, dtype=torch.bool))
    assert r.shape == (2, 1) and not sel.any()


def test_token_module_reads_teacher_rows_through_the_lent_head_once_per_forward():
    """TokenTargets carry the teacher's hidden rows and its head handle; the student module enters the handle
    exactly once per forward, and its loss and gradients are those of the row-logits path (teacher logits =
    hidden rows @ head^T), with the backward run after the head was handed back."""
    import contextlib

    import transformers

    from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
    from tide_ds.models.qwen3 import BD3LMStudent, build_student
    from tide_ds.trainer.student import TokenDistillModule, TokenTargets

    config = transformers.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    student = BD3LMStudent(build_student(config, seed=0), block_size=4)
    terms = (DivergenceTerm("tidal", "tidal", 1.0), DivergenceTerm("kl", "forward", 0.5),
             DivergenceTerm("kl_rev", "reverse", 0.25))
    module = TokenDistillModule(student, terms=terms, temperature=2.0, loss_implementation="pytorch")
    g = torch.Generator().manual_seed(4)
    b, length, n, d_t, shared = 2, 8, 5, 24, 80
    x_0 = torch.randint(0, 90, (b, length), generator=g)
    masked = torch.rand(b, length, generator=g) < 0.5
    x_t = torch.where(masked, torch.full_like(x_0, 95), x_0)
    rows = torch.stack([torch.randperm(length, generator=g)[:n] for _ in range(b)])
    selected = masked.gather(1, rows)
    t_hidden = torch.randn(b, n, d_t, generator=g)
    t_head = torch.randn(90, d_t, generator=g)  # the teacher's head; the handle lends its shared prefix
    lam, omega = torch.rand(b, generator=g), torch.rand(b, generator=g) + 0.5
    events = []

    @contextlib.contextmanager
    def lend_head():
        events.append("enter")
        yield t_head[:shared]
        events.append("exit")

    targets = TokenTargets(x_t=x_t, x_0=x_0, coeff=masked.float() / 3, rows=rows, selected=selected,
                           teacher_hidden=t_hidden, teacher_head=lend_head, lambda_B=lam, omega_B=omega)
    loss, terms_out, sums = module(targets)
    assert events == ["enter", "exit"] and sums == {}
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    hidden = student(x_t_BL=x_t, x_0_BL=x_0)  # the old path: teacher logits [N, V'] in float32
    ce, _ = module._masked_ce(hidden, targets)
    picked = hidden.gather(1, rows.unsqueeze(-1).expand(b, n, hidden.shape[-1])).flatten(0, 1)
    logits = t_hidden.flatten(0, 1) @ t_head[:shared].t()
    total, values = fused_head_divergence(picked, student.lm_head_weight, logits, selected.flatten(), terms,
                                          temperature=2.0, lam_N=lam[:, None].expand(b, n).flatten(),
                                          omega_N=omega[:, None].expand(b, n).flatten())
    (ce + total).backward()
    torch.testing.assert_close(loss, ce + total, rtol=1e-5, atol=1e-6)
    assert set(terms_out) == {"ce", "tidal", "kl", "kl_rev"}
    for key in values:
        torch.testing.assert_close(terms_out[key], values[key], rtol=1e-5, atol=1e-6)
    assert all(v > 0 for v in values.values())
    for got, ref in zip(grads, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
