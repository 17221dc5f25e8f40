"""Sample from a trained student with the BD3LM sampler (docs/method.md §13.1).

    python -m tide_ds.generate --checkpoint RUN_DIR|CHECKPOINT_DIR|HF_DIR --prompt "def fib(n):" [--prompt ...]

``--checkpoint`` takes a run directory (its newest complete checkpoint), one checkpoint directory
(``runs/demo/checkpoints/step_00000150``; ZeRO-2 or ZeRO-3, consolidated in memory) or a Hugging Face
directory written by ``python -m tide_ds.export``. Prompts go through the student's chat template when
the student was trained on instruction data (``--template auto``; ``chat`` or ``raw`` force it). Each
completion is printed in order, or one JSON object per line with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tide_ds.log import setup_cli_logging
from tide_ds.sampling.denoisers import BD3LMDenoiser
from tide_ds.sampling.load import InferenceModel, load_inference_model
from tide_ds.sampling.sampler import SamplerConfig, generate
from tide_ds.sampling.text import chat_prompt

__all__ = ["Completion", "complete", "main"]

logger = logging.getLogger("tide_ds.generate")  # not __name__: "__main__" under python -m

#: Block size when the checkpoint does not record one (the paper's K).
DEFAULT_BLOCK_SIZE = 32


@dataclass
class Completion:
    """One generated answer: the decoded text (special tokens skipped), its token ids and whether it stopped."""

    text: str
    token_ids: list[int]
    finished: bool


def stop_ids(loaded: InferenceModel) -> list[int]:
    """EOS (Qwen3: ``<|im_end|>``, the end of a turn) and the pad token (``<|endoftext|>``, end of a document)."""
    return sorted({loaded.special.eos_id, loaded.special.pad_id})


def unused_ids(loaded: InferenceModel) -> list[int]:
    """Embedding rows past the tokenizer (Qwen3 pads 151,670 entries to 151,936 rows): never proposed."""
    return list(range(loaded.special.vocab_size, loaded.model.config.vocab_size))


def complete(
    loaded: InferenceModel,
    prompts: Sequence[str],
    *,
    config: SamplerConfig,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Generate a completion for every prompt text (already templated), in batches of similar length.

    Greedy decoding (temperature 0) gives the same tokens whatever the batching; with sampling, the
    draws depend on the batch composition and ``seed``. ``progress(done, total)`` is called after each batch.
    """
    if batch_size <= 0:
        raise ValueError(f"--batch-size={batch_size} must be > 0")
    device = loaded.model.device
    encoded = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    generator = torch.Generator(device=device).manual_seed(seed)
    results: dict[int, Completion] = {}
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        denoiser = BD3LMDenoiser(loaded.model, block_size=config.block_size, use_cache=config.use_cache)
        out = generate(
            denoiser, [encoded[i] for i in rows], config=config, mask_id=loaded.special.mask_id,
            pad_id=loaded.special.pad_id, stop_ids=stop_ids(loaded), suppress_ids=unused_ids(loaded),
            generator=generator, device=device,
        )
        for row, tokens, finished in zip(rows, out.tokens, out.finished):
            text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
            results[row] = Completion(text=text, token_ids=tokens, finished=finished)
        if progress is not None:
            progress(len(results), len(prompts))
    return [results[i] for i in range(len(prompts))]


def why_empty(c: Completion, max_new_tokens: int) -> str | None:
    """Why a completion's text is empty (None when it is not): the model stopped at once, or said only specials."""
    if c.text.strip():
        return None
    if not c.token_ids:
        return ("0 tokens: the model's first token was a stop token (end of turn or of document); an undertrained "
                "student often does this: train longer, or check --template (chat vs raw) for this model")
    return (f"{len(c.token_ids)} token(s), none of them text (special tokens only"
            f"{'' if c.finished else f', and no stop within --max-new-tokens={max_new_tokens}'})")


def uses_chat_template(loaded: InferenceModel, template: str) -> bool:
    """``auto``: chat for instruction-trained students and exported directories, raw for the stdlib text demo."""
    if template != "auto":
        return template == "chat"
    return loaded.run_config is None or loaded.run_config.data.dataset != "stdlib"


def sampler_config_from_args(args: argparse.Namespace, loaded: InferenceModel) -> SamplerConfig:
    block = args.block_size or loaded.block_size or DEFAULT_BLOCK_SIZE
    return SamplerConfig(
        max_new_tokens=args.max_new_tokens, block_size=block, steps=args.steps or args.max_new_tokens,
        steps_per_block=args.steps_per_block, temperature=args.temperature, top_p=args.top_p,
        remasking=args.remasking, use_cache=not args.no_cache,
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``tide_ds.generate`` and ``tide_ds.eval``."""
    parser.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or exported HF directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights dtype (default: what the run trained in, or what config.json records)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")


def add_sampler_args(parser: argparse.ArgumentParser, *, max_new_tokens: int | None) -> None:
    if max_new_tokens is not None:
        parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate per prompt")
        parser.add_argument("--steps", type=int, default=None, help="denoising steps in total (default: max-new-tokens)")
    parser.add_argument("--block-size", type=int, default=None,
                        help=f"BD3LM block size (default: the training run's, else {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--steps-per-block", type=int, default=None, help="overrides --steps")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filtering when sampling")
    parser.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix at every step (same tokens, slower)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and random remasking")


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.generate", description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (JSON strings allowed)")
    parser.add_argument("--template", choices=["auto", "chat", "raw"], default="auto",
                        help="wrap prompts in the student's chat template (auto: if it was trained on instructions)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_sampler_args(parser, max_new_tokens=128)
    args = parser.parse_args(argv)
    setup_cli_logging()
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as fh:
            prompts += [json.loads(line) if line.lstrip().startswith('"') else line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    try:
        loaded = load_inference_model(args.checkpoint, dtype=args.dtype, device=pick_device(args.device))
        config = sampler_config_from_args(args, loaded)
    except (ValueError, FileNotFoundError) as err:
        print(f"tide-ds generate: error: {err}", file=sys.stderr)
        return 2
    chat = uses_chat_template(loaded, args.template)
    texts = [chat_prompt(p) if chat else p for p in prompts]
    start = time.perf_counter()
    completions = complete(loaded, texts, config=config, batch_size=args.batch_size, seed=args.seed)
    elapsed = time.perf_counter() - start
    for i, (prompt, c) in enumerate(zip(prompts, completions)):
        if (reason := why_empty(c, config.max_new_tokens)) is not None:
            logger.warning("prompt %d: empty completion: %s", i + 1, reason)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": c.text, "tokens": len(c.token_ids), "finished": c.finished}))
        else:
            print(c.text)
    generated = sum(len(c.token_ids) for c in completions)
    logger.info("%d prompt(s), %d tokens in %.2f s (%s template, block %d, %d steps/block, cache %s)", len(prompts),
                generated, elapsed, "chat" if chat else "raw", config.block_size, config.block_steps, config.use_cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
