"""The student and teacher LM-head loss paths every loss benchmark compares (GPU and CPU alike).

Legend: B batch, L student length (one copy; the model sees 2L), L_t teacher length, D hidden, V vocabulary,
C chunks per sample, N rows.

* ``authors_*``: the loss as the reference implementation computes it (docs/method.md §2.4, §5.1-§5.3,
  §15 items 16, 17, 21): LM head on *both* halves ``[B, 2L, V]`` cast to float32, CE by ``cross_entropy``
  on the masked rows of the x_t half, token log-probs by gather - logsumexp over the whole x_t half, chunk
  log-likelihoods by a ``bmm`` with the dense boolean alignment matrix ``[B, L, C]`` cast to the log-prob
  dtype, chunk probabilities clipped to ``[eps, 1 - eps]``, Reverse CALM in probability space, plain
  autograd. Teacher: full logits ``[B, L_t, V_t]`` in float32, log-softmax, gather.
* ``fused_*``: ours, :func:`tide_ds.losses.fused_head.fused_head_loss` with the trainer's loss function
  (CE + Reverse CALM on per-token chunk ids, log space), ``implementation`` ``reference`` (row tiles,
  PyTorch) or ``triton``; teacher: :func:`tide_ds.losses.fused_head.target_logprobs`.

Both student paths take the same inputs (hidden states of both halves, as the model returns them) and
return the same scalar up to the clip of the authors' path, which is inactive on these inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tide_ds.losses.calm import CHUNK_EPS, calm_loss, chunk_sums
from tide_ds.losses.fused_head import fused_head_loss, target_logprobs

__all__ = ["StudentProblem", "authors_student_loss", "authors_teacher_logprobs", "fused_student_loss",
           "fused_teacher_logprobs", "student_problem", "teacher_problem"]

TEMPERATURE = 5.0  # the paper's pipeline-A script (docs/method.md §5.2)


@dataclass
class StudentProblem:
    """Inputs of one student loss evaluation; ``hidden_B2LD`` and ``weight_VD`` are the leaves to differentiate."""

    hidden_B2LD: torch.Tensor
    weight_VD: torch.Tensor
    x0_BL: torch.Tensor
    masked_BL: torch.Tensor
    coeff_BL: torch.Tensor
    chunk_ids_BL: torch.Tensor
    align_BLC: torch.Tensor  # dense boolean alignment, the authors' layout (not used by the fused path)
    teacher_ll_BC: torch.Tensor
    active_BC: torch.Tensor

    @property
    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hidden_B2LD, self.weight_VD


def student_problem(
    *, batch: int, seq_len: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
    chunk_len: int = 2,
) -> StudentProblem:
    """Random inputs shaped like a pipeline-A batch: chunks of ``chunk_len`` tokens, half of them masked
    (chunk-consistent masking), the ELBO weight of a random t per sample, token-normalised CE."""
    g = torch.Generator().manual_seed(seed)
    num_chunks = seq_len // chunk_len
    chunk_ids = (torch.arange(seq_len) // chunk_len).expand(batch, seq_len)
    chunk_masked = torch.rand(batch, num_chunks, generator=g) < 0.5
    chunk_masked[:, 0] = True
    masked = chunk_masked.gather(1, chunk_ids)
    t = torch.rand(batch, 1, generator=g) * 0.9 + 0.1
    coeff = masked / t / masked.sum()
    hidden_B2LD = torch.randn(batch, 2 * seq_len, hidden, generator=g) / hidden**0.5 * 4
    weight_VD = torch.randn(vocab, hidden, generator=g) * 0.02 * 4
    teacher_ll = -torch.rand(batch, num_chunks, generator=g) * 20
    to = {"device": device}
    return StudentProblem(
        hidden_B2LD=hidden_B2LD.to(dtype=dtype, **to).requires_grad_(),
        weight_VD=weight_VD.to(dtype=dtype, **to).requires_grad_(),
        x0_BL=torch.randint(0, vocab, (batch, seq_len), generator=g).to(**to),
        masked_BL=masked.to(**to),
        coeff_BL=coeff.float().to(**to),
        chunk_ids_BL=torch.where(masked, chunk_ids, -1).to(**to),
        align_BLC=(F.one_hot(chunk_ids, num_chunks).bool() & masked[..., None]).to(**to),
        teacher_ll_BC=teacher_ll.to(**to),
        active_BC=chunk_masked.to(**to),
    )


def authors_student_loss(p: StudentProblem, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """CE + Reverse CALM the way the reference computes them (see the module docstring)."""
    seq_len = p.x0_BL.shape[1]
    logits = (p.hidden_B2LD @ p.weight_VD.t()).float()  # [B, 2L, V]: both halves, float32
    logits_xt = logits[:, :seq_len]
    masked = p.masked_BL
    ce = (F.cross_entropy(logits_xt[masked], p.x0_BL[masked], reduction="none") * p.coeff_BL[masked]).sum()
    lp = logits_xt.gather(-1, p.x0_BL.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits_xt, dim=-1)  # [B, L]
    student_ll = torch.bmm(lp.unsqueeze(1), p.align_BLC.to(lp.dtype)).squeeze(1)  # [B, C]
    s = torch.exp(student_ll / temperature).clamp(CHUNK_EPS, 1 - CHUNK_EPS)
    q = torch.exp(p.teacher_ll_BC / temperature).clamp(CHUNK_EPS, 1 - CHUNK_EPS)  # teacher side: an input here
    bce = -(s * torch.log(q) + (1 - s) * torch.log(1 - q))
    active = p.active_BC.to(bce.dtype)
    return ce + (bce * active).sum() / active.sum().clamp_min(1)


def fused_student_loss(p: StudentProblem, *, implementation: str, temperature: float = TEMPERATURE) -> torch.Tensor:
    """CE + Reverse CALM through the fused LM-head loss, as ``ChunkDistillModule`` calls it."""
    batch, seq_len = p.x0_BL.shape
    num_chunks = p.teacher_ll_BC.shape[1]
    hidden_ND = p.hidden_B2LD[:, :seq_len].flatten(0, 1)  # the x_t half only
    coeff_N = p.coeff_BL.flatten()

    def loss_fn(lp_N: torch.Tensor):
        ce = -(coeff_N.to(lp_N.dtype) * lp_N).sum()
        student_ll = chunk_sums(lp_N.view(batch, seq_len), p.chunk_ids_BL, num_chunks)
        calm = calm_loss(student_ll, p.teacher_ll_BC, p.active_BC, temperature=temperature, reverse=True)
        return ce + calm, {"ce": ce, "calm_rev": calm}

    loss, _, _ = fused_head_loss(hidden_ND, p.weight_VD, p.x0_BL.flatten(), p.masked_BL.flatten(), loss_fn,
                                 implementation=implementation)
    return loss


def teacher_problem(
    *, batch: int, seq_len: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher hidden states ``[B, L_t, D]``, LM head ``[V_t, D]``, clean ids ``[B, L_t]``, needed rows (half)."""
    g = torch.Generator().manual_seed(seed)
    hidden_BLD = torch.randn(batch, seq_len, hidden, generator=g) / hidden**0.5 * 4
    weight_VD = torch.randn(vocab, hidden, generator=g) * 0.02 * 4
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    rows = torch.rand(batch, seq_len, generator=g) < 0.5
    return hidden_BLD.to(device, dtype), weight_VD.to(device, dtype), targets.to(device), rows.to(device)


def authors_teacher_logprobs(hidden_BLD: torch.Tensor, weight_VD: torch.Tensor, targets_BL: torch.Tensor) -> torch.Tensor:
    """The reference's teacher side: full float32 logits ``[B, L_t, V_t]``, log-softmax, gather."""
    logits = (hidden_BLD @ weight_VD.t()).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets_BL.unsqueeze(-1)).squeeze(-1)


def fused_teacher_logprobs(
    hidden_BLD: torch.Tensor, weight_VD: torch.Tensor, targets_BL: torch.Tensor, rows_BL: torch.Tensor, *, implementation: str
) -> torch.Tensor:
    """Ours: target log-probs of the rows the loss needs, no ``[B, L_t, V_t]`` tensor."""
    lp = target_logprobs(hidden_BLD.flatten(0, 1), weight_VD, targets_BL.flatten(), rows_BL.flatten(),
                         implementation=implementation)
    return lp.view_as(rows_BL.float())
