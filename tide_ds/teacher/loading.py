"""Teacher sizes, id checks and host-memory-bounded loading, all decided from config.json and headers.

* :func:`model_footprint` builds the native model on the ``meta`` device (no memory, no weights read)
  and measures what placement and planning need: parameters, bytes in the run dtype, the largest
  decoder layer and the largest unit ZeRO-3 gathers at once.
* :func:`check_teacher_ids` checks mask id and vocabularies before a byte of weights is read.
* :func:`load_replica` allocates the model once, uninitialised, where it will live (the device) and reads
  every checkpoint tensor (or expert slab) straight into its parameter (:mod:`tide_ds.teacher.reader`).
  Peak host memory is one 64 MiB read buffer on a GPU, and the replica itself (plus that buffer when a
  dtype is converted) on the CPU: measured 1.001x the teacher's bytes in bf16 and 1.012x in fp32 at the real
  widths of LLaDA2.0-mini and WeDLM-8B (bench_results/teacher_load_host.json), against 2.5x (LLaDA2) and
  2.0x (WeDLM) for checkpoint + converted copy + model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import transformers

from tide_ds.models.adapter_glue import LoadPlan, instantiate
from tide_ds.models.hf_weights import meta_checkpoint, tensor_locations
from tide_ds.teacher.reader import READ_BUFFER_BYTES, Reader, Target, fill, plan_copies
from tide_ds.teacher.turns import in_turns

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Footprint:
    """Sizes of a model, from its config on the ``meta`` device (B = bytes in the run dtype).

    Attributes:
        params: unique parameters (a tied head counted once).
        param_bytes: their bytes in the dtype the model runs in (fp32 routers of LLaDA2 included).
        largest_layer_params / largest_layer_bytes: the largest decoder layer (an MoE layer: all its experts).
        largest_unit_bytes / largest_unit_params: the largest module ZeRO-3 gathers at once (a layer, the
            embedding or the head).
        stored_bytes: checkpoint bytes as stored.
        load_buffer_bytes: the host buffer a load reads through (:data:`~tide_ds.teacher.reader.READ_BUFFER_BYTES`,
            or the whole checkpoint when smaller); 0 without a checkpoint.
        hidden, layers, vocab, intermediate, q_dim, kv_dim: widths used by the activation estimates.
    """

    params: int
    param_bytes: int
    largest_layer_params: int
    largest_layer_bytes: int
    largest_unit_bytes: int
    largest_unit_params: int
    stored_bytes: int
    load_buffer_bytes: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    q_dim: int
    kv_dim: int
    max_positions: int


def _unique(params: Iterator[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _size(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def meta_model(
    cls: type[transformers.PreTrainedModel], config: transformers.PretrainedConfig, *, dtype: torch.dtype
) -> transformers.PreTrainedModel:
    """The native model on the ``meta`` device (shapes and dtypes only)."""
    with torch.device("meta"):
        return instantiate(cls, config, attn_implementation="sdpa", dtype=dtype)


def model_footprint(model: transformers.PreTrainedModel, *, checkpoint_dir=None) -> Footprint:
    """Sizes of ``model`` (any device; ``meta`` costs nothing) and, with ``checkpoint_dir``, of its checkpoint."""
    params, param_bytes = _size(_unique(model.parameters()))
    layers = model.model.layers
    per_layer = [_size(_unique(layer.parameters())) for layer in layers]
    big_layer = max(per_layer, key=lambda s: s[1])
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    unit = max(big_layer[1], *(t.numel() * t.element_size() for t in (embed, head)))
    unit_params = max(big_layer[0], embed.numel(), head.numel())
    stored = buffer = 0
    if checkpoint_dir is not None:
        stored = sum(t.numel() * t.element_size() for t in meta_checkpoint(checkpoint_dir).values())
        buffer = min(READ_BUFFER_BYTES, stored)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Footprint(
        params=params, param_bytes=param_bytes, largest_layer_params=big_layer[0], largest_layer_bytes=big_layer[1],
        largest_unit_bytes=unit, largest_unit_params=unit_params, stored_bytes=stored, load_buffer_bytes=buffer,
        hidden=cfg.hidden_size, layers=len(layers), vocab=embed.shape[0], intermediate=cfg.intermediate_size,
        q_dim=cfg.num_attention_heads * head_dim, kv_dim=cfg.num_key_value_heads * head_dim,
        max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )


def teacher_footprint(plan: LoadPlan, *, dtype: torch.dtype) -> Footprint:
    """The teacher's :class:`Footprint` in ``dtype``, from config.json and the safetensors headers alone."""
    return model_footprint(meta_model(plan.native_class, plan.config, dtype=dtype), checkpoint_dir=plan.path)


def check_teacher_ids(plan: LoadPlan, *, mask_token_id: int | None, vocab_limit: int | None) -> int:
    """The teacher's mask id after every check that needs no weights; sets ``plan.config.mask_token_id``.

    ``mask_token_id`` (the recipe's) overrides the checkpoint's (config.json / tokenizer) when given; a
    checkpoint that declares another one is an error. With ``vocab_limit`` (pipeline B's shared prefix V'),
    the teacher's vocabulary must hold the prefix and its mask token must lie outside it (docs/method.md §3.5).
    """
    path = plan.path
    declared = getattr(plan.config, "mask_token_id", None)
    if mask_token_id is not None:
        if declared is not None and int(declared) != mask_token_id:
            raise ValueError(
                f"teacher.mask_token_id={mask_token_id} but the teacher at {path} declares mask_token_id="
                f"{declared}; drop the option or fix the checkpoint"
            )
        plan.config.mask_token_id = mask_token_id
    mask = getattr(plan.config, "mask_token_id", None)
    if mask is None:
        raise ValueError(
            f"teacher {path} declares no mask token (config.json mask_token_id or a mask token in its "
            "tokenizer files); set --teacher.mask_token_id (LLaDA2.0-mini: 156895, WeDLM-8B: 151665)"
        )
    v_t = plan.config.vocab_size
    if not 0 <= int(mask) < v_t:
        raise ValueError(
            f"the teacher's mask token id {mask} lies outside its vocabulary of {v_t} rows ({path}); "
            "fix teacher.mask_token_id"
        )
    if vocab_limit is not None:
        if vocab_limit > v_t:
            raise ValueError(
                f"distill.shared_vocab_size={vocab_limit} exceeds the teacher's vocabulary ({v_t} rows, {path}); "
                "pipeline B needs a teacher with the student's tokenizer"
            )
        if int(mask) < vocab_limit:
            raise ValueError(
                f"the teacher's mask token id {mask} lies inside the shared vocabulary prefix "
                f"distill.shared_vocab_size={vocab_limit}; the prefix must hold only tokens both tokenizers mean "
                "the same way (docs/method.md §3.5): lower distill.shared_vocab_size"
            )
    return int(mask)


def load_into(plan: LoadPlan, targets: dict[str, Target], shapes: dict[str, tuple[int, ...]], *,
              expected: set[str], buffer_bytes: int = READ_BUFFER_BYTES) -> int:
    """Read the checkpoint of ``plan`` into ``targets`` (native name -> where its elements live); bytes read.

    Everything is checked from the headers first (:func:`~tide_ds.teacher.reader.plan_copies`); a tied head
    saved in the checkpoint must equal the embedding (compared in chunks, never loaded).
    """
    locations = tensor_locations(plan.path)
    copies = plan_copies(plan, locations, shapes, expected=expected)
    with Reader(buffer_bytes=buffer_bytes) as reader:
        if plan.tied_head is not None and plan.tied_head[1] in locations and plan.tied_head[2] in locations:
            field, head, embed = plan.tied_head
            if not reader.same(locations[head], locations[embed]):
                raise ValueError(
                    f"{plan.path}: config.json has {field}=True but {head} differs from {embed}, so the head is not "
                    f"tied; set {field} to false in config.json (or drop {head} if the tie is intended)"
                )
        fill(copies, locations, targets, reader=reader)
        return reader.bytes_read


def load_replica(
    plan: LoadPlan, *, attn_implementation: str, dtype: torch.dtype, device: torch.device, concurrency: int = 0
) -> transformers.PreTrainedModel:
    """A frozen replica on ``device``, each parameter read from the checkpoint straight into its storage.

    Host memory beyond the parameters: none when they live in host memory in the checkpoint's dtype, else one
    read buffer (:data:`~tide_ds.teacher.reader.READ_BUFFER_BYTES`). ``concurrency``: ranks of a node reading at
    once (:mod:`tide_ds.teacher.turns`; 0 = all).
    """
    # Built uninitialised where it lives: each page is written once, by the read that fills it.
    with torch.device(device):
        model = instantiate(plan.native_class, plan.config, attn_implementation=attn_implementation, dtype=dtype)
    tied = plan.config.tie_word_embeddings
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    expected = {k for k in dict(model.state_dict()) if not (tied and k == "lm_head.weight")}
    with torch.no_grad():
        targets = {k: Target(t.detach().view(-1)) for k, t in tensors.items()}
        shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        in_turns(lambda: load_into(plan, targets, shapes, expected=expected), concurrency=concurrency)
    return model.eval().requires_grad_(False)
