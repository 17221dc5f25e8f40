"""Masked block diffusion (docs/method.md §1–§2): schedules, timesteps, masking, noise seeds, BD3LM layout."""

from tide_ds.diffusion.generators import derive_seed, make_generator
from tide_ds.diffusion.layout import (
    bd3lm_position_ids,
    check_block_multiple,
    concat_xt_x0,
    eos_block_pad,
    pad_to_length,
)
from tide_ds.diffusion.masking import NORM_TYPES, WEIGHT_TYPES, loss_weight, mask_tokens, token_loss_weights
from tide_ds.diffusion.schedules import SCHEDULES, CosineSchedule, LinearSchedule, NoiseSchedule, get_schedule
from tide_ds.diffusion.timesteps import sample_timesteps

__all__ = [
    "NORM_TYPES",
    "SCHEDULES",
    "WEIGHT_TYPES",
    "CosineSchedule",
    "LinearSchedule",
    "NoiseSchedule",
    "bd3lm_position_ids",
    "check_block_multiple",
    "concat_xt_x0",
    "derive_seed",
    "eos_block_pad",
    "get_schedule",
    "loss_weight",
    "make_generator",
    "mask_tokens",
    "pad_to_length",
    "sample_timesteps",
    "token_loss_weights",
]
