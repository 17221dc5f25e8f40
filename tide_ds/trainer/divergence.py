"""Divergence: a run whose loss or gradient norm stays non-finite stops, instead of training through it.

DeepSpeed skips an update whose gradient norm is not finite (and with fp32 a NaN loss poisons the weights):
a run with ``lr=1e6`` used to "train" to the end with every update skipped and exit 0. Here every step
adds, on the device (no host synchronisation), whether its loss or gradient norm was non-finite; at each
log interval one all-reduce (MAX over ranks, so every rank decides alike) gives the longest run of
consecutive non-finite steps. When it reaches ``train.max_nonfinite_steps`` the run stops with
:class:`Diverged` (exit status :data:`tide_ds.failfast.DIVERGED_EXIT_CODE`) after writing that interval's
metrics record; the last checkpoint, written before the divergence, is left as it was.
"""

from __future__ import annotations

import math

import torch

from tide_ds import dist
from tide_ds.failfast import DIVERGED_EXIT_CODE


class Diverged(RuntimeError):
    """The loss or gradient norm was non-finite for ``train.max_nonfinite_steps`` consecutive steps."""

    exit_code = DIVERGED_EXIT_CODE


class DivergenceTracker:
    """Counts non-finite steps on the device; :meth:`window_record` / :meth:`check` at log intervals (collective)."""

    def __init__(self, max_nonfinite_steps: int, device: torch.device) -> None:
        self.limit = max_nonfinite_steps
        self.device = device
        self._run = torch.zeros((), dtype=torch.float64, device=device)  # consecutive non-finite steps now
        self._longest = torch.zeros((), dtype=torch.float64, device=device)  # longest run since the last record
        self._window = torch.zeros((), dtype=torch.float64, device=device)  # non-finite steps since the last record
        self.total = 0
        self.longest = 0
        self._first_bad_step: int | None = None

    def after_step(self, loss: torch.Tensor, grad_norm) -> None:
        """Record one optimizer step (no host sync: ``grad_norm`` may be a float, a tensor or None)."""
        bad = ~torch.isfinite(torch.as_tensor(loss, device=self.device).detach().double())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=self.device).double())
        bad = bad.double()
        self._run = (self._run + 1.0) * bad
        self._longest = torch.maximum(self._longest, self._run)
        self._window = self._window + bad

    def window_record(self, step: int, skipped_steps: int | None = None) -> dict:
        """This interval's counts (all-reduced MAX: the same on every rank); call on every rank at log time."""
        packed = torch.stack([self._longest, self._window, self._run]).cpu()
        if dist.is_initialized():
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
        longest, window, run = (int(v) for v in packed.tolist())
        self._longest = self._run.clone()
        self._window.zero_()
        self.total += window
        self.longest = max(self.longest, longest)
        if run and self._first_bad_step is None:
            self._first_bad_step = step - run + 1
        elif not run:
            self._first_bad_step = None
        record = {"nonfinite_steps": window, "nonfinite_steps_total": self.total, "nonfinite_run": run}
        if skipped_steps is not None:
            record["skipped_steps"] = int(skipped_steps)  # DeepSpeed's count of updates it did not apply
        return record

    def check(self, step: int, *, lr: float) -> None:
        """Raise :class:`Diverged` (on every rank alike) once the limit of consecutive non-finite steps is reached."""
        if self.limit and self.longest >= self.limit:
            since = f" since step {self._first_bad_step}" if self._first_bad_step else ""
            raise Diverged(
                f"training diverged: the loss or gradient norm was NaN/inf for {self.longest} consecutive steps "
                f"(train.max_nonfinite_steps={self.limit}){since}, stopped at step {step}; no checkpoint was "
                f"written after the divergence. Lower --train.lr (now {lr:g}), keep --train.grad_clip > 0, or check "
                "the data; resume from the last checkpoint with --train.resume=auto"
            )


def finite_or_none(record: dict) -> dict:
    """``record`` with non-finite floats as None and their keys listed under ``"nonfinite"`` (strict JSON)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
