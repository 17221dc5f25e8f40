"""Cooperative preemption: a signal asks for a checkpoint at the next step boundary, then a clean exit.

Slurm warns a job before it ends it: ``#SBATCH --signal=B:USR1@180`` sends SIGUSR1 to the batch
shell 180 s before the time limit (``launch/slurm/tide.sbatch`` forwards it to every rank), and
preemption or ``scancel`` sends SIGTERM, followed by SIGKILL after the site's grace time. The
handler installed here only records the signal: nothing is saved from inside a signal handler,
where a collective or a half-written file would be unsafe. The training loop asks
:meth:`PreemptionGuard.should_stop` after every optimizer step; the answer is the MAX over all ranks
of "this rank has seen a signal" (one all-reduce of one integer), so every rank stops at the same
step even when the signal reached only some of them, or reached them during different steps. The
loop then writes an ordinary checkpoint at that step (atomic, as every checkpoint) and raises
:class:`Preempted`; ``launch/run.py`` turns it into exit code :data:`PREEMPTED_EXIT_CODE` (75,
EX_TEMPFAIL), which the sbatch script answers with ``scontrol requeue``; the requeued job runs with
``--train.resume=auto`` and continues from that checkpoint with identical losses. A second signal
in the resumed run works the same way, so a job cancelled twice in a row loses only the partial step
in progress each time.

The check is a host-side all-reduce on a CPU (gloo) tensor: on GPU runs it uses a separate gloo
group, so it adds no device synchronisation to the loop (the loop's only device sync stays at log
intervals), only one small host collective per step.

Deviation from the reference: its Slurm script sets ``--requeue`` but the trainer has no handler, so
a requeued job restarts from the last periodic checkpoint (or from scratch).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tide_ds import dist
from tide_ds.config import parse_signals

logger = logging.getLogger(__name__)

#: Exit status of a run that stopped for a preemption after writing its checkpoint (sysexits' EX_TEMPFAIL:
#: "try again later"). The sbatch script requeues the job on this status and only on it.
PREEMPTED_EXIT_CODE = 75
#: Environment variable naming a file that rank 0 writes after a preemption checkpoint (see :func:`write_marker`).
MARKER_ENV = "TIDE_PREEMPT_MARKER"


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint at ``step`` is complete on all ranks."""

    def __init__(self, step: int, signal_name: str) -> None:
        super().__init__(f"stopped at step {step} after {signal_name}; checkpoint written, resume with --train.resume=auto")
        self.step = step
        self.signal_name = signal_name


class PreemptionGuard:
    """Signal handlers that set a flag, and the rank-consistent question "stop here?".

    Install it as early as possible (before the process group exists is fine): until then SIGUSR1's
    default action would kill the rank. The first :meth:`should_stop` creates the host-side process
    group it needs (a collective, like every call of it).
    """

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._group = None
        self._group_ready = False
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._interrupted = False
        #: Timeout of the host-side group (``train.dist_timeout_minutes``); a new group does not inherit the world's.
        self.group_timeout: datetime.timedelta | None = None

    def install(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signals:
            logger.info(
                "preemption: %s -> checkpoint at the next step boundary, exit code %d",
                "/".join(s.name for s in self.signals), PREEMPTED_EXIT_CODE,
            )
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only record: no collectives, no locks inside a signal handler (os.write is safe).
        if signum == signal.SIGINT:
            if self._interrupted:  # a second Ctrl-C: leave now, without a checkpoint
                os.write(2, b"tide-ds: second Ctrl-C: exiting now, without a checkpoint\n")
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
                return
            self._interrupted = True
            os.write(2, b"tide-ds: Ctrl-C: checkpoint at the next step boundary, then exit "
                        b"(Ctrl-C again to exit at once, without one)\n")
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_at = time.monotonic()

    def request(self, sig: signal.Signals = signal.SIGUSR1) -> None:
        """Ask for a stop as a signal would (tests, or a caller that learns of a preemption otherwise)."""
        self._handle(sig, None)

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank has received a signal (collective: call it on all ranks).

        Without signals to watch (``train.preempt_signals=""``, the same on every rank) there is no collective.
        """
        if not self.signals:
            return False
        distributed = dist.is_initialized() and dist.world_size() > 1
        if distributed and not self._group_ready:
            if torch.distributed.get_backend() != "gloo":
                # a host-side group, so that the check never touches the GPU stream
                self._group = torch.distributed.new_group(backend="gloo", timeout=self.group_timeout)
            self._group_ready = True
        self._flag.fill_(0 if self.received is None else int(self.received))
        if distributed:
            torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(self._flag.item())

    def agreed_signal_name(self) -> str:
        """Name of the signal that stopped the run (the largest signal number any rank saw, as all-reduced)."""
        value = int(self._flag.item())
        try:
            return signal.Signals(value).name
        except ValueError:
            return f"signal {value}"

    def stop(self, step: int, *, save: Callable[[int], None] | None, close: Callable[[], None] | None = None) -> None:
        """Checkpoint at ``step`` (``save=None`` when one was just written there), then raise :class:`Preempted`."""
        name = self.agreed_signal_name()
        waited = "" if self.received_at is None else f", {time.monotonic() - self.received_at:.1f}s after it arrived here"
        logger.info("preemption: %s -> stopping at step %d%s; writing the checkpoint", name, step, waited)
        if save is not None:
            save(step)
        if close is not None:
            close()
        self.uninstall()
        write_marker(step, name)
        logger.info("preemption: checkpoint at step %d complete; exiting with code %d for a requeue", step, PREEMPTED_EXIT_CODE)
        raise Preempted(step, name)


def write_marker(step: int, signal_name: str) -> None:
    """Rank 0 records the stop in ``$TIDE_PREEMPT_MARKER`` (when set), atomically.

    The exit status alone is not reliable across launchers: when one node's launcher exits with 75 first,
    ``srun --kill-on-bad-exit`` ends the others with SIGTERM and srun reports 143. ``tide.sbatch`` reads
    this file to know that the run stopped for a preemption with its checkpoint complete.
    """
    path = os.environ.get(MARKER_ENV, "").strip()
    if not path or dist.rank() != 0:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"step": step, "signal": signal_name, "time": time.time()}) + "\n")
    os.replace(tmp, target)


def install(spec: str) -> PreemptionGuard:
    """Build and install the guard for ``train.preempt_signals`` plus SIGINT (all ranks call this).

    Ctrl-C (SIGINT) is handled as SIGTERM: a checkpoint at the next step boundary, then exit code 75; a
    second Ctrl-C exits at once. With ``train.preempt_signals=""`` no handler is installed at all.

    Python delivers signals to the main thread only; called from another thread (a library user's
    worker), the guard watches nothing and says so, on every rank alike.
    """
    signals = parse_signals("train.preempt_signals", spec)
    if signals and signal.SIGINT not in signals:
        signals.append(signal.SIGINT)  # Ctrl-C: as SIGTERM (a second one exits at once)
    if signals and threading.current_thread() is not threading.main_thread():
        logger.warning("preemption: train() runs outside the main thread; %s will not be handled", spec)
        signals = []
    return PreemptionGuard(signals).install()
