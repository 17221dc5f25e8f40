"""Seeded noise generators: one independent stream per (seed, step, rank, stream name).

The reference seeds every rank identically, so all GPUs draw the same t and mask uniforms each step
(docs/method.md §15.8). Here the noise of a micro-step comes from a fresh ``torch.Generator`` whose
seed hashes all four inputs, so ranks, steps and streams ("noise", "eval", "demo", ...) differ, and a
resumed run replays exactly the noise it would have drawn (no generator state in checkpoints).

The hash is BLAKE2b of a canonical string, not Python's ``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]

#: Domain tag of the hashed string; change it only together with a note that old runs' noise changes.
_DOMAIN = "tide_ds.diffusion.generators/v1"


def derive_seed(seed: int, *, step: int, rank: int, stream: str) -> int:
    """A 63-bit generator seed fixed by ``(seed, step, rank, stream)``, identical in every process."""
    for option, value in (("seed", seed), ("step", step), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"derive_seed: {option}={value!r} must be an int")
    if step < 0 or rank < 0:
        raise ValueError(f"derive_seed: step={step} and rank={rank} must be >= 0")
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"derive_seed: stream={stream!r} must be a non-empty name such as 'noise' or 'eval'")
    # The integers come first and contain no '|', so the string is unambiguous whatever the stream name.
    text = f"{_DOMAIN}|{seed}|{step}|{rank}|{stream}"
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def make_generator(
    seed: int, *, step: int, rank: int, stream: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, step=, rank=, stream=)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, step=step, rank=rank, stream=stream))
    return generator
