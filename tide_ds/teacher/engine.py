"""The frozen teacher as a second DeepSpeed engine in the student's process (docs/design.md decision 1).

The engine has no optimizer. Its placement (``replicate | zero3 | zero3_offload | auto``) is decided by
:mod:`tide_ds.teacher.placement`; under ZeRO-3 the checkpoint loads straight into partitions
(:mod:`tide_ds.teacher.load`) and MoE blocks are ZeRO-3 leaf modules, so ranks that route tokens to
different experts still gather the same parameters in the same order. Every call here is one teacher
forward on every rank, whatever the rank's data: callers never skip a pass for an empty batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tide_ds import dist
from tide_ds.models.teachers import TeacherFamily, detect_family, get_family
from tide_ds.teacher import forward as tf
from tide_ds.teacher.load import current_rss_bytes, load_partitioned, peak_rss_bytes, peak_rss_reset
from tide_ds.teacher.loading import check_teacher_ids, load_replica, teacher_footprint
from tide_ds.teacher.placement import Placement, decide_placement, free_memory_bytes, teacher_ds_config

logger = logging.getLogger(__name__)


class TeacherModule(torch.nn.Module):
    """What the teacher engine runs: the family's forward, then the LM head on the needed rows only.

    ``forward(input_ids [B, L_t], attention_mask [B, L_t] | None, target_ids [B, L_t], target_rows [B, L_t],
    x_0 [B, L_t] | None, logit_rows [B, N] | None, rows_as_hidden=False) -> (target log-probs [B, L_t] fp32,
    logits [B, N, V'] | None)``; with ``rows_as_hidden`` the second item is the hidden rows ``[B, N, D_t]`` (teacher
    dtype) instead of logits. ``x_0`` is the clean copy for BD3LM teachers (WeDLM); bidirectional teachers ignore it.
    """

    def __init__(
        self, model: torch.nn.Module, family: TeacherFamily, *, block_size: int, concat_order: str, vocab_limit: int | None,
        loss_implementation: str = "pytorch",
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.block_size = block_size
        self.concat_order = concat_order
        self.vocab_limit = vocab_limit
        self.loss_implementation = loss_implementation  # target log-probs: "pytorch" (row tiles) or "triton"

    def hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, x_0: torch.Tensor | None
    ) -> torch.Tensor:
        if self.family.bidirectional:
            return self.family.forward_hidden(self.model, input_ids, attention_mask_BL=attention_mask)
        return self.family.forward_hidden(
            self.model,
            input_ids,
            x_0_BL=x_0,
            block_size=self.block_size,
            attention_mask_BL=attention_mask,
            concat_order=self.concat_order,
        )

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target_ids: torch.Tensor,
        target_rows: torch.Tensor | None, x_0: torch.Tensor | None = None, logit_rows: torch.Tensor | None = None,
        rows_as_hidden: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hidden_BLD = self.hidden(input_ids, attention_mask, x_0)
        weight = self.family.lm_head_weight(self.model)
        lp = None
        if target_rows is not None:
            lp = tf.target_logprobs(hidden_BLD.flatten(0, 1), weight, target_ids.flatten(), target_rows.flatten(),
                                    implementation=self.loss_implementation)
            lp = lp.view_as(target_ids.float())
        if logit_rows is None:
            return lp, None
        if rows_as_hidden:
            return lp, tf.row_hidden(hidden_BLD, logit_rows)
        return lp, tf.row_logits(hidden_BLD, weight, logit_rows, vocab_limit=self.vocab_limit)


@dataclass
class LoadReport:
    placement: Placement
    param_bytes: int
    peak_rss_increase: int


class TeacherEngine:
    """A frozen teacher engine: target log-probs and row logits or hidden rows, single pass or CompDemo; its head."""

    def __init__(self, engine: Any, *, family: TeacherFamily, mask_token_id: int, report: LoadReport) -> None:
        self.engine = engine
        self.family = family
        self.mask_token_id = mask_token_id
        self.report = report

    @classmethod
    def build(
        cls,
        path: str | Path,
        *,
        family: str | None = None,
        placement: str = "auto",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        block_size: int = 32,
        concat_order: str = "x0_xt",
        vocab_limit: int | None = None,
        mask_token_id: int | None = None,
        loss_implementation: str = "pytorch",
        device: torch.device | None = None,
        load_concurrency: int = 0,
    ) -> TeacherEngine:
        """Load the teacher at ``path`` as a frozen engine; ``vocab_limit`` is pipeline B's shared prefix V'.

        ``mask_token_id`` overrides the checkpoint's (config.json / tokenizer) when given; a checkpoint
        that declares a different one is an error. With ``vocab_limit``, the teacher's vocabulary must hold
        the prefix and its mask token must lie outside it (docs/method.md §3.5). ``load_concurrency``: ranks of
        a node reading the checkpoint at once (:mod:`tide_ds.teacher.turns`; 0 = all).
        """
        import deepspeed

        fam = get_family(family) if family else get_family(detect_family(path))
        plan = fam.plan(path)
        mask_id = check_teacher_ids(plan, mask_token_id=mask_token_id, vocab_limit=vocab_limit)  # before any weight
        size = teacher_footprint(plan, dtype=dtype)
        device = device or torch.device("cpu")
        world = dist.world_size()
        free = torch.tensor([free_memory_bytes(device, local_world_size=_local_world()),
                             free_memory_bytes(torch.device("cpu"), local_world_size=_local_world())], dtype=torch.float64)
        if dist.is_initialized():  # every rank decides from the same (smallest) numbers
            torch.distributed.all_reduce(free, op=torch.distributed.ReduceOp.MIN)
        decision = decide_placement(
            placement,
            param_bytes=size.param_bytes,
            world_size=world,
            free_bytes=int(free[0].item()),
            largest_group_bytes=size.largest_unit_bytes,
            host_free_bytes=int(free[1].item()),
            read_buffer_bytes=size.load_buffer_bytes,
            on_cpu=device.type != "cuda",
        )
        logger.info("teacher %s (%s): placement %s — %s", path, fam.name, decision.kind, decision.reason)
        ds = teacher_ds_config(decision.kind, hidden_size=size.hidden, bf16=dtype == torch.bfloat16,
                               largest_unit_params=size.largest_unit_params)
        peak_rss_reset()
        before = current_rss_bytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if decision.kind == "replicate":
            model = load_replica(plan, attn_implementation=attn_implementation, dtype=dtype, device=device,
                                 concurrency=load_concurrency)
        else:
            model = load_partitioned(plan, ds_config=ds, attn_implementation=attn_implementation, dtype=dtype,
                                     concurrency=load_concurrency)
            if fam.zero3_leaf_modules:
                deepspeed.utils.set_z3_leaf_modules(model, list(fam.zero3_leaf_modules))
        peak = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else max(0, peak_rss_bytes() - before)
        )
        report = LoadReport(decision, size.param_bytes, peak)
        logger.info(
            "teacher load peak %s %.1f MiB on this rank; teacher %.1f MiB, / world size = %.1f MiB",
            "device memory" if device.type == "cuda" else "RSS increase",
            peak / 2**20,
            size.param_bytes / 2**20,
            size.param_bytes / world / 2**20,
        )
        module = TeacherModule(model, fam, block_size=block_size, concat_order=concat_order, vocab_limit=vocab_limit,
                               loss_implementation=loss_implementation)
        if decision.kind != "replicate":
            deepspeed.zero.register_external_parameter(module, fam.lm_head_weight(model))
        engine, *_ = deepspeed.initialize(model=module, config=ds)
        engine.eval()
        return cls(engine, family=fam, mask_token_id=int(mask_id), report=report)

    def __call__(
        self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, target_rows: torch.Tensor | None,
        x_0: torch.Tensor | None = None, logit_rows: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
        rows_as_hidden: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        target_ids = x_0 if target_ids is None else target_ids
        return self.engine(input_ids, attention_mask, target_ids, target_rows, x_0, logit_rows, rows_as_hidden)

    def noised(self, clean_BL: torch.Tensor, masked_BL: torch.Tensor) -> torch.Tensor:
        return torch.where(masked_BL, torch.full_like(clean_BL, self.mask_token_id), clean_BL)

    def target_logprobs(
        self, clean_BL: torch.Tensor, masked_BL: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
        target_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass: the teacher sees ``masked`` positions as its mask token; log-probs of the clean ids."""
        rows = masked_BL if target_rows is None else target_rows
        lp, _ = self(self.noised(clean_BL, masked_BL), attention_mask=attention_mask, target_rows=rows, x_0=clean_BL)
        return lp

    def comp_demo_target_logprobs(
        self, clean_BL: torch.Tensor, mask_a_BL: torch.Tensor, mask_b_BL: torch.Tensor, *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CompDemo (docs/method.md §8): pass 1 masks B (A is the demonstration), pass 2 masks A; rows of A from pass 2.

        Both passes run as one forward over the two noised copies stacked on the batch axis ``[2B, L_t]``, so
        a partitioned teacher gathers its parameters once per micro-step, not twice; on every rank.
        """
        ids = torch.cat([self.noised(clean_BL, mask_b_BL), self.noised(clean_BL, mask_a_BL)])
        rows = torch.cat([mask_b_BL, mask_a_BL])
        lp, _ = self(ids, attention_mask=_twice(attention_mask), target_rows=rows, x_0=_twice(clean_BL),
                     target_ids=_twice(clean_BL))
        first, second = lp.chunk(2)
        return tf.merge_passes(first, second, mask_a_BL)

    # --- Teacher rows for pipeline B: one pass (``_rows``) or CompDemo's two (``_comp_demo_rows``); each as float32
    # logits [B, N, V'] (tests, tools) or as the final hidden states [B, N, D_t] that pipeline B hands, with the
    # head (:meth:`head_weight`), to tide_ds.losses.token_divergence (issue 17: no [N, V'] logits) ---

    def _rows(
        self, clean_BL: torch.Tensor, masked_BL: torch.Tensor, rows_BN: torch.Tensor, *,
        attention_mask: torch.Tensor | None, as_hidden: bool,
    ) -> torch.Tensor:
        """One pass with ``masked`` positions hidden; the rows ``rows_BN`` as logits or hidden states."""
        _, rows = self(self.noised(clean_BL, masked_BL), attention_mask=attention_mask, target_rows=None,
                       x_0=clean_BL, logit_rows=rows_BN, rows_as_hidden=as_hidden)
        return rows

    def _comp_demo_rows(
        self, clean_BL: torch.Tensor, mask_a_BL: torch.Tensor, mask_b_BL: torch.Tensor, rows_BN: torch.Tensor,
        rows_in_a_BN: torch.Tensor, *, attention_mask: torch.Tensor | None, as_hidden: bool,
    ) -> torch.Tensor:
        """Token-level CompDemo (docs/method.md §8.1): pass 1 masks B, pass 2 masks A; rows in A take pass 2's rows.

        Both passes run as one forward over the two noised copies stacked on the batch axis ``[2B, L_t]`` (one
        parameter gather of a partitioned teacher per micro-step); the head is linear in the row, so merging
        hidden rows before it equals merging logits after it. On every rank.
        """
        ids = torch.cat([self.noised(clean_BL, mask_b_BL), self.noised(clean_BL, mask_a_BL)])
        _, rows = self(ids, attention_mask=_twice(attention_mask), target_rows=None, x_0=_twice(clean_BL),
                       logit_rows=_twice(rows_BN), rows_as_hidden=as_hidden)
        first, second = rows.chunk(2)
        return torch.where(rows_in_a_BN.unsqueeze(-1), second, first)

    def row_logits(
        self, clean_BL: torch.Tensor, masked_BL: torch.Tensor, rows_BN: torch.Tensor, *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass with ``masked`` positions hidden: float32 logits ``[B, N, V']`` at teacher positions ``rows_BN``.

        ``V'`` is the shared-vocabulary prefix given at build time (pipeline B, docs/method.md §3.2-§3.5).
        """
        return self._rows(clean_BL, masked_BL, rows_BN, attention_mask=attention_mask, as_hidden=False)

    def comp_demo_row_logits(
        self, clean_BL: torch.Tensor, mask_a_BL: torch.Tensor, mask_b_BL: torch.Tensor, rows_BN: torch.Tensor,
        rows_in_a_BN: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`row_logits` under token-level CompDemo (:meth:`_comp_demo_rows`)."""
        return self._comp_demo_rows(clean_BL, mask_a_BL, mask_b_BL, rows_BN, rows_in_a_BN,
                                    attention_mask=attention_mask, as_hidden=False)

    def row_hidden(
        self, clean_BL: torch.Tensor, masked_BL: torch.Tensor, rows_BN: torch.Tensor, *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass with ``masked`` positions hidden: the final hidden states ``[B, N, D_t]`` (teacher dtype) at
        teacher positions ``rows_BN``; the head runs later, fused with the divergences (:meth:`head_weight`)."""
        return self._rows(clean_BL, masked_BL, rows_BN, attention_mask=attention_mask, as_hidden=True)

    def comp_demo_row_hidden(
        self, clean_BL: torch.Tensor, mask_a_BL: torch.Tensor, mask_b_BL: torch.Tensor, rows_BN: torch.Tensor,
        rows_in_a_BN: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`row_hidden` under token-level CompDemo (:meth:`_comp_demo_rows`): one head sweep serves both passes."""
        return self._comp_demo_rows(clean_BL, mask_a_BL, mask_b_BL, rows_BN, rows_in_a_BN,
                                    attention_mask=attention_mask, as_hidden=True)

    @contextlib.contextmanager
    def head_weight(self) -> Iterator[torch.Tensor]:
        """The teacher's LM head cut to the shared prefix V' (a detached view ``[V', D_t]``, no copy), for the
        duration of the ``with`` block.

        Under ZeRO-3 the head is partitioned: it is gathered on entry and released on exit (a collective:
        every rank enters this block once per call site, whatever its data).
        """
        module = getattr(self.engine, "module", self.engine)  # a DeepSpeed engine, or the bare module (tests)
        weight = self.family.lm_head_weight(module.model)
        gather = contextlib.nullcontext()
        if hasattr(weight, "ds_id"):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
        with gather:
            full = weight.detach()
            yield full if module.vocab_limit is None else full[: module.vocab_limit]


def _twice(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.cat([x, x])


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
