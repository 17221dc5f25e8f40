"""What the lm-eval model classes ``tide_bd3lm`` (harness.py) and ``tide_teacher`` (teacher_harness.py) share.

* :func:`mc_nelbo`: the masked-diffusion NELBO of continuations given contexts, by Monte Carlo over
  timesteps, for any denoiser given as two functions (hidden states of a noisy batch, and the LM head).
  ``x_0 = context + continuation`` from position 0; one MC sample draws ``t ~ U[eps, 1)`` and masks each
  continuation token with probability ``1 - alpha(t)`` (context tokens never); its value is ``sum over
  masked tokens of w(t) * -log p(x_0 | x_t)``; the estimate averages ``mc_num`` samples. Every pair draws
  its noise on the CPU from its own generator seeded by ``seed`` and a hash of its tokens
  (:func:`request_seed`), so a value does not depend on batching, request order, device or the number
  of processes. ``is_greedy``: the continuation equals the argmax at every continuation position when all
  of them are masked at once.
* :class:`DiffusionLM`: lm-eval's ``LM`` with the data-parallel plumbing (``RANK``/``WORLD_SIZE`` from
  torchrun or accelerate, gloo on CPU, nccl on CUDA) and the ``loglikelihood`` /
  ``loglikelihood_rolling`` requests on top of a subclass's ``_nelbo(pairs)``.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tide_ds.eval's lm-eval model classes need lm-evaluation-harness; install it with "
        "pip install -e '.[eval]' (lm-eval==0.4.13)"
    ) from err

__all__ = ["DiffusionLM", "as_bool", "mc_nelbo", "register_model", "request_seed"]

Pair = tuple[Sequence[int], Sequence[int]]


def as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def request_seed(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    """The seed of one pair's noise: ``seed`` and the pair's tokens (sha256)."""
    digest = hashlib.sha256(f"{seed}|{list(context)}|{list(continuation)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def mc_nelbo(
    hidden: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    pairs: Sequence[Pair],
    *,
    device: torch.device | str,
    mask_id: int,
    mc_num: int,
    seed: int,
    schedule: str = "linear",
    time_epsilon: float = 1e-3,
    mc_batch_size: int = 1,
    width_multiple: int = 1,
) -> list[tuple[float, bool]]:
    """``(NELBO, is_greedy)`` per ``(context ids, continuation ids)`` pair (see the module docstring).

    Args:
        hidden: ``hidden(x_t [B, W], x_0 [B, W], valid [B, W] bool) -> [B, W, D]``, row i predicting token i.
            The pairs are right-padded with ``mask_id`` to a common width ``W`` (a multiple of
            ``width_multiple``); ``valid`` is False on that padding.
        head: ``head(hidden [N, D]) -> logits [N, V]``.
        mc_batch_size: MC samples run in one forward (the same noise, so the same value up to rounding).
    """
    from tide_ds.diffusion.schedules import get_schedule

    if mc_num <= 0:
        raise ValueError(f"mc_num={mc_num} must be > 0")
    if min(len(y) for _, y in pairs) == 0:
        raise ValueError("an empty continuation has no likelihood to estimate")
    sched = get_schedule(schedule)
    lengths = [len(c) + len(y) for c, y in pairs]
    width = -(-max(lengths) // width_multiple) * width_multiple
    rows = len(pairs)
    x0 = torch.full((rows, width), mask_id, dtype=torch.long)
    scored = torch.zeros((rows, width), dtype=torch.bool)
    valid = torch.zeros((rows, width), dtype=torch.bool)
    for r, (c, y) in enumerate(pairs):
        x0[r, : len(c) + len(y)] = torch.tensor([*c, *y], dtype=torch.long)
        scored[r, len(c): len(c) + len(y)] = True
        valid[r, : len(c) + len(y)] = True
    # noise: mc_num draws per row from the row's own stream (CPU, so it is the same on every device)
    ts = torch.empty((mc_num, rows), dtype=torch.float64)
    us = torch.ones((mc_num, rows, width), dtype=torch.float64)  # u = 1: never masked
    for r, (c, y) in enumerate(pairs):
        g = torch.Generator().manual_seed(request_seed(seed, c, y))
        ts[:, r] = time_epsilon + (1 - time_epsilon) * torch.rand(mc_num, generator=g, dtype=torch.float64)
        us[:, r, len(c): len(c) + len(y)] = torch.rand((mc_num, len(y)), generator=g, dtype=torch.float64)
    ts32 = ts.float()
    mask_p = sched.mask_prob(ts32).double()
    weight = sched.elbo_weight(ts32)

    x0_d, scored_d, valid_d = x0.to(device), scored.to(device), valid.to(device)
    total = torch.zeros(rows, dtype=torch.float64)
    chunk = max(1, min(mc_num, mc_batch_size))
    for s0 in range(0, mc_num, chunk):
        s1 = min(mc_num, s0 + chunk)  # samples s0..s1-1 in one forward: [(s1 - s0) * rows, width]
        masked = (us[s0:s1] < mask_p[s0:s1, :, None]).to(device) & scored_d
        x0_rep = x0_d.repeat(s1 - s0, 1)
        masked = masked.reshape(-1, width)
        x_t = torch.where(masked, torch.full_like(x0_rep, mask_id), x0_rep)
        nll = _token_nll(head, hidden(x_t, x0_rep, valid_d.repeat(s1 - s0, 1)), x0_rep, masked)  # 0 if not masked
        per_sample = nll.sum(-1).double().cpu().view(s1 - s0, rows)
        total += (per_sample * weight[s0:s1].double()).sum(0)
    nelbo = total / mc_num
    # one-step greedy check: every continuation token masked, argmax at each position
    x_t = torch.where(scored_d, torch.full_like(x0_d, mask_id), x0_d)
    hidden_all = hidden(x_t, x0_d, valid_d)
    greedy = []
    for r in range(rows):
        cols = scored[r].nonzero()[:, 0].to(device)
        logits = head(hidden_all[r, cols]).float()
        logits[:, mask_id] = float("-inf")
        greedy.append(bool(torch.equal(logits.argmax(-1), x0_d[r, cols])))
    return [(float(v), g) for v, g in zip(nelbo.tolist(), greedy)]


def _token_nll(head, hidden_BLD: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor) -> torch.Tensor:
    """``-log p(x_0)`` at the masked positions (float32, zeros elsewhere); the LM head runs on those rows only."""
    out = torch.zeros(x0_BL.shape, dtype=torch.float32, device=x0_BL.device)
    if bool(masked_BL.any()):
        logits = head(hidden_BLD[masked_BL]).float()
        out[masked_BL] = F.cross_entropy(logits, x0_BL[masked_BL], reduction="none")
    return out


class DiffusionLM(LM):
    """lm-eval's ``LM`` for masked-diffusion models: processes, token pairs and the likelihood requests.

    A subclass sets ``model_name``, ``batch_size``, ``max_length`` and ``_device`` and defines
    ``_encode(text) -> ids``, ``_prefix_token_id`` (the token before a rolling window with no context) and
    ``_nelbo(pairs) -> [(NELBO, is_greedy)]``.
    """

    model_name = "diffusion-lm"

    # ------------------------------------------------------------------ distributed

    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        print(f"{self.model_name}: data-parallel rank {self._rank} of {self._world_size}", file=sys.stderr, flush=True)

    def _pick_device(self, device: str | None) -> torch.device:
        """``cuda:LOCAL_RANK`` under several processes with CUDA, else ``device``, else cuda if available."""
        if self._world_size > 1 and torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', self._rank))}")
        if device:
            return torch.device(device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size <= 1:
            return tensor
        import torch.distributed as dist

        t = tensor.reshape(-1).cpu() if dist.get_backend() == "gloo" else tensor.reshape(-1)
        out = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(out, t)
        return torch.cat(out)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ tokens

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def _prefix_token_id(self) -> int:
        raise NotImplementedError

    def _nelbo(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation; the continuation's
        tokens are those of ``context + continuation`` after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return whole[: len(ctx)], whole[len(ctx):]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last ``max_length`` tokens: the continuation's end and as much of the context as fits."""
        continuation = continuation[-self.max_length:]
        room = self.max_length - len(continuation)
        return (context[max(0, len(context) - room):] if room > 0 else []), continuation

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log-likelihood estimate, is_greedy)`` per pair, longest first in batches of ``batch_size``."""
        from tqdm import tqdm

        pairs = [self._fit(c, y) for c, y in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self._rank != 0, desc=f"{self.model_name} loglikelihood")
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            for i, (nelbo, greedy) in zip(rows, self._nelbo([pairs[i] for i in rows])):
                results[i] = (-nelbo, greedy)
            bar.update(len(rows))
        bar.close()
        return [results[i] for i in range(len(pairs))]

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair_tokens(*req.args) for req in requests]
        empty = [i for i, (_, y) in enumerate(pairs) if not y]
        if empty:
            raise ValueError(f"{self.model_name}: request {empty[0]} has an empty continuation {requests[empty[0]].args!r}")
        out = self._score_pairs(pairs, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The same estimator on lm-eval's disjoint rolling windows of ``max_length`` tokens, summed."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self._encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                token_list=tokens, prefix_token=self._prefix_token_id, max_seq_len=self.max_length, context_len=1,
            )):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        scores = self._score_pairs(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals
