"""The ``tide_bd3lm`` attention backend: tide-ds' Triton attention kernels behind transformers' interface.

One backend name serves the student and the teachers (``--model.attn_implementation=tide_bd3lm``,
``--teacher.attn_implementation=tide_bd3lm``). What the kernel must compute travels in the place of the
attention mask, in one of three forms:

* :class:`BD3LMMaskSpec`, the parameters of the BD3LM mask (docs/method.md §2.3): the student, and the
  WeDLM teacher when its batch has no padding. The mask is computed from indices inside the kernel and
  fully masked tiles are skipped; no mask tensor exists. It goes in as a dict of per-layer-type masks,
  which bypasses transformers' mask creation (docs/models.md §2.2).
* Key lengths, an integer tensor ``[B, 1, 1, 1]`` of real tokens per sequence (trailing padding): the
  bidirectional teachers (LLaDA, Dream, LLaDA2). Every transformers model hands a prepared 4-D mask
  through unchanged, and an integer dtype cannot be mistaken for a real mask, which is bool or float.
* A dense 4-D bool/float mask: the padded WeDLM batch, BD3LM mask and key padding at once, which neither
  kernel mode expresses. It runs through transformers' SDPA with that mask, and says so once in the log.

Without a GPU the kernels' PyTorch references run instead (docs/design.md decision 6): the same maths from a
dense mask, chosen by :func:`kernel_implementation` and logged once.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = [
    "TIDE_BD3LM",
    "BD3LMMaskSpec",
    "check_head_dim",
    "kernel_implementation",
    "key_lengths",
    "key_lengths_mask",
    "register_tide_attention",
]

logger = logging.getLogger(__name__)

#: The backend's name in transformers' ``AttentionInterface``.
TIDE_BD3LM = "tide_bd3lm"


@dataclass(frozen=True)
class BD3LMMaskSpec:
    """The BD3LM mask's parameters, passed in place of a mask tensor (``T = 2 * seq_len`` tokens)."""

    seq_len: int
    block_size: int
    clean_first: bool = False
    implementation: str = "reference"


def kernel_implementation(device: torch.device) -> str:
    """Triton kernels on GPUs; their PyTorch references elsewhere (docs/design.md decision 6)."""
    return "triton" if device.type == "cuda" else "reference"


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def key_lengths(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Real tokens per sequence ``[B]`` (int32) of a ``[B, L]`` 0/1 padding mask whose padding is trailing.

    Raises:
        ValueError: if a padding position comes before a real token (left or interleaved padding), which the
            key-lengths kernel mode cannot express. This check reads the mask on the host once per call.
    """
    if attention_mask_BL.dim() != 2:
        raise ValueError(f"attention_mask must be a [B, L] 0/1 padding mask; got shape {tuple(attention_mask_BL.shape)}")
    valid_BL = attention_mask_BL.bool()
    lens_B = valid_BL.sum(dim=1, dtype=torch.int32)
    positions_L = torch.arange(valid_BL.shape[1], device=valid_BL.device)
    if not torch.equal(valid_BL, positions_L[None, :] < lens_B[:, None]):
        bad = int((valid_BL != (positions_L[None, :] < lens_B[:, None])).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {bad} has padding before real tokens ({valid_BL[bad].int().tolist()[:16]}...); the "
            "tide_bd3lm attention backend needs right padding (real tokens first): pad on the right, or use "
            "--teacher.attn_implementation=sdpa"
        )
    return lens_B


def key_lengths_mask(attention_mask_BL: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The key-lengths form of the mask: int32 ``[B, 1, 1, 1]`` (``attention_mask_BL=None``: all ``seq_len`` real)."""
    if attention_mask_BL is None:
        lens_B = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    else:
        lens_B = key_lengths(attention_mask_BL.to(device))
    return lens_B.view(-1, 1, 1, 1)


def _tide_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface adapter: ``q [B, H, T, Dh]`` -> ``(out [B, T, H, Dh], None)``."""
    from tide_kernels.bd3lm_attention import bd3lm_attention

    if isinstance(attention_mask, dict):  # a model that did not unpack its per-layer-type mask dict
        raise TypeError("the tide_bd3lm attention backend got a mask dict; pass the dict as attention_mask to the model")
    if isinstance(attention_mask, BD3LMMaskSpec):
        spec = attention_mask
        out = bd3lm_attention(
            query, key, value, seq_len=spec.seq_len, block_size=spec.block_size, clean_first=spec.clean_first,
            scale=scaling, implementation=spec.implementation,
        )
        return out.transpose(1, 2), None
    if isinstance(attention_mask, torch.Tensor) and not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool:
        if attention_mask.dim() != 4 or attention_mask.shape[1:] != (1, 1, 1) or attention_mask.shape[0] != query.shape[0]:
            raise ValueError(
                f"integer attention_mask of shape {tuple(attention_mask.shape)} given to tide_bd3lm: key lengths must "
                f"be [B={query.shape[0]}, 1, 1, 1] (tide_ds.models.tide_attention.key_lengths_mask)"
            )
        impl = kernel_implementation(query.device)
        _log_once(f"teacher attention tide_bd3lm: bidirectional with key lengths, {impl} implementation")
        out = bd3lm_attention(query, key, value, key_lens=attention_mask.view(-1), scale=scaling, implementation=impl)
        return out.transpose(1, 2), None
    if attention_mask is None:
        raise TypeError(
            "the tide_bd3lm attention backend runs only inside BD3LMStudent.forward or the teacher adapters "
            "(tide_ds.models.teachers), which pass the BD3LM mask spec or key lengths; it got no mask"
        )
    _log_once("attention tide_bd3lm: a dense mask (BD3LM with key padding) runs through SDPA, not the kernels")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def check_head_dim(config, option: str) -> None:
    """Raise ``ValueError`` when the model's head dim is not one the Triton kernels are built for.

    Checked when a model is built with this backend, on every machine: the CPU's reference path would take
    any head dim, and the same config would then fail only on a GPU, at the first forward.
    """
    from tide_kernels.bd3lm_attention.op import TRITON_HEAD_DIMS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"{option}=tide_bd3lm needs a head dim in {list(TRITON_HEAD_DIMS)} (the Triton kernels' tile sizes); "
            f"this model has head_dim={head_dim}: use {option}=sdpa"
        )


def register_tide_attention() -> None:
    """Make ``tide_bd3lm`` known to transformers (idempotent; called when a model is built with it)."""
    if TIDE_BD3LM not in transformers.AttentionInterface._global_mapping:
        transformers.AttentionInterface.register(TIDE_BD3LM, _tide_attention)
