"""Block-diffusion (BD3LM) sampling from a trained student (docs/method.md §13.1)."""

from tide_ds.sampling.denoisers import BD3LMDenoiser, FullCanvasDenoiser
from tide_ds.sampling.sampler import (
    GenerationResult,
    SamplerConfig,
    generate,
    propose_tokens,
    transfer_counts,
)

__all__ = [
    "BD3LMDenoiser",
    "FullCanvasDenoiser",
    "GenerationResult",
    "SamplerConfig",
    "generate",
    "propose_tokens",
    "transfer_counts",
]
