"""lm-evaluation-harness model class ``tide_teacher``: the distillation teachers (LLaDA2, LLaDA, Dream, WeDLM).

    lm_eval --model tide_teacher --model_args pretrained=TEACHER_DIR,mc_num=32 --tasks ...

``pretrained`` is a teacher checkpoint directory in its real layout (config.json, safetensors, tokenizer
files), loaded as the trainer loads teachers (:func:`tide_ds.models.teachers.load_teacher`: the family is
detected from config.json's ``model_type``, or given as ``family=``; a plain Qwen3 checkpoint needs
``family=wedlm``). Registered like ``tide_bd3lm`` (the start-up hook of :mod:`tide_ds.eval.lm_eval_startup`,
or importing this module).

* ``loglikelihood`` / ``loglikelihood_rolling``: the masked-diffusion NELBO by Monte Carlo of
  :func:`tide_ds.eval.diffusion_lm.mc_nelbo`, the estimator and seeding of ``tide_bd3lm``. The
  bidirectional teachers (LLaDA2, LLaDA, Dream) see the whole noisy sequence ``x_t`` (key padding hides
  the right padding of a batch); WeDLM runs its BD3LM forward ``[x_0 ; x_t]`` with ``block_length``
  blocks, as in distillation (docs/method.md §3.2).
* ``generate_until`` (bidirectional teachers): semi-autoregressive masked-diffusion sampling as in LLaDA's
  sampler (:func:`tide_ds.sampling.sampler.generate` with
  :class:`~tide_ds.sampling.denoisers.FullCanvasDenoiser`): ``max_gen_toks`` new tokens in blocks of
  ``block_length``, ``steps`` denoising steps in total, ``remasking`` low_confidence (or random),
  ``temperature`` (0 = greedy); decoding ends at EOS; the text is cut at lm-eval's ``until`` strings.
  WeDLM decodes with its own streaming sampler, which tide-ds does not implement: ``generate_until``
  raises ``NotImplementedError`` naming the family.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from tide_ds.eval.diffusion_lm import DiffusionLM, mc_nelbo, register_model  # (it says how to install lm-eval)

__all__ = ["TideTeacher", "teacher_nelbo"]

logger = logging.getLogger("tide_ds.eval.teacher_harness")

MODEL_NAME = "tide_teacher"
_KNOWN_ARGS = ("pretrained", "family", "tokenizer", "mask_id", "device", "dtype", "batch_size", "mc_num",
               "mc_batch_size", "seed", "max_length", "max_gen_toks", "steps", "block_length", "temperature",
               "remasking")


@torch.no_grad()
def teacher_nelbo(model, pairs, *, mask_id: int, mc_num: int, seed: int, block_length: int = 32,
                  mc_batch_size: int = 1, schedule: str = "linear", time_epsilon: float = 1e-3) -> list[tuple[float, bool]]:
    """``(NELBO, is_greedy)`` per ``(context ids, continuation ids)`` pair for a teacher loaded by
    :func:`~tide_ds.models.teachers.load_teacher` (``block_length``: WeDLM's BD3LM block size only)."""
    from tide_ds.models.teachers import teacher_family

    family = teacher_family(model)
    head_weight = family.lm_head_weight(model)
    if family.bidirectional:
        def hidden(x_t, _x0, valid):
            return family.forward_hidden(model, x_t, attention_mask_BL=None if bool(valid.all()) else valid.long())
        multiple = 1
    else:
        def hidden(x_t, x0, _valid):
            return family.forward_hidden(model, x_t, x_0_BL=x0, block_size=block_length)
        multiple = block_length
    return mc_nelbo(
        hidden, lambda h: h @ head_weight.T, pairs, device=head_weight.device, mask_id=mask_id, mc_num=mc_num,
        seed=seed, schedule=schedule, time_epsilon=time_epsilon, mc_batch_size=mc_batch_size, width_multiple=multiple,
    )


class TideTeacher(DiffusionLM):
    """A teacher checkpoint as an lm-eval model (see the module docstring).

    Model args (``--model_args key=value,...``):
        pretrained: teacher checkpoint directory (required).
        family: llada2_moe / llada / dream / wedlm (default: detected from config.json).
        tokenizer: tokenizer directory (default: ``pretrained``).
        mask_id: the mask token id (default: the checkpoint's, from config.json or the tokenizer).
        device / dtype: as for tide_bd3lm (default dtype float32 on CPU, bfloat16 on CUDA).
        batch_size: pairs scored / prompts decoded together.
        mc_num / mc_batch_size / seed: the NELBO's Monte Carlo samples, samples per forward, seed.
        max_length: longest context + continuation (default min(2048, max_position_embeddings)).
        max_gen_toks / steps / block_length / temperature / remasking: the sampler (defaults 256, the
            number of new tokens, 32, 0, low_confidence); ``block_length`` is also WeDLM's ELBO block size.
    """

    model_name = MODEL_NAME

    def __init__(self, pretrained: str, family: str | None = None, tokenizer: str | None = None,
                 mask_id: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, mc_num: int = 32, mc_batch_size: int = 1, seed: int = 0,
                 max_length: int | None = None, max_gen_toks: int = 256, steps: int | None = None,
                 block_length: int = 32, temperature: float = 0.0, remasking: str = "low_confidence",
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; known: {', '.join(_KNOWN_ARGS)}")
        from pathlib import Path

        from tide_ds.data.tokenizers import load_tokenizer
        from tide_ds.models.teachers import get_family, load_teacher, resolve_family
        from tide_ds.sampling.load import parse_dtype
        from tide_ds.sampling.sampler import REMASKING

        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_NAME}: batch_size={batch_size!r}: give a number (auto is not supported)")
        self.batch_size, self.mc_num, self.mc_batch_size = int(batch_size), int(mc_num), int(mc_batch_size)
        self.seed, self.max_gen_toks, self.block_length = int(seed), int(max_gen_toks), int(block_length)
        self.steps = int(steps) if steps not in (None, "") else None
        self.temperature, self.remasking = float(temperature), str(remasking)
        for name in ("batch_size", "mc_num", "mc_batch_size", "max_gen_toks", "block_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{MODEL_NAME}: {name}={getattr(self, name)} must be > 0")
        if self.remasking not in REMASKING:
            raise ValueError(f"{MODEL_NAME}: remasking={self.remasking!r} is not one of {list(REMASKING)}")
        if not Path(pretrained, "config.json").is_file():
            raise ValueError(f"{MODEL_NAME}: pretrained={pretrained!r} has no config.json; give a teacher checkpoint "
                             "directory (config.json, safetensors and tokenizer files)")
        self.family = get_family(resolve_family(pretrained, family or None))  # checks before any weight is read
        tokenizer_dir = tokenizer or pretrained
        if not Path(tokenizer_dir, "tokenizer.json").is_file() and not Path(tokenizer_dir, "tokenizer_config.json").is_file():
            raise ValueError(f"{MODEL_NAME}: no tokenizer files in {tokenizer_dir}; pass tokenizer=<directory with "
                             "tokenizer.json>")

        self._init_distributed()
        self._device = self._pick_device(device)
        run_dtype = parse_dtype(dtype) if dtype else (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.model = load_teacher(pretrained, family=self.family.name, dtype=run_dtype).to(self._device)
        config_mask = getattr(self.model.config, "mask_token_id", None)
        self.mask_id = int(mask_id) if mask_id not in (None, "") else config_mask
        if self.mask_id is None:
            raise ValueError(f"{MODEL_NAME}: {pretrained} names no mask token (config.json mask_token_id or a <|mask|> "
                             "token); pass mask_id=<id>")
        vocab = int(self.model.config.vocab_size)
        if not 0 <= self.mask_id < vocab:
            raise ValueError(f"{MODEL_NAME}: mask_id={self.mask_id} is outside the model's vocabulary [0, {vocab})")
        self.max_length = (int(max_length) if max_length not in (None, "")
                           else min(2048, int(getattr(self.model.config, "max_position_embeddings", 2048))))
        self.pretrained = str(pretrained)

    # ------------------------------------------------------------------ tokens and likelihoods

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def _prefix_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.mask_id

    def _nelbo(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return teacher_nelbo(self.model, pairs, mask_id=self.mask_id, mc_num=self.mc_num, seed=self.seed,
                             block_length=self.block_length, mc_batch_size=self.mc_batch_size)

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tide_ds.sampling.denoisers import FullCanvasDenoiser
        from tide_ds.sampling.sampler import SamplerConfig, generate
        from tide_ds.sampling.text import cut_at_stops

        if not self.family.bidirectional:
            raise NotImplementedError(
                f"{MODEL_NAME}: generate_until is not supported for the {self.family.name!r} teacher family (WeDLM "
                "decodes with its own streaming sampler, which tide-ds does not implement); its loglikelihood "
                "tasks work, or use a bidirectional teacher (llada2_moe, llada, dream)"
            )
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            new_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = 0.0 if kwargs.pop("do_sample", None) is False else float(kwargs.pop("temperature", self.temperature))
            kwargs.pop("temperature", None)
            if kwargs:
                logger.warning("%s: ignoring generation kwargs %s", MODEL_NAME, sorted(kwargs))
            groups[(new_tokens, temperature, until)].append(i)
        eos = [t for t in (self.tokenizer.eos_token_id,) if t is not None]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else self.mask_id)
        unused = list(range(len(self.tokenizer), int(self.model.config.vocab_size)))  # rows no text can hold
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        out: list[str | None] = [None] * len(requests)
        for (new_tokens, temperature, until), rows in groups.items():
            config = SamplerConfig(max_new_tokens=new_tokens, block_size=min(self.block_length, new_tokens),
                                   steps=self.steps or new_tokens, temperature=temperature, remasking=self.remasking)
            for first in range(0, len(rows), self.batch_size):
                batch = rows[first:first + self.batch_size]
                result = generate(
                    FullCanvasDenoiser(self.model), [self._encode(requests[i].args[0]) for i in batch], config=config,
                    mask_id=self.mask_id, pad_id=pad, stop_ids=eos, suppress_ids=unused, generator=generator,
                    device=self._device,
                )
                for i, tokens in zip(batch, result.tokens):
                    out[i] = cut_at_stops(self.tokenizer.decode(tokens, skip_special_tokens=True), list(until))
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


import lm_eval.models  # noqa: E402,F401  (lm-eval's own names: get_model imports them only into an empty registry)

register_model(MODEL_NAME)(TideTeacher)
