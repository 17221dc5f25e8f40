"""The BD3LM sampler: block by block, a number of denoising steps per block, low-confidence remasking.

docs/method.md §13.1 (defaults docs/method.md §16.5). For each block of K positions after the left-padded prompts:
append K masks; at each step get the block's logits from the denoiser, propose a token for every position
(argmax at temperature 0, else a Gumbel-max draw from ``softmax(z / temperature)`` after top-p
filtering, in float64), and commit the ``k_i`` still-masked positions of highest confidence
(``softmax(z)`` probability of the proposal, or a uniform draw for ``remasking="random"``). ``k_i``
follows the linear schedule: ``round(remaining / (S - i))``, zero entries dropped. After the block a
sequence is done when the block holds a stop token; decoding ends when every sequence is done.

Where we deviate from the reference, and why:

* The mask token (and any id in ``suppress_ids``, e.g. embedding rows past the tokenizer) is never
  proposed: a committed mask token would be read as "still masked" and decoded again.
* Masked positions are tracked in a boolean tensor, not by comparing tokens with the mask id, and the LM
  head runs only on the still-masked positions of the block (the others are never read).
* A sequence that is done leaves the batch (the reference keeps extending it until every sequence is done
  and trims afterwards): the same tokens, without the work.
* Classifier-free guidance (``cfg_scale``), the Binomial transfer (``stochastic_transfer``) and the AR
  logit shift are not implemented: the paper's protocol (docs/method.md §13.2) uses none of them.

Legend: B batch, T canvas length, K block size, N positions of the current block, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tide_ds.sampling.masks import left_pad, logical_positions

__all__ = ["GenerationResult", "SamplerConfig", "generate", "propose_tokens", "transfer_counts"]

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Sampler settings (docs/method.md §13.1 defaults; the evaluation protocol uses 256 new tokens and 256 steps)."""

    #: Tokens to generate per prompt.
    max_new_tokens: int = 128
    #: BD3LM block size K (the student's training block size; 32 in the paper).
    block_size: int = 32
    #: Denoising steps in total; each block gets ceil(steps / number of blocks) unless steps_per_block is set.
    steps: int = 128
    #: Denoising steps per block (None: from steps).
    steps_per_block: int | None = None
    #: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    temperature: float = 0.0
    #: Nucleus filtering of the sampled proposals (1.0 = off; only used when temperature > 0).
    top_p: float = 1.0
    #: Which proposals are committed first: low_confidence (highest model probability) or random.
    remasking: str = "low_confidence"
    #: Reuse the keys and values of the clean prefix (exactly the same tokens, fewer FLOPs).
    use_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "block_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.steps_per_block is not None and self.steps_per_block <= 0:
            raise ValueError(f"steps_per_block={self.steps_per_block} must be > 0 (or None to derive it from steps)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking={self.remasking!r} is not one of {list(REMASKING)}")

    @property
    def num_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block_size)

    @property
    def block_steps(self) -> int:
        return self.steps_per_block or -(-self.steps // self.num_blocks)


def transfer_counts(num_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each step of a block of ``num_masked`` masks in ``steps`` steps (linear schedule).

    ``k_i = round(remaining / (steps - i))`` (half to even), zeros dropped; the counts sum to ``num_masked``.
    E.g. (32, 32) -> 32 x [1]; (32, 8) -> 8 x [4]; (3, 8) -> [1, 1, 1].
    """
    counts, remaining = [], num_masked
    for i in range(steps):
        if remaining == 0:
            break
        k = min(remaining, round(remaining / (steps - i)))
        if k:
            counts.append(k)
            remaining -= k
    return counts


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of highest-probability entries whose mass reaches ``top_p`` (at least one)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the entries ranked above each one
    sorted_scores = sorted_scores.masked_fill(before >= top_p, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, order, sorted_scores)


def propose_tokens(
    logits_BNV: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    remasking: str,
    generator: torch.Generator | None,
    suppress_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A proposal and a confidence per position: ``(tokens [B, N] long, confidence [B, N] float64)``.

    Sampling is Gumbel-max in float64: ``argmax(z / temperature + g)``, ``g = -log(-log u)``, is a draw
    from ``softmax(z / temperature)`` (the spec's ``e^z / (-log u)^temperature`` has the same argmax).
    Greedy proposals and the low-confidence scores ``softmax(z)[token] = exp(z_token - logsumexp z)``
    are computed in float32, which ranks the same and avoids a float64 copy of ``[B, N, V]``.
    """
    z = logits_BNV.float()
    if suppress_ids is not None and suppress_ids.numel():
        z = z.index_fill(-1, suppress_ids, float("-inf"))
    if temperature == 0:
        top, tokens = z.max(-1)
        if remasking == "low_confidence":  # one more pass over V instead of two
            return tokens, (top - z.logsumexp(-1)).double().exp()
    else:
        scores = z.double() / temperature
        if top_p < 1.0:
            scores = _top_p_filter(scores, top_p)
        u = torch.rand(scores.shape, generator=generator, dtype=torch.float64, device=scores.device)
        tiny = torch.finfo(torch.float64).tiny
        gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-16)))
        tokens = (scores + gumbel).argmax(-1)
    if remasking == "low_confidence":
        # softmax probability of the proposal, exp(z_tok - logsumexp z): one pass, no [B, N, V] float64 copy
        confidence = (z.gather(-1, tokens[..., None])[..., 0] - z.logsumexp(-1)).double().exp()
    else:
        confidence = torch.rand(tokens.shape, generator=generator, dtype=torch.float64, device=z.device)
    return tokens, confidence


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
        canvas: ``[B, T]`` left-padded prompts and generated tokens (the blocks after the one in which a
            sequence produced a stop id are not decoded and keep the mask id).
        prompt_width: P, the padded prompt width (generation starts at column P).
        tokens: per sequence, the generated ids up to (not including) the first stop id.
        finished: per sequence, whether a stop id was generated.
        forward_calls / forward_tokens: model forwards and query positions (summed over rows) the denoiser ran.
    """

    canvas: torch.Tensor
    prompt_width: int
    tokens: list[list[int]]
    finished: list[bool]
    forward_calls: int
    forward_tokens: int


@torch.no_grad()
def generate(
    denoiser,
    prompts: Sequence[Sequence[int]],
    *,
    config: SamplerConfig,
    mask_id: int,
    pad_id: int,
    stop_ids: Sequence[int] = (),
    suppress_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> GenerationResult:
    """Decode ``config.max_new_tokens`` tokens after each prompt (a batch, left-padded) with ``denoiser``.

    Args:
        denoiser: a :class:`~tide_ds.sampling.denoisers.BD3LMDenoiser` (or any object with the same three calls).
        prompts: token ids per prompt (not padded; lengths may differ).
        mask_id / pad_id: the model's mask token and the tokenizer's pad token.
        stop_ids: ids that end a sequence (EOS, end of turn); empty = always decode every block.
        suppress_ids: ids never proposed, besides ``mask_id``.
        generator: randomness of sampling (temperature > 0) and of ``remasking="random"``; on ``device``.
    """
    k = config.block_size
    prompt_ids, prompt_valid = left_pad(prompts, block_size=k, pad_id=pad_id, device=device)
    batch, width = prompt_ids.shape
    total = width + config.max_new_tokens
    canvas = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
    canvas[:, :width] = prompt_ids
    valid = torch.ones((batch, total), dtype=torch.bool, device=device)
    valid[:, :width] = prompt_valid
    suppress = torch.tensor(sorted({mask_id, *suppress_ids}), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    active = torch.arange(batch, device=device)  # rows of ``canvas`` still being decoded
    work = canvas.clone()  # the active rows only

    denoiser.start(work, valid, logical_positions(valid), width)
    for block in range(config.num_blocks):
        start = width + block * k
        end = min(start + k, total)
        rows = active.numel()
        masked_BN = torch.ones((rows, end - start), dtype=torch.bool, device=device)
        for count in transfer_counts(end - start, config.block_steps):
            # every row commits the same number per step, so every row has the same number M of masks left
            masked_BM = masked_BN.nonzero()[:, 1].view(rows, -1)
            logits_BMV = denoiser.block_logits(work, start, end, masked_BM)
            tokens_BM, confidence_BM = propose_tokens(
                logits_BMV, temperature=config.temperature, top_p=config.top_p, remasking=config.remasking,
                generator=generator, suppress_ids=suppress,
            )
            pick_BC = confidence_BM.topk(count, dim=-1).indices
            cols_BC = masked_BM.gather(1, pick_BC)
            work[:, start:end] = work[:, start:end].scatter(1, cols_BC, tokens_BM.gather(1, pick_BC))
            masked_BN.scatter_(1, cols_BC, False)
        canvas[active, start:end] = work[:, start:end]
        if block == config.num_blocks - 1:
            break
        if stops.numel():
            # A finished row leaves the batch: the spec keeps extending it and trims later; the kept rows'
            # tokens do not depend on the others (attention never crosses rows), so the result is the same.
            going = ~torch.isin(work[:, start:end], stops).any(-1)
            if not bool(going.any()):
                break
            if not bool(going.all()):
                active, work = active[going], work[going]
                denoiser.select(going)
        denoiser.commit(work, start, end)

    tokens, finished = _trim(canvas[:, width:], stops)
    return GenerationResult(
        canvas=canvas, prompt_width=width, tokens=tokens, finished=finished,
        forward_calls=denoiser.forward_calls, forward_tokens=denoiser.forward_tokens,
    )


def _trim(generated_BT: torch.Tensor, stops: torch.Tensor) -> tuple[list[list[int]], list[bool]]:
    """Cut each row at its first stop id (undecoded mask positions only follow a stop id)."""
    tokens, finished = [], []
    stop_set = set(stops.tolist())
    for row in generated_BT.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        finished.append(cut is not None)
        tokens.append(row[:cut] if cut is not None else row)
    return tokens, finished

