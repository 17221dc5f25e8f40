"""The forward (masking) process and the per-token weights of the diffusion CE (docs/method.md §1.3–§1.4).

Legend: B batch, L student length (one copy).

Nothing here reads a device value on the host, so every function is safe inside the training step.
"""

from __future__ import annotations

import torch

from tide_ds.choices import LossNormType, LossWeightType, choices
from tide_ds.diffusion.schedules import NoiseSchedule

__all__ = ["IGNORE_INDEX", "NORM_TYPES", "WEIGHT_TYPES", "loss_weight", "mask_tokens", "token_loss_weights"]

#: Label of tokens that are never masked nor trained (prompt, batch padding).
IGNORE_INDEX = -100
#: Valid ``diffusion.loss_weight_type`` values.
WEIGHT_TYPES = choices(LossWeightType)
#: Valid ``diffusion.loss_norm_type`` values.
NORM_TYPES = choices(LossNormType)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{option}={value!r} is not valid; choose one of {list(choices)}")


def mask_tokens(
    input_ids_BL: torch.Tensor,
    labels_BL: torch.Tensor,
    t_B: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    mask_token_id: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token of row j independently with probability 1 - alpha(t_j).

    Maskable means ``labels != -100``: prompt tokens and batch padding are never masked. One uniform
    per token is drawn with ``generator`` on the generator's device (shape [B, L]), then moved to the
    device of ``input_ids_BL``. The reference's "input id == label at maskable positions" assert is
    omitted: it needs a host sync (docs/method.md §15.23).

    Returns: ``(x_t_BL, masked_BL)``: the noisy ids (int64 [B, L], ``mask_token_id`` where masked) and
    the mask (bool [B, L]).
    """
    if input_ids_BL.dim() != 2 or labels_BL.shape != input_ids_BL.shape:
        raise ValueError(
            f"mask_tokens expects input_ids and labels of the same shape [B, L]; got "
            f"{tuple(input_ids_BL.shape)} and {tuple(labels_BL.shape)}"
        )
    if t_B.shape != input_ids_BL.shape[:1]:
        raise ValueError(f"mask_tokens expects t of shape [B]={input_ids_BL.shape[0]}; got {tuple(t_B.shape)}")
    if mask_token_id < 0:
        raise ValueError(f"mask_token_id={mask_token_id} must be a non-negative token id")
    device = input_ids_BL.device
    u_BL = torch.rand(input_ids_BL.shape, generator=generator, device=generator.device, dtype=torch.float32)
    p_B1 = schedule.mask_prob(t_B.to(device, non_blocking=True))[:, None]
    masked_BL = (u_BL.to(device, non_blocking=True) < p_B1) & (labels_BL != IGNORE_INDEX)
    x_t_BL = input_ids_BL.long().masked_fill(masked_BL, mask_token_id)
    return x_t_BL, masked_BL


def loss_weight(t_B: torch.Tensor, *, weight_type: str, schedule: NoiseSchedule) -> torch.Tensor:
    """Per-sequence CE weight omega (docs/method.md §1.4). float32 [B].

    ``"scheduler"``: the ELBO weight w(t) of ``schedule`` (linear: 1 / (t + 1e-6)). ``"uniform"``: ones.
    The reference returns int64 ones for ``"uniform"``; here both options are float32.
    """
    _check_choice("diffusion.loss_weight_type", weight_type, WEIGHT_TYPES)
    if weight_type == "scheduler":
        return schedule.elbo_weight(t_B)
    return torch.ones(t_B.shape, dtype=torch.float32, device=t_B.device)


def token_loss_weights(
    t_B: torch.Tensor,
    masked_BL: torch.Tensor,
    maskable_BL: torch.Tensor,
    *,
    weight_type: str,
    norm_type: str,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """Coefficients c with L_CE = sum_{j,i} c_{j,i} * CE_{j,i} (docs/method.md §1.4). float32 [B, L].

    With omega = ``loss_weight(t)``, m = ``masked``, n_j = maskable tokens of row j, N_a = sum_j n_j:

    * ``"token"``:    c = omega m / max(1, N_a)
    * ``"sequence"``: c = omega m / (B max(1, n_j))
    * ``"batch"``:    c = omega m / B

    The denominators count *maskable*, not masked, tokens. A row or batch without maskable tokens gets
    zero coefficients, not NaN.
    """
    _check_choice("diffusion.loss_norm_type", norm_type, NORM_TYPES)
    if masked_BL.shape != maskable_BL.shape or masked_BL.shape[:1] != t_B.shape:
        raise ValueError(
            f"token_loss_weights expects t [B] and masked, maskable [B, L]; got {tuple(t_B.shape)}, "
            f"{tuple(masked_BL.shape)}, {tuple(maskable_BL.shape)}"
        )
    c_BL = loss_weight(t_B, weight_type=weight_type, schedule=schedule)[:, None] * masked_BL.to(torch.float32)
    batch = max(1, masked_BL.shape[0])
    if norm_type == "token":
        return c_BL / maskable_BL.sum(dtype=torch.float32).clamp_min(1.0)
    if norm_type == "sequence":
        return c_BL / (batch * maskable_BL.sum(dim=1, keepdim=True, dtype=torch.float32).clamp_min(1.0))
    return c_BL / batch
