"""The BD3LM student: transformers' own Qwen3 classes, made bidirectional, run on ``[x_t ; x_0]``.

Spec: docs/method.md §2.2-§2.5, docs/models.md §7. The reference registers the student as model type
``a2d-qwen3`` ("A2D" = autoregressive-to-diffusion); its weights, config fields and layers are those of
stock Qwen3, so ``transformers.Qwen3ForCausalLM`` with ``config.is_causal = False`` and an explicit 4-D
mask (or a FlexAttention ``BlockMask``) computes the same thing. Checkpoints use the real Qwen3 key names;
with tied embeddings ``lm_head.weight`` is absent from the files and tied on load.

Legend: B batch, L student length (one copy), K block size, V vocab, D hidden.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers.initialization import no_init_weights

from tide_ds.choices import AttnImplementation, choices
from tide_ds.models.block_mask import additive_bd3lm_mask, dense_bd3lm_mask, flex_bd3lm_block_mask
from tide_ds.models.hf_weights import load_safetensors_checkpoint, save_safetensors_checkpoint
from tide_ds.models.tide_attention import (
    TIDE_BD3LM,
    BD3LMMaskSpec,
    check_head_dim,
    kernel_implementation,
    register_tide_attention,
)
from tide_ds.utils.files import atomic_write_text

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "BD3LMStudent",
    "build_student",
    "load_student",
    "save_student",
    "tiny_student_config",
]

logger = logging.getLogger(__name__)

#: Attention backends the BD3LM forward supports (the reference has no FlashAttention-2 path either).
ATTN_IMPLEMENTATIONS = choices(AttnImplementation)
assert TIDE_BD3LM in ATTN_IMPLEMENTATIONS
#: ``model_type`` values accepted in a student's config.json (``a2d-qwen3`` is dllm's registered name).
MODEL_TYPES = ("qwen3", "a2d-qwen3")
_STRUCTURAL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


def _check_attn(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attn_implementation={attn_implementation!r} is not supported by the BD3LM student; "
            f"use one of {list(ATTN_IMPLEMENTATIONS)}"
        )


def tiny_student_config(
    *,
    vocab_size: int = 1024,
    mask_token_id: int = 1010,
    eos_token_id: int = 1002,
    pad_token_id: int = 1000,
    bos_token_id: int | None = None,
) -> transformers.Qwen3Config:
    """The ``tiny-qwen3-bd3lm`` test config of docs/models.md §10 (0.16 M parameters, tied head, head_dim != D/heads)."""
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        is_causal=False,
    )
    config.mask_token_id = mask_token_id
    return config


def _instantiate(
    config: transformers.Qwen3Config, *, attn_implementation: str, dtype: torch.dtype, init: bool
) -> transformers.Qwen3ForCausalLM:
    _check_attn(attn_implementation)
    if attn_implementation == TIDE_BD3LM:
        check_head_dim(config, "model.attn_implementation")
        register_tide_attention()
    config = copy.deepcopy(config)
    config.is_causal = False
    if init:
        return transformers.Qwen3ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    with no_init_weights():
        return transformers.Qwen3ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def build_student(
    config: transformers.Qwen3Config,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> transformers.Qwen3ForCausalLM:
    """A randomly initialised, non-causal ``Qwen3ForCausalLM`` (transformers' own init).

    ``config`` is copied, not modified. With ``seed`` the initialisation is reproducible and the global
    RNG state is left as it was.
    """
    if seed is None:
        return _instantiate(config, attn_implementation=attn_implementation, dtype=dtype, init=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _instantiate(config, attn_implementation=attn_implementation, dtype=dtype, init=True)


def _read_config(path: Path) -> transformers.Qwen3Config:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in student checkpoint directory {path}")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{config_file} has model_type={model_type!r}; the student must be one of {list(MODEL_TYPES)} "
            "(a Qwen3 or dllm A2D-Qwen3 checkpoint)"
        )
    missing = [f for f in _STRUCTURAL_FIELDS if f not in raw]
    if missing:
        raise ValueError(f"{config_file} lacks structural field(s) {missing}; it is not a complete Qwen3 config")
    # auto_map points at remote code and model_type "a2d-qwen3" is unknown to transformers: we save as qwen3.
    for key in ("model_type", "auto_map", "architectures"):
        raw.pop(key, None)
    config = transformers.Qwen3Config.from_dict(raw)
    config.is_causal = False
    return config


def _check_keys(path: Path, state: dict[str, torch.Tensor], model: transformers.Qwen3ForCausalLM) -> None:
    """Strict key and shape check of ``state`` against ``model``; drops a tied ``lm_head.weight`` alias from it."""
    tied = model.config.tie_word_embeddings
    expected = {k: v.shape for k, v in model.state_dict().items() if not (tied and k == _LM_HEAD)}
    if tied and _LM_HEAD in state:
        # Some savers keep the alias; accept it only if it really is the embedding.
        head = state.pop(_LM_HEAD)
        if _EMBED in state and not torch.equal(head, state[_EMBED]):
            raise ValueError(
                f"{path}: config.json says tie_word_embeddings=true but {_LM_HEAD} differs from {_EMBED}; "
                "set tie_word_embeddings=false in config.json or drop the lm_head key"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match a Qwen3 model with this config.json: "
            f"{len(missing)} missing key(s) {missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}"
        )
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if state[k].shape != shape
    ]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor(s) have the wrong shape for config.json, e.g. {wrong[:3]}")


def load_student(
    path: str | os.PathLike,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.Qwen3ForCausalLM:
    """A non-causal ``Qwen3ForCausalLM`` from a local directory (config.json + safetensors, single or sharded).

    Keys are checked strictly (missing, unexpected, shape); weights are cast to ``dtype``.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"student checkpoint directory {p} does not exist")
    config = _read_config(p)
    state = load_safetensors_checkpoint(p)
    model = _instantiate(config, attn_implementation=attn_implementation, dtype=dtype, init=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()  # construction under no_init_weights skips the tie
    _check_keys(p, state, model)
    model.load_state_dict(state, strict=False)
    logger.info("loaded student from %s (%s, %s)", p, attn_implementation, dtype)
    return model


def save_student(
    model: transformers.Qwen3ForCausalLM | BD3LMStudent,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Write ``config.json`` (model_type ``qwen3``, ``is_causal`` false, ``mask_token_id``) and safetensors.

    Real Qwen3 key names; no ``lm_head.weight`` when the embeddings are tied. Weights are written first
    and config.json last, so a directory with a config.json has complete weights.
    """
    hf = model.hf if isinstance(model, BD3LMStudent) else model
    config = copy.deepcopy(hf.config)
    config.is_causal = False
    config.architectures = ["Qwen3ForCausalLM"]
    state = hf.state_dict()
    if config.tie_word_embeddings:
        state.pop(_LM_HEAD, None)
    out = Path(out_dir)
    save_safetensors_checkpoint(state, out, max_shard_bytes=max_shard_bytes)
    text = config.to_json_string()
    atomic_write_text(out / "config.json", text)


@functools.cache
def _log_kernel_choice(impl: str) -> None:
    logger.info("student attention tide_bd3lm: %s implementation", impl)


class BD3LMStudent(torch.nn.Module):
    """BD3LM forward of a Qwen3 student: hidden states of the noisy copy, attending per docs/method.md §2.3.

    ``forward(x_t [B, L] long, x_0 [B, L] long) -> hidden [B, L, D]`` (final-normed, activation dtype).
    The LM head is not applied (the loss applies it to the rows it needs, via :attr:`lm_head_weight`).

    Attributes:
        hf: the wrapped ``transformers.Qwen3ForCausalLM`` (``config.is_causal`` False).
        block_size: K; L must be a multiple of it.
        attn_implementation: the backend of ``hf``, which picks the mask form (dense bool for sdpa,
            additive float for eager, cached ``BlockMask`` for flex_attention).
    """

    def __init__(
        self, hf: transformers.Qwen3ForCausalLM, *, block_size: int, attn_implementation: str | None = None
    ) -> None:
        super().__init__()
        backend = hf.config._attn_implementation
        if attn_implementation is not None and attn_implementation != backend:
            raise ValueError(
                f"model.attn_implementation={attn_implementation!r} but the model was built with {backend!r}; "
                "build or load it with the same attn_implementation"
            )
        _check_attn(backend)
        if block_size <= 0:
            raise ValueError(f"diffusion.block_size={block_size} must be > 0")
        hf.config.is_causal = False
        self.hf = hf
        self.block_size = block_size
        self.attn_implementation = backend

    @property
    def lm_head_weight(self) -> torch.nn.Parameter:
        """The LM head weight ``[V, D]`` (the embedding matrix itself when tied)."""
        return self.hf.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D] -> logits [..., V]`` through the LM head."""
        return self.hf.lm_head(hidden)

    def _mask(self, seq_len: int, device: torch.device):
        k = self.block_size
        if self.attn_implementation == TIDE_BD3LM:
            impl = kernel_implementation(device)
            _log_kernel_choice(impl)
            return BD3LMMaskSpec(seq_len, k, implementation=impl)
        if self.attn_implementation == "flex_attention":
            return flex_bd3lm_block_mask(seq_len, k, device=device)
        if self.attn_implementation == "eager":
            dtype = self.hf.model.embed_tokens.weight.dtype
            return additive_bd3lm_mask(seq_len, k, dtype=dtype, device=device)
        return dense_bd3lm_mask(seq_len, k, device=device)

    def forward(self, x_t_BL: torch.Tensor, x_0_BL: torch.Tensor) -> torch.Tensor:
        """Run ``[x_t ; x_0]`` (2L tokens, positions ``[0..L-1 ; 0..L-1]``) and return the x_t half ``[B, L, D]``."""
        if x_t_BL.dim() != 2 or x_t_BL.shape != x_0_BL.shape:
            raise ValueError(
                f"x_t and x_0 must both be [B, L] token ids of the same shape; got {tuple(x_t_BL.shape)} "
                f"and {tuple(x_0_BL.shape)}"
            )
        seq_len = x_t_BL.shape[1]
        if seq_len % self.block_size:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of diffusion.block_size={self.block_size}; "
                "pad batches to a multiple of the block size (data.seq_len)"
            )
        device = x_t_BL.device
        ids_B2L = torch.cat([x_t_BL, x_0_BL], dim=1)
        positions_12L = torch.arange(seq_len, device=device).repeat(2)[None]
        mask = self._mask(seq_len, device)
        # A dict of per-layer-type masks bypasses transformers' own (causal) mask creation (docs/models.md §2.2).
        masks = {layer_type: mask for layer_type in set(self.hf.config.layer_types)}
        out = self.hf.model(input_ids=ids_B2L, attention_mask=masks, position_ids=positions_12L, use_cache=False)
        return out.last_hidden_state[:, :seq_len]
