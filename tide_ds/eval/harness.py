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

import hashlib
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tide_ds.eval.harness needs lm-evaluation-harness; install it with pip install -e '.[eval]' "
        "(lm-eval==0.4.13)"
    ) from err

__all__ = ["TideBD3LM", "continuation_nelbo", "main"]

logger = logging.getLogger("tide_ds.eval.harness")

MODEL_NAME = "tide_bd3lm"


def _as_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _request_seed(seed: int, context: Sequence[int], continuation: Sequence[int]) -> int:
    digest = hashlib.sha256(f"{seed}|{list(context)}|{list(continuation)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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
    """``(NELBO, is_greedy)`` per ``(context ids, continuation ids)`` pair, on ``model``'s device.

    The pairs are run together (right-padded with mask tokens to a common multiple of ``block_size``;
    BD3LM attention never looks at later blocks, so the padding does not change any row). Each pair uses
    its own generator (``seed`` and its tokens), so a pair's value is the same in any batch.
    ``mc_batch_size`` MC samples share one forward (the same noise, so the same value up to rounding).
    """
    from tide_ds.diffusion.schedules import get_schedule
    from tide_ds.models.qwen3 import BD3LMStudent

    if mc_num <= 0:
        raise ValueError(f"mc_num={mc_num} must be > 0")
    sched = get_schedule(schedule)
    device = model.device
    k = block_size
    lengths = [len(c) + len(y) for c, y in pairs]
    if min(len(y) for _, y in pairs) == 0:
        raise ValueError("an empty continuation has no likelihood to estimate")
    width = -(-max(lengths) // k) * k
    rows = len(pairs)
    x0 = torch.full((rows, width), mask_id, dtype=torch.long)
    scored = torch.zeros((rows, width), dtype=torch.bool)
    for r, (c, y) in enumerate(pairs):
        x0[r, : len(c) + len(y)] = torch.tensor([*c, *y], dtype=torch.long)
        scored[r, len(c): len(c) + len(y)] = True
    # noise: mc_num draws per row from the row's own stream (CPU, so it is the same on every device)
    ts = torch.empty((mc_num, rows), dtype=torch.float64)
    us = torch.ones((mc_num, rows, width), dtype=torch.float64)  # u = 1: never masked
    for r, (c, y) in enumerate(pairs):
        g = torch.Generator().manual_seed(_request_seed(seed, c, y))
        ts[:, r] = time_epsilon + (1 - time_epsilon) * torch.rand(mc_num, generator=g, dtype=torch.float64)
        us[:, r, len(c): len(c) + len(y)] = torch.rand((mc_num, len(y)), generator=g, dtype=torch.float64)
    ts32 = ts.float()
    mask_p = sched.mask_prob(ts32).double()
    weight = sched.elbo_weight(ts32)

    student = BD3LMStudent(model, block_size=k)
    x0_d, scored_d = x0.to(device), scored.to(device)
    total = torch.zeros(rows, dtype=torch.float64)
    chunk = max(1, min(mc_num, mc_batch_size))
    for s0 in range(0, mc_num, chunk):
        s1 = min(mc_num, s0 + chunk)  # samples s0..s1-1 in one forward: [(s1 - s0) * rows, width]
        masked = (us[s0:s1] < mask_p[s0:s1, :, None]).to(device) & scored_d
        x0_rep = x0_d.repeat(s1 - s0, 1)
        masked = masked.reshape(-1, width)
        x_t = torch.where(masked, torch.full_like(x0_rep, mask_id), x0_rep)
        nll = _token_nll(student, student(x_t, x0_rep), x0_rep, masked)  # zero where not masked
        per_sample = nll.sum(-1).double().cpu().view(s1 - s0, rows)
        total += (per_sample * weight[s0:s1].double()).sum(0)
    nelbo = total / mc_num
    # one-step greedy check: every continuation token masked, argmax at each position
    x_t = torch.where(scored_d, torch.full_like(x0_d, mask_id), x0_d)
    hidden = student(x_t, x0_d)
    greedy = []
    for r in range(rows):
        cols = scored[r].nonzero()[:, 0].to(device)
        logits = student.logits(hidden[r, cols]).float()
        logits[:, mask_id] = float("-inf")
        greedy.append(bool(torch.equal(logits.argmax(-1), x0_d[r, cols])))
    return [(float(v), g) for v, g in zip(nelbo.tolist(), greedy)]


def _token_nll(student, hidden_BLD: torch.Tensor, x0_BL: torch.Tensor, masked_BL: torch.Tensor) -> torch.Tensor:
    """``-log p(x_0)`` at the masked positions (float32, zeros elsewhere); the LM head runs on those rows only."""
    out = torch.zeros(x0_BL.shape, dtype=torch.float32, device=x0_BL.device)
    if bool(masked_BL.any()):
        logits = student.logits(hidden_BLD[masked_BL]).float()
        out[masked_BL] = F.cross_entropy(logits, x0_BL[masked_BL], reduction="none")
    return out


class TideBD3LM(LM):
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
        self.use_cache = _as_bool(use_cache)
        for name, value in (("batch_size", self.batch_size), ("mc_num", self.mc_num), ("mc_batch_size", self.mc_batch_size),
                            ("max_gen_toks", self.max_gen_toks)):
            if value <= 0:
                raise ValueError(f"{MODEL_NAME}: {name}={value} must be > 0")
        if self.remasking not in REMASKING:
            raise ValueError(f"{MODEL_NAME}: remasking={self.remasking!r} is not one of {list(REMASKING)}")

        self._init_distributed()
        if self._world_size > 1 and torch.cuda.is_available():
            dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', self._rank))}")
        elif device:
            dev = torch.device(device)
        else:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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

    # ------------------------------------------------------------------ distributed

    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        print(f"{MODEL_NAME}: data-parallel rank {self._rank} of {self._world_size}", file=sys.stderr, flush=True)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size <= 1:
            return tensor
        import torch.distributed as dist

        t = tensor.reshape(-1).cpu() if dist.get_backend() == "gloo" else tensor.reshape(-1)
        out = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(out, t)
        return torch.cat(out)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

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

    # ------------------------------------------------------------------ tokens

    def _encode(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context move to the continuation; the continuation's
        tokens are those of ``context + continuation`` after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return whole[: len(ctx)], whole[len(ctx):]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last ``max_length`` tokens: the continuation's end and as much of the context as fits."""
        continuation = continuation[-self.max_length:]
        room = self.max_length - len(continuation)
        return (context[max(0, len(context) - room):] if room > 0 else []), continuation

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        pairs = [self._fit(c, y) for c, y in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: dict[int, tuple[float, bool]] = {}
        bar = tqdm(total=len(pairs), disable=disable_tqdm or self._rank != 0, desc="tide_bd3lm loglikelihood")
        for first in range(0, len(order), self.batch_size):
            rows = order[first:first + self.batch_size]
            scores = continuation_nelbo(
                self.loaded.model, [pairs[i] for i in rows], block_size=self.block_size,
                mask_id=self.loaded.special.mask_id, mc_num=self.mc_num, seed=self.seed,
                schedule=self.schedule, time_epsilon=self.time_epsilon, mc_batch_size=self.mc_batch_size,
            )
            for i, (nelbo, greedy) in zip(rows, scores):
                results[i] = (-nelbo, greedy)
            bar.update(len(rows))
        bar.close()
        return [results[i] for i in range(len(pairs))]

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair_tokens(*req.args) for req in requests]
        empty = [i for i, (_, y) in enumerate(pairs) if not y]
        if empty:
            raise ValueError(f"{MODEL_NAME}: request {empty[0]} has an empty continuation {requests[empty[0]].args!r}")
        out = self._score_pairs(pairs, disable_tqdm=disable_tqdm)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self._encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                token_list=tokens, prefix_token=self.loaded.special.eos_id, max_seq_len=self.max_length, context_len=1,
            )):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        scores = self._score_pairs(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

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
    """lm-eval's own command line with ``tide_bd3lm`` registered (``tide-ds lm-eval`` runs this)."""
    from lm_eval.__main__ import cli_evaluate

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
