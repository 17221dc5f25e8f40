"""Denoisers: how a model turns the current canvas into logits for the block being decoded.

The sampler (:mod:`tide_ds.sampling.sampler`) owns the block loop, the transfer schedule and the
remasking; a denoiser answers three calls:

* ``start(canvas, valid, positions, prompt_width)`` once, after the prompts are laid out;
* ``block_logits(canvas, start, end, rows)`` at every denoising step: float32 logits ``[B, M, V]`` of the
  block positions ``start + rows`` (``rows [B, M]``: the still-masked positions of each row);
* ``select(keep)`` when finished sequences leave the batch (``keep [B]`` bool);
* ``commit(canvas, start, end)`` once per finished block (not after the last one).

:class:`BD3LMDenoiser` runs a BD3LM model (the Qwen3 student, or any Qwen3-architecture BD3LM such as
WeDLM) with the block-causal mask of :mod:`tide_ds.sampling.masks`, with or without the prefix cache.
:class:`FullCanvasDenoiser` runs a bidirectional teacher (LLaDA2, LLaDA, Dream) on the whole canvas at
every step, without a cache, as those models' own samplers do; it exists for the deployment benchmark.
"""

from __future__ import annotations

import torch
import transformers

from tide_ds.models.adapter_glue import to_additive
from tide_ds.sampling.cache import CanvasKVCache
from tide_ds.sampling.masks import block_causal_mask

__all__ = ["SAMPLING_ATTN", "BD3LMDenoiser", "FullCanvasDenoiser"]

#: Attention backends that take the sampler's ``[B, 1, Q, K]`` masks (flex_attention and tide_bd3lm take
#: the training layout only): load the model with one of these for sampling; the weights are the same.
SAMPLING_ATTN = ("sdpa", "eager")


def _rows(hidden_BND: torch.Tensor, rows_BM: torch.Tensor) -> torch.Tensor:
    """``hidden[b, rows[b, m]]`` -> ``[B, M, D]``."""
    return hidden_BND.gather(1, rows_BM[..., None].expand(-1, -1, hidden_BND.shape[-1]))


class BD3LMDenoiser:
    """Block-causal decoding of a non-causal Qwen3 ``*ForCausalLM``.

    With ``use_cache`` the prompt is run once, each denoising step runs only the ``K`` block positions
    against the cached prefix, and each committed block is run once more to store its clean keys and
    values (:class:`~tide_ds.sampling.cache.CanvasKVCache`). Without it every step runs the whole canvas
    ``[0, end)``: the same function, used as the reference in tests.

    Attributes:
        forward_calls: model forwards so far; ``forward_tokens``: query positions run so far (summed over rows).
    """

    def __init__(self, model: transformers.PreTrainedModel, *, block_size: int, use_cache: bool = True) -> None:
        backend = model.config._attn_implementation
        if backend not in SAMPLING_ATTN:
            raise ValueError(
                f"the model was built with attn_implementation={backend!r}; the BD3LM sampler needs one of "
                f"{list(SAMPLING_ATTN)} (load it with attn_implementation='sdpa': the weights are the same)"
            )
        if getattr(model.config, "is_causal", True):
            raise ValueError("the model's config.is_causal is True; BD3LM sampling needs the non-causal student "
                             "(load it with tide_ds.models.qwen3.load_student)")
        self.model = model
        self.block_size = block_size
        self.use_cache = use_cache
        self.forward_calls = 0
        self.forward_tokens = 0
        self._cache: CanvasKVCache | None = None

    def _mask(self, keep: torch.Tensor):
        masks = keep if self.model.config._attn_implementation == "sdpa" else to_additive(keep, self.model.dtype)
        # A dict of per-layer-type masks bypasses transformers' own causal mask creation (docs/models.md §2.2).
        return {layer_type: masks for layer_type in set(self.model.config.layer_types)}

    def _hidden(self, canvas: torch.Tensor, q_start: int, q_end: int, *, cached: bool) -> torch.Tensor:
        keep = block_causal_mask(self._valid, block_size=self.block_size, q_start=q_start, q_end=q_end, kv_end=q_end)
        if cached:
            self._cache.write_at = q_start
        out = self.model.model(
            input_ids=canvas[:, q_start:q_end],
            attention_mask=self._mask(keep),
            position_ids=self._positions[:, q_start:q_end],
            cache=self._cache if cached else None,
            use_cache=False,
        )
        self.forward_calls += 1
        self.forward_tokens += canvas.shape[0] * (q_end - q_start)
        return out.last_hidden_state

    @torch.no_grad()
    def start(self, canvas: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, prompt_width: int) -> None:
        self._valid, self._positions = valid, positions
        if self.use_cache:
            self._cache = CanvasKVCache(max_len=canvas.shape[1])
            if prompt_width:
                self._hidden(canvas, 0, prompt_width, cached=True)

    @torch.no_grad()
    def block_logits(self, canvas: torch.Tensor, start: int, end: int, rows: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            hidden = self._hidden(canvas, start, end, cached=True)
        else:
            hidden = self._hidden(canvas, 0, end, cached=False)[:, start:end]
        return self.model.lm_head(_rows(hidden, rows)).float()

    def select(self, keep: torch.Tensor) -> None:
        self._valid, self._positions = self._valid[keep], self._positions[keep]
        if self._cache is not None:
            self._cache.select(keep)

    @torch.no_grad()
    def commit(self, canvas: torch.Tensor, start: int, end: int) -> None:
        if self.use_cache:
            self._hidden(canvas, start, end, cached=True)

    def cache_bytes(self) -> int:
        return self._cache.nbytes() if self._cache is not None else 0


class FullCanvasDenoiser:
    """A bidirectional teacher (LLaDA2, LLaDA, Dream) run on the whole canvas at every step, no cache.

    Every step sees the prompt, the committed blocks, the current block and the still-masked later blocks
    (semi-autoregressive decoding as in LLaDA's sampler); only the current block's logits are used.
    Positions are ``arange(T)`` (what these teachers use); key padding hides the left padding.
    """

    def __init__(self, model: transformers.PreTrainedModel) -> None:
        from tide_ds.models.teachers import teacher_family

        family = teacher_family(model)
        if not family.bidirectional:
            raise ValueError(f"FullCanvasDenoiser needs a bidirectional teacher; {family.name!r} is a BD3LM model: "
                             "decode it with BD3LMDenoiser")
        self.model = model
        self.family = family
        self.forward_calls = 0
        self.forward_tokens = 0

    def start(self, canvas: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, prompt_width: int) -> None:
        self._attention = None if bool(valid.all()) else valid.long()

    @torch.no_grad()
    def block_logits(self, canvas: torch.Tensor, start: int, end: int, rows: torch.Tensor) -> torch.Tensor:
        hidden = self.family.forward_hidden(self.model, canvas, attention_mask_BL=self._attention)
        self.forward_calls += 1
        self.forward_tokens += canvas.shape[0] * canvas.shape[1]
        return (_rows(hidden[:, start:end], rows) @ self.family.lm_head_weight(self.model).T).float()

    def select(self, keep: torch.Tensor) -> None:
        if self._attention is not None:
            self._attention = self._attention[keep]

    def commit(self, canvas: torch.Tensor, start: int, end: int) -> None:
        return None

    def cache_bytes(self) -> int:
        return 0
