"""The choices of the options that take one of a few names: one ``Literal`` type each, the only list.

The config fields are typed with these (``tide_ds.config`` validates a value by its type), and the modules
that implement a choice derive their tuples from the same type with :func:`choices`. No dependencies, so
any module can import it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "AttnImplementation", "ConcatOrder", "LossImplementation", "LossNormType", "LossWeightType", "PipelineChoice",
    "ResumeMode", "Schedule", "TeacherAttnImplementation", "TeacherDtype", "TeacherFamilyName", "TeacherPlacement",
    "TidalAxis", "TidalGrowth", "TidalTimestepWeight", "World", "choices",
]

AttnImplementation = Literal["sdpa", "flex_attention", "eager", "tide_bd3lm"]
# tide_ds.losses.fused_head.LOSS_IMPLEMENTATIONS; "reference" is the deprecated name of "pytorch" (still accepted,
# with a deprecation message: tide_ds.losses.fused_head.DEPRECATED_LOSS_IMPLEMENTATIONS).
LossImplementation = Literal["auto", "pytorch", "triton", "reference"]
Schedule = Literal["linear", "cosine"]
LossWeightType = Literal["scheduler", "uniform"]
LossNormType = Literal["token", "sequence", "batch"]
World = Literal["instruct", "code"]
TeacherFamilyName = Literal["", "llada2_moe", "wedlm", "llada", "dream"]
TeacherPlacement = Literal["replicate", "zero3", "zero3_offload", "auto"]
TeacherDtype = Literal["auto", "bfloat16", "float32"]
TeacherAttnImplementation = Literal["sdpa", "eager", "tide_bd3lm"]
ConcatOrder = Literal["x0_xt", "xt_x0"]
PipelineChoice = Literal["auto", "A", "B"]
TidalGrowth = Literal["cosine", "linear"]
TidalAxis = Literal["both", "training_only", "timestep_only"]
TidalTimestepWeight = Literal["uniform", "midrange"]
ResumeMode = Literal["auto", "never"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` option type."""
    return get_args(tp)
