"""Train small teachers from scratch as masked diffusion LMs (for the instruct world, :mod:`tide_ds.worlds`).

The worlds need a teacher that knows its corpus. Where no real checkpoint is at hand, this trains one on
the teacher side of a preprocessed dataset (``teacher_input_ids``, padding never masked):

* pipeline A: a tiny LLaDA2.0-style MoE (``Glm4MoeForCausalLM`` route, bidirectional) with the MDLM
  objective of docs/method.md §1, written in the real LLaDA2 checkpoint layout (loads like LLaDA2.0-mini);
* pipeline B: a tiny WeDLM (Qwen3 architecture, the student's tokenizer) trained as a BD3LM on
  ``[x_0 ; x_t]`` (WeDLM's ``x0_xt`` order, block-diffusion mask of docs/method.md §2.3), written with WeDLM's
  config and Qwen3 key names (loads like WeDLM-8B).

Single process, plain PyTorch AdamW: the teacher is tiny, and this is preparation, not the method.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tide_ds.diffusion.generators import make_generator
from tide_ds.diffusion.masking import loss_weight
from tide_ds.diffusion.schedules import get_schedule
from tide_ds.diffusion.timesteps import sample_timesteps
from tide_ds.losses.diffusion_ce import fused_linear_masked_ce
from tide_ds.models import wedlm
from tide_ds.models.adapter_glue import write_tiny_checkpoint
from tide_ds.models.llada2_moe import (
    load_llada2_moe,
    save_llada2_moe_checkpoint,
    teacher_forward_hidden,
    tiny_llada2_moe_config,
    write_tiny_llada2_moe_checkpoint,
)

logger = logging.getLogger(__name__)

#: Held-out samples (the first ones) on which :func:`heldout_nll` measures a teacher for its pretraining record.
HELDOUT_SAMPLES = 64


#: ``forward(model, x_t [B, L], x_0 [B, L], attention [B, L]) -> hidden [B, L, D]`` of the noisy copy.
HiddenForward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bidirectional_hidden(
    model: torch.nn.Module, x_t: torch.Tensor, x_0: torch.Tensor, attention_BL: torch.Tensor
) -> torch.Tensor:
    return teacher_forward_hidden(model, x_t, attention_mask_BL=attention_BL)


def _mdlm_loss(model: torch.nn.Module, ids_BL: torch.Tensor, attention_BL: torch.Tensor, *, mask_id: int,
               generator: torch.Generator, normalise: bool = True,
               forward: HiddenForward = _bidirectional_hidden) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-diffusion CE of one batch (docs/method.md §1.3–§1.4): (loss, maskable count). ``forward(model, x_t, x_0, att)``
    gives the hidden states of the noisy copy."""
    schedule = get_schedule("linear")
    maskable = attention_BL.bool()
    t = sample_timesteps(ids_BL.shape[0], time_epsilon=1e-3, generator=generator)
    u = torch.rand(ids_BL.shape, generator=generator)
    masked = (u < schedule.mask_prob(t)[:, None]) & maskable
    x_t = torch.where(masked, torch.full_like(ids_BL, mask_id), ids_BL)
    hidden = forward(model, x_t, ids_BL, attention_BL)
    coeff = loss_weight(t, weight_type="scheduler", schedule=schedule)[:, None] * masked
    n = maskable.sum().clamp_min(1)
    if normalise:
        coeff = coeff / n
    # Only the masked rows go through the LM head (about half of them on average): the rest have weight 0,
    # and with the Qwen3 vocabulary of the pipeline-B teacher the head is most of the step's work.
    rows = masked.flatten()
    if not rows.any():
        return hidden.sum() * 0.0, n
    loss, _ = fused_linear_masked_ce(hidden.flatten(0, 1)[rows], model.lm_head.weight, ids_BL.flatten()[rows],
                                     coeff.flatten()[rows].float())
    return loss, n


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, split: Any, *, mask_id: int, batch_size: int, seed: int,
                max_samples: int = HELDOUT_SAMPLES, forward: HiddenForward = _bidirectional_hidden) -> float:
    """ELBO per maskable teacher token on a held-out split, with a fixed noise seed: the first ``max_samples``
    rows, every token with ``teacher_attention_mask`` 1 (:func:`heldout_text_units` counts them and their bytes)."""
    model.eval()
    total, count = 0.0, 0.0
    n = min(len(split), max_samples)
    for i, start in enumerate(range(0, n, batch_size)):
        rows = split[start : min(n, start + batch_size)]
        ids = torch.as_tensor(rows["teacher_input_ids"], dtype=torch.long)
        att = torch.as_tensor(rows["teacher_attention_mask"], dtype=torch.long)
        gen = make_generator(seed, step=i, rank=0, stream="teacher-eval")
        loss, m = _mdlm_loss(model, ids, att, mask_id=mask_id, generator=gen, normalise=False, forward=forward)
        total += loss.item()
        count += m.item()
    model.train()
    return total / max(1.0, count)


def heldout_text_units(split: Any, tokenizer: Any, *, max_samples: int = HELDOUT_SAMPLES) -> dict[str, int]:
    """The text :func:`heldout_nll` scores: the teacher tokens with attention 1 of the first ``max_samples`` rows
    of ``split``. ``{"tokens", "bytes", "samples"}``: those tokens, the UTF-8 bytes of the text they spell
    (special tokens, such as chat markers and EOS padding, spell none; their nats still count) and the rows.
    The teacher's bits per byte is ``heldout_nll * tokens / (ln 2 * bytes)`` (:func:`teacher_bits_per_byte`)."""
    from tide_ds.worlds.evidence import response_bytes

    n = min(len(split), max_samples)
    rows = split.select(range(n)) if n < len(split) else split
    ids = [[int(t) for t, a in zip(tok, att) if a] for tok, att in zip(rows["teacher_input_ids"],
                                                                       rows["teacher_attention_mask"])]
    return {"tokens": sum(map(len, ids)), "bytes": response_bytes(tokenizer, ids), "samples": n}


def teacher_bits_per_byte(nll_per_token: float, units: dict[str, int]) -> float:
    """A teacher's held-out NLL per teacher token as bits per byte of the text those tokens spell."""
    from tide_ds.worlds.evidence import bits_per_byte

    return bits_per_byte(nll_per_token * units["tokens"], units["bytes"])


def pretrain_llada2_teacher(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, float]:
    """Train a tiny LLaDA2 MoE teacher on the teacher tokens of a pipeline-A dataset; write it to ``out_dir``.

    Returns ``{"heldout_nll_before", "heldout_nll"}`` (ELBO per maskable teacher token; with ``tokenizer_dir``
    also ``heldout_tokens``, ``heldout_bytes``, ``heldout_samples`` and ``heldout_bits_per_byte``, of
    :func:`heldout_text_units`), also recorded in ``tide_ds_pretrain.json``. The checkpoint is written aside and
    moved into place when complete.
    """
    cfg_json = tiny_llada2_moe_config(
        vocab_size=vocab_size, mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        **(config or {}),
    )
    return _pretrain(
        dataset_dir, out_dir, cfg_json=cfg_json,
        build=lambda path, fields: load_llada2_moe(write_tiny_llada2_moe_checkpoint(path, seed=seed, **fields)),
        save=lambda model, staging: save_llada2_moe_checkpoint(model, staging, cfg_json),
        forward=_bidirectional_hidden, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        tokenizer_dir=tokenizer_dir, record={},
    )


def _train(model: torch.nn.Module, train: Any, heldout: Any, *, mask_id: int, steps: int, batch_size: int, lr: float,
           seed: int, forward: HiddenForward = _bidirectional_hidden) -> tuple[float, float]:
    """AdamW with warmup and cosine decay on the teacher columns; (held-out NLL before, after)."""
    mask_token_id = mask_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    before = heldout_nll(model, heldout, mask_id=mask_token_id, batch_size=batch_size, seed=seed, forward=forward)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        idx = order[(step * batch_size + torch.arange(batch_size)) % len(train)].tolist()
        rows = train[idx]
        ids = torch.as_tensor(rows["teacher_input_ids"], dtype=torch.long)
        att = torch.as_tensor(rows["teacher_attention_mask"], dtype=torch.long)
        loss, _ = _mdlm_loss(model, ids, att, mask_id=mask_token_id,
                             generator=make_generator(seed, step=step, rank=0, stream="teacher"), forward=forward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0:
            logger.info("teacher pretraining step %d/%d | loss %.4f", step + 1, steps, loss.item())
    after = heldout_nll(model, heldout, mask_id=mask_token_id, batch_size=batch_size, seed=seed, forward=forward)
    return before, after


def _publish(staging: Path, out: Path, *, tokenizer_dir: str | Path | None, record: dict[str, Any]) -> None:
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, staging / f.name)
    (staging / "tide_ds_pretrain.json").write_text(json.dumps(record, indent=1))
    staging.rename(out)


def pretrain_wedlm_teacher(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    block_size: int,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, float]:
    """Train a tiny WeDLM teacher (BD3LM, ``x0_xt``) on the teacher tokens of a pipeline-B dataset; write it.

    The teacher side of a pipeline-B dataset is the WeDLM chat template in the student's own tokenizer,
    EOS-padded to whole blocks (docs/method.md §11.3). Returns what :func:`pretrain_llada2_teacher` returns; the
    checkpoint is written aside and moved into place when complete.
    """
    cfg_json = wedlm.tiny_wedlm_config(
        vocab_size=vocab_size, mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=pad_token_id, **(config or {}),
    )

    def forward(m: torch.nn.Module, x_t: torch.Tensor, x_0: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return wedlm.teacher_forward_hidden(m, x_t, x_0_BL=x_0, block_size=block_size, attention_mask_BL=att,
                                            concat_order="x0_xt")

    def save(model: torch.nn.Module, staging: Path) -> None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if cfg_json.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        write_tiny_checkpoint(staging, cfg_json, state, shard=False)

    return _pretrain(
        dataset_dir, out_dir, cfg_json=cfg_json,
        build=lambda path, fields: wedlm.load_wedlm(wedlm.write_tiny_wedlm_checkpoint(path, seed=seed, **fields)),
        save=save, forward=forward, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        tokenizer_dir=tokenizer_dir, record={"block_size": block_size},
    )


def _pretrain(dataset_dir: str | Path, out_dir: str | Path, *, cfg_json: dict[str, Any],
              build: Callable[[Path, dict[str, Any]], torch.nn.Module], save: Callable[[torch.nn.Module, Path], None],
              forward: HiddenForward, steps: int, batch_size: int, lr: float, seed: int,
              tokenizer_dir: str | Path | None, record: dict[str, Any]) -> dict[str, float]:
    """The teachers' shared pretraining: refuse an existing ``out_dir``, build the initial model from
    ``cfg_json`` (``build(path, fields)``), train it (:func:`_train`), ``save`` it to a staging directory
    and move that into place with the tokenizer and a record of the run."""
    import datasets

    out = Path(out_dir)
    if out.exists():
        raise ValueError(f"teacher output directory {out} exists; remove it or choose another")
    splits = datasets.load_from_disk(str(dataset_dir))
    fields = {k: v for k, v in cfg_json.items() if k not in ("architectures", "model_type")}
    units = None  # the held-out text's tokens and bytes, counted before training (a bad tokenizer fails first)
    if tokenizer_dir is not None:
        from tide_ds.data.tokenizers import load_tokenizer

        units = heldout_text_units(splits["heldout"], load_tokenizer(tokenizer_dir))
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        model = build(Path(tmp) / "init", fields).train().requires_grad_(True)
    before, after = _train(model, splits["train"], splits["heldout"], mask_id=cfg_json["mask_token_id"], steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, forward=forward)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    save(model, staging)
    result = {"heldout_nll_before": before, "heldout_nll": after}
    if units is not None and units["bytes"] > 0:  # the same NLL in bits per byte of the held-out text
        result.update(heldout_tokens=units["tokens"], heldout_bytes=units["bytes"], heldout_samples=units["samples"],
                      heldout_bits_per_byte=teacher_bits_per_byte(after, units))
    _publish(staging, out, tokenizer_dir=tokenizer_dir, record={"steps": steps, "lr": lr, "seed": seed, **record, **result})
    logger.info("teacher held-out NLL %.4f -> %.4f; written to %s", before, after, out)
    return result
