"""Teacher registry: family name -> loader, forward and tiny-checkpoint writer (docs/models.md §3-§6).

=============  ====================================  ============================  ==================
family         checkpoint ``model_type``             native class                  attention
=============  ====================================  ============================  ==================
``llada2_moe`` ``llada2_moe`` (LLaDA2.0-mini)        ``Glm4MoeForCausalLM``        bidirectional
``wedlm``      ``wedlm`` (``qwen3`` if requested)    ``Qwen3ForCausalLM``          BD3LM ``[x_0 ; x_t]``
``llada``      ``llada`` (LLaDA-8B)                  ``LlamaForCausalLM``          bidirectional
``dream``      ``Dream`` (Dream-v0-7B)               ``Qwen2ForCausalLM``          bidirectional
=============  ====================================  ============================  ==================

Every loader returns the native model frozen (``eval()``, ``requires_grad_(False)``) with
``config.tide_teacher_family`` and ``config.mask_token_id`` (from config.json or the tokenizer files) set.
The family's ``forward_hidden`` returns final hidden states, never logits; ``lm_head_weight`` gives the
head for the rows the loss needs (docs/method.md §15 item 17).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tide_ds.models import dream, llada, llada2_moe, wedlm
from tide_ds.models.adapter_glue import LoadPlan, read_config_json

__all__ = ["FAMILIES", "TeacherFamily", "detect_family", "get_family", "load_teacher", "resolve_family", "teacher_family"]


@dataclass(frozen=True)
class TeacherFamily:
    """One teacher architecture and the functions of its adapter module.

    Attributes:
        name: registry key (``teacher.family``).
        model_types: config.json ``model_type`` values that identify the family on detection.
        native_class: the transformers class the checkpoint loads into.
        bidirectional: False for a causal model run under explicit BD3LM masks (WeDLM).
        load: ``load(path, *, attn_implementation, dtype) -> model``.
        plan: ``plan(path) -> LoadPlan``: the checks and key conversion alone (used for ZeRO-3 streaming).
        forward_hidden: ``forward_hidden(model, input_ids_BL, **family args) -> hidden [B, L, D]``.
        lm_head_weight: ``lm_head_weight(model) -> [V, D]``.
        write_tiny_checkpoint: ``write_tiny_checkpoint(out_dir, *, seed, shard=False, **config overrides)``.
        zero3_leaf_modules: class names to pass to ``deepspeed.utils.set_z3_leaf_modules`` before
            ``deepspeed.initialize`` when the teacher is ZeRO-3 partitioned (docs/models.md §8.3).
    """

    name: str
    model_types: tuple[str, ...]
    native_class: type[transformers.PreTrainedModel]
    bidirectional: bool
    load: Callable[..., transformers.PreTrainedModel]
    plan: Callable[..., LoadPlan]
    forward_hidden: Callable[..., torch.Tensor]
    lm_head_weight: Callable[[transformers.PreTrainedModel], torch.Tensor]
    write_tiny_checkpoint: Callable[..., Path]
    zero3_leaf_modules: tuple[str, ...] = ()


FAMILIES: dict[str, TeacherFamily] = {
    "llada2_moe": TeacherFamily(
        name="llada2_moe",
        model_types=llada2_moe.MODEL_TYPES,
        native_class=transformers.Glm4MoeForCausalLM,
        bidirectional=True,
        load=llada2_moe.load_llada2_moe,
        plan=llada2_moe.plan_llada2_moe,
        forward_hidden=llada2_moe.teacher_forward_hidden,
        lm_head_weight=llada2_moe.lm_head_weight,
        write_tiny_checkpoint=llada2_moe.write_tiny_llada2_moe_checkpoint,
        zero3_leaf_modules=llada2_moe.ZERO3_LEAF_MODULES,
    ),
    "wedlm": TeacherFamily(
        name="wedlm",
        model_types=wedlm.MODEL_TYPES,
        native_class=transformers.Qwen3ForCausalLM,
        bidirectional=False,
        load=wedlm.load_wedlm,
        plan=wedlm.plan_wedlm,
        forward_hidden=wedlm.teacher_forward_hidden,
        lm_head_weight=wedlm.lm_head_weight,
        write_tiny_checkpoint=wedlm.write_tiny_wedlm_checkpoint,
    ),
    "llada": TeacherFamily(
        name="llada",
        model_types=llada.MODEL_TYPES,
        native_class=transformers.LlamaForCausalLM,
        bidirectional=True,
        load=llada.load_llada,
        plan=llada.plan_llada,
        forward_hidden=llada.teacher_forward_hidden,
        lm_head_weight=llada.lm_head_weight,
        write_tiny_checkpoint=llada.write_tiny_llada_checkpoint,
    ),
    "dream": TeacherFamily(
        name="dream",
        model_types=dream.MODEL_TYPES,
        native_class=transformers.Qwen2ForCausalLM,
        bidirectional=True,
        load=dream.load_dream,
        plan=dream.plan_dream,
        forward_hidden=dream.teacher_forward_hidden,
        lm_head_weight=dream.lm_head_weight,
        write_tiny_checkpoint=dream.write_tiny_dream_checkpoint,
    ),
}


def get_family(name: str) -> TeacherFamily:
    """The registered family ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"teacher.family={name!r} is not a known teacher family; use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(path: str | os.PathLike) -> str:
    """The family of the checkpoint in ``path``, from config.json's ``model_type``.

    A plain ``qwen3`` checkpoint is ambiguous (student or WeDLM) and is refused: pass ``family="wedlm"``.
    """
    p, raw = read_config_json(path)
    model_type = raw.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.name
    known = {t: f.name for f in FAMILIES.values() for t in f.model_types}
    hint = " (a plain Qwen3 checkpoint: pass family='wedlm' if it is a WeDLM teacher)" if model_type == "qwen3" else ""
    raise ValueError(
        f"{p / 'config.json'} has model_type={model_type!r} (architectures {raw.get('architectures')}), which is "
        f"no known teacher family{hint}; known model types: {known}"
    )


def resolve_family(path: str | os.PathLike, family: str | None) -> str:
    """``family`` checked against the checkpoint's ``model_type``, or detected from it when ``None``."""
    if family is None:
        return detect_family(path)
    get_family(family)
    p, raw = read_config_json(path)
    model_type = raw.get("model_type")
    owner = next((f.name for f in FAMILIES.values() if model_type in f.model_types), None)
    if owner is not None and owner != family:
        raise ValueError(
            f"teacher.family={family!r} but {p / 'config.json'} has model_type={model_type!r}, a {owner!r} "
            f"checkpoint; set teacher.family={owner!r} (or leave it unset to detect it), or point teacher.path "
            f"at a {family} checkpoint"
        )
    return family


def load_teacher(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> transformers.PreTrainedModel:
    """Load a frozen teacher from a local checkpoint directory (real config.json and safetensors key names).

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
        family: one of :data:`FAMILIES`; ``None`` detects it from config.json. A checkpoint of another
            family is refused with a ``ValueError`` naming both.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        dtype: parameter dtype (the LLaDA2 router weight and expert bias stay fp32).

    Returns:
        the native transformers model (see the module table), in eval mode without gradients.
    """
    family = resolve_family(path, family)
    return get_family(family).load(path, attn_implementation=attn_implementation, dtype=dtype)


def teacher_family(model: transformers.PreTrainedModel) -> TeacherFamily:
    """The family a model was loaded as (``config.tide_teacher_family``, set by every loader)."""
    name = getattr(model.config, "tide_teacher_family", None)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} was not loaded by tide_ds.models.teachers (no config.tide_teacher_family); "
            "load it with load_teacher"
        )
    return get_family(name)
