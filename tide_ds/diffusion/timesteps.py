"""Diffusion-time sampling (docs/method.md §1.1): t = eps + (1 - eps) u, u ~ U[0, 1), one per sequence.

Legend: B batch.
"""

from __future__ import annotations

import torch

__all__ = ["sample_timesteps"]

#: Largest float32 below 1: eps + (1 - eps) u can round up to exactly 1.0 in float32 when u is close to 1.
_BELOW_ONE = 1.0 - 2.0**-24


def sample_timesteps(
    batch_size: int,
    *,
    time_epsilon: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One diffusion time per sequence, uniform on [time_epsilon, 1).

    The uniforms are drawn with ``generator`` on the generator's own device (so the stream depends only
    on the generator state), then moved to ``device``; keep both on the same device to avoid a copy.

    Returns: ``t_B``, float32 [B] on ``device``.
    """
    if not 0.0 < time_epsilon < 1.0:
        raise ValueError(
            f"diffusion.time_epsilon={time_epsilon!r} must lie in the open interval (0, 1); the default is 1e-3"
        )
    if batch_size < 0:
        raise ValueError(f"batch_size={batch_size} must be >= 0")
    u_B = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float32)
    t_B = (time_epsilon + (1.0 - time_epsilon) * u_B).clamp_(max=_BELOW_ONE)
    return t_B.to(device, non_blocking=True)
