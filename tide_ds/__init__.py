"""tide-ds: cross-architecture distillation of diffusion language models on DeepSpeed."""

__version__ = "0.1.0"
