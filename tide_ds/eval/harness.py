"""lm-evaluation-harness model class ``tide_bd3lm`` for BD3LM students (exported, run or checkpoint directories).

    tide-ds lm-eval run --model tide_bd3lm --model_args pretrained=HF_DIR,block_size=32,mc_num=32 --tasks ...
    python -m tide_ds.eval.harness run --model tide_bd3lm ...          (the same, without the console script)

Registration: lm-eval 0.4.13 (the version pinned in the ``eval`` extra, the newest on PyPI) has no plugin
discovery for models. ``pip install`` of tide-ds (regular or editable) puts a start-up hook in site-packages
(``tide_ds_lm_eval.pth``, :mod:`tide_ds.eval.lm_eval_startup`) that registers ``tide_bd3lm`` and
``tide_teacher`` as lazy names as soon as lm-eval's registry is imported, so the plain command works:

    lm_eval --model tide_bd3lm --model_args pretrained=HF_DIR,block_size=32,mc_num=32 --tasks ...

Importing this module also registers the class (for a checkout that is not pip-installed: ``import
tide_ds.eval.harness`` before ``lm_eval.simple_evaluate(model="tide_bd3lm", ...)``); the two commands at the
top import it and then run lm-eval's own command line (``lm_eval.__main__.cli_evaluate``).

Requests:

* ``generate_until``: the project's BD3LM sampler (:func:`tide_ds.generate.complete`, the code behind
  ``python -m tide_ds.generate`` and ``python -m tide_ds.eval``): left-padded batches of ``batch_size``,
  ``max_gen_toks`` new tokens (lm-eval's generation kwargs), ``steps`` in total or ``steps_per_block``,
  ``remasking``, ``temperature``/``top_p``, ``use_cache``. Decoding ends at EOS / end of turn; the text is
  decoded without special tokens, ``<think>...</think>`` spans are removed and it is cut at the first of
  lm-eval's ``until`` strings.
* ``loglikelihood(context, continuation)``: minus the masked-diffusion NELBO of the continuation given the
  context, estimated by Monte Carlo. The layout is the training one (docs/method.md §2): ``x_0 =
  context + continuation`` from position 0, the last block filled up with mask tokens that are never
  scored, the BD3LM forward ``[x_t ; x_0]`` so that every block of the continuation is noised at once and
  sees the clean earlier blocks. One MC sample draws ``t ~ U[eps, 1)`` and masks each continuation token
  with probability ``1 - alpha(t)`` (context tokens are never masked, as prompt tokens in training); its
  value is ``sum over masked tokens of w(t) * -log p(x_0 | x_t)``. The estimate averages ``mc_num``
  samples; every request draws its noise from its own generator seeded by ``seed`` and a hash of its
  tokens, so the value does not depend on batching, request order or the number of processes.
  ``is_greedy``: the continuation equals the argmax at every continuation position when all of them are
  masked at once (one denoising step; the multi-step sampler may commit differently).
* ``loglikelihood_rolling``: the same estimator on lm-eval's rolling windows of ``max_length`` tokens
  (disjoint, each with as much preceding context as fits), summed.

Several processes (``torchrun --nproc-per-node N -m tide_ds.eval.harness run ...`` or ``accelerate
launch``): each process reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, joins a process group (gloo on CPU,
nccl on CUDA), takes device ``cuda:LOCAL_RANK`` when CUDA is present and gets its share of the requests
from lm-eval; rank 0 gathers and reports.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Sequence

import torch

from tide_ds.eval.diffusion_lm import DiffusionLM, as_bool, mc_nelbo, register_model  # (it says how to install lm-eval)

__all__ = ["TideBD3LM", "continuation_nelbo", "main"]

logger = logging.getLogger("tide_ds.eval.harness")

MODEL_NAME = "tide_bd3lm"


@torch.no_grad()
def continuation_nelbo(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    block_size: int,
    mask_id: int,
    mc_num: int,
    seed: int,
    schedule: str = "linear",
    time_epsilon: float = 1e-3,
    mc_batch_size: int = 1,
) -> list[tuple[float, bool]]:
    """``(NELBO, is_greedy)`` per ``(context ids, continuation ids)`` pair for a BD3LM student, on its device.

    :func:`tide_ds.eval.diffusion_lm.mc_nelbo` with the BD3LM forward ``[x_t ; x_0]``: the pairs are
    right-padded with mask tokens to a common multiple of ``block_size`` (BD3LM attention never looks at
    later blocks, so the padding does not change any row).
    """
    from tide_ds.models.qwen3 import BD3LMStudent

    student = BD3LMStudent(model, block_size=block_size)
    return mc_nelbo(
        lambda x_t, x0, _valid: student(x_t, x0), student.logits, pairs, device=model.device, mask_id=mask_id,
        mc_num=mc_num, seed=seed, schedule=schedule, time_epsilon=time_epsilon, mc_batch_size=mc_batch_size,
        width_multiple=block_size,
    )


class TideBD3LM(DiffusionLM):
    """A tide-ds BD3LM student as an lm-eval model (see the module docstring for the estimators).

    Model args (``--model_args key=value,...``):
        pretrained: exported HF directory, run directory or checkpoint directory (required; from Python also
            an already loaded :class:`~tide_ds.sampling.load.InferenceModel`).
        device: ``cpu``, ``cuda``, ``cuda:1`` (default: cuda if available; ``cuda:LOCAL_RANK`` under several processes).
        dtype: float32 / bfloat16 / float16 (default: what the directory records).
        batch_size: prompts decoded together / pairs scored together (lm-eval's ``--batch_size``).
        block_size: BD3LM block size (default: the training run's, else 32).
        steps / steps_per_block: denoising steps in total (default: the number of new tokens) or per block.
        max_gen_toks: new tokens when a task does not say (default 256, the paper's protocol).
        temperature / top_p / remasking / use_cache: the sampler's options (task generation kwargs
            ``temperature``/``top_p``/``do_sample`` override temperature and top_p).
        mc_num: Monte Carlo samples of the NELBO per loglikelihood request (default 32).
        mc_batch_size: MC samples run in one forward (default 1; more is faster and takes more memory).
        max_length: window of loglikelihood_rolling and the longest context + continuation scored (default
            2048, the paper's eval ``max_length``, or the model's ``max_position_embeddings`` if smaller; the
            BD3LM forward runs 2x this many positions).
        seed: seed of the ELBO noise and of sampling.
    """

    model_name = MODEL_NAME

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        block_size: int | None = None,
        steps: int | None = None,
        steps_per_block: int | None = None,
        max_gen_toks: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        remasking: str = "low_confidence",
        use_cache: bool | str = True,
        mc_num: int = 32,
        mc_batch_size: int = 1,
        max_length: int | None = None,
        seed: int = 0,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; known: pretrained, device, dtype, batch_size, "
                "block_size, steps, steps_per_block, max_gen_toks, temperature, top_p, remasking, use_cache, "
                "mc_num, mc_batch_size, max_length, seed"
            )
        from tide_ds.generate import DEFAULT_BLOCK_SIZE
        from tide_ds.sampling.load import load_inference_model
        from tide_ds.sampling.sampler import REMASKING

        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_NAME}: batch_size={batch_size!r}: give a number (auto is not supported)")
        self.batch_size = int(batch_size)
        self.mc_num = int(mc_num)
        self.mc_batch_size = int(mc_batch_size)
        self.seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        self.steps = int(steps) if steps not in (None, "") else None
        self.steps_per_block = int(steps_per_block) if steps_per_block not in (None, "") else None
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.remasking = str(remasking)
        self.use_cache = as_bool(use_cache)
        for name, value in (("batch_size", self.batch_size), ("mc_num", self.mc_num), ("mc_batch_size", self.mc_batch_size),
                            ("max_gen_toks", self.max_gen_toks)):
            if value <= 0:
                raise ValueError(f"{MODEL_NAME}: {name}={value} must be > 0")
        if self.remasking not in REMASKING:
            raise ValueError(f"{MODEL_NAME}: remasking={self.remasking!r} is not one of {list(REMASKING)}")

        self._init_distributed()
        dev = self._pick_device(device)
        self._device = dev
        from tide_ds.sampling.load import InferenceModel

        if isinstance(pretrained, InferenceModel):  # a model already in memory (tide-ds eval --suite paper)
            self.loaded = pretrained
            self._device = pretrained.model.device
            pretrained = pretrained.source
        else:
            self.loaded = load_inference_model(pretrained, dtype=dtype, device=dev)
        self.block_size = int(block_size) if block_size not in (None, "") else (self.loaded.block_size or DEFAULT_BLOCK_SIZE)
        self.max_length = (int(max_length) if max_length not in (None, "")
                           else min(2048, int(self.loaded.model.config.max_position_embeddings)))
        if self.max_length < 2 * self.block_size:
            raise ValueError(f"{MODEL_NAME}: max_length={self.max_length} must be at least two blocks ({2 * self.block_size})")
        cfg = self.loaded.run_config
        self.schedule = cfg.diffusion.schedule if cfg is not None else "linear"
        self.time_epsilon = cfg.diffusion.time_epsilon if cfg is not None else 1e-3
        self.pretrained = str(pretrained)

    # ------------------------------------------------------------------ chat template

    @property
    def tokenizer_name(self) -> str:
        return "tide_ds-qwen3-chat"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "qwen3 (tide_ds.data.chat_format.QWEN3, empty think block)"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The student's Qwen3 template with the empty think block; a final assistant message (lm-eval's
        ``gen_prefix``) is continued, not closed: the same text as :func:`tide_ds.sampling.text.chat_prompt`."""
        from tide_ds.data.chat_format import QWEN3

        messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        prefix = ""
        if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
            prefix = messages.pop()["content"]
        text, _ = QWEN3.render(messages, add_generation_prompt=True)
        return text + prefix

    # ------------------------------------------------------------------ tokens and likelihoods

    def _encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def _prefix_token_id(self) -> int:
        return self.loaded.special.eos_id

    def _nelbo(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return continuation_nelbo(
            self.loaded.model, pairs, block_size=self.block_size, mask_id=self.loaded.special.mask_id,
            mc_num=self.mc_num, seed=self.seed, schedule=self.schedule, time_epsilon=self.time_epsilon,
            mc_batch_size=self.mc_batch_size,
        )

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tide_ds.generate import complete
        from tide_ds.sampling.sampler import SamplerConfig
        from tide_ds.sampling.text import cut_at_stops, strip_think

        groups: dict[tuple, list[int]] = defaultdict(list)
        settings: dict[tuple, tuple[SamplerConfig, list[str]]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = kwargs.pop("do_sample", None)
            temperature = float(kwargs.pop("temperature", self.temperature))
            if do_sample is False:
                temperature = 0.0
            top_p = float(kwargs.pop("top_p", self.top_p))
            kwargs.pop("top_k", None)  # not part of the sampler
            if kwargs:
                logger.warning("%s: ignoring generation kwargs %s", MODEL_NAME, sorted(kwargs))
            config = SamplerConfig(
                max_new_tokens=new_tokens, block_size=self.block_size, steps=self.steps or new_tokens,
                steps_per_block=self.steps_per_block, temperature=temperature, top_p=top_p,
                remasking=self.remasking, use_cache=self.use_cache,
            )
            key = (config, tuple(until))
            settings[key] = (config, until)
            groups[key].append(i)
        out: list[str | None] = [None] * len(requests)
        for key, rows in groups.items():
            config, until = settings[key]
            completions = complete(self.loaded, [requests[i].args[0] for i in rows], config=config,
                                   batch_size=self.batch_size, seed=self.seed)
            for i, c in zip(rows, completions):
                out[i] = cut_at_stops(strip_think(c.text), until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line with ``tide_bd3lm`` and ``tide_teacher`` registered (``tide-ds lm-eval`` runs this)."""
    from lm_eval.__main__ import cli_evaluate

    import tide_ds.eval.teacher_harness  # noqa: F401  (registers tide_teacher without the start-up hook too)

    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    else:
        sys.argv[0] = "lm-eval"
    result = cli_evaluate()
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    # under python -m this file is __main__: run the importable module's class, registered once
    from tide_ds.eval.harness import main as _main

    sys.exit(_main())
else:
    import lm_eval.models  # noqa: F401  (lm-eval's own names: get_model imports them only into an empty registry)

    register_model(MODEL_NAME)(TideBD3LM)
