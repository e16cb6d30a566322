"""SLURM's stop signals, honoured anywhere in a job.

SIGUSR2 (SLURM's warning before a time limit or a preemption, `--signal=USR2@300`) and SIGTERM (preemption,
`scancel`) both mean: stop soon, so that the job can be requeued and resume. The handler is installed
before any work (trainer.run), and the signal acts at the next of these points:

- in the training loop, before every micro-step: the ranks agree (`agreed()`, a one-number all-reduce in
  the host group: no GPU sync) and, as soon as any rank got the signal, all of them write a checkpoint of
  the last completed step and stop. A micro-batch is the longest wait, whatever the accumulation; the
  accumulated gradients of an unfinished step are dropped (the resumed job redoes that step identically);
- during rank 0's solo work (`solo`: encoding the toy data, exporting, publishing, the comparison grid):
  the work stops at once (every file it writes is published by a rename, so nothing half-written remains)
  and every rank stops with it;
- at the start of every phase and after every solo work (`check()`), for a signal that came in between
  (loading models, building engines).

Each stop raises `Preempted`; trainer.run exits with 75 and the same command resumes. DataLoader workers
ignore both signals (SLURM signals every process of a task, workers included): the main process decides.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Callable, Optional, TypeVar

from trainer.runtime import collectives

T = TypeVar("T")
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(Exception):
    """Raised after the checkpoint (if any progress needed one) is written; the job is requeued."""


class Preemption:
    def __init__(self):
        self.requested_at: Optional[float] = None  # time.monotonic() of the first signal
        self.signal_name = ""
        self._immediate = 0
        for sig in SIGNALS:
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker)
                pass

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handler(self, signum, frame):
        if self.requested_at is None:
            self.requested_at, self.signal_name = time.monotonic(), signal.Signals(signum).name
        if self._immediate:
            raise Preempted(f"{self.signal_name} received during rank 0's solo work: stopped it")

    @contextmanager
    def immediate(self):
        """Inside, a signal (or one that already came) stops the work at once."""
        if self.requested:
            raise Preempted(f"{self.signal_name} received: not starting rank 0's solo work")
        self._immediate += 1
        try:
            yield
        finally:
            self._immediate -= 1

    def agreed(self) -> bool:
        """Whether any rank got a signal; every rank must call it at the same points."""
        return collectives.any_rank_host(self.requested)

    def check(self, where: str) -> None:
        if self.agreed():
            raise Preempted(f"stop signal ({self.signal_name or 'on another rank'}) honoured {where}")


_PREEMPTION: Optional[Preemption] = None


def preemption_handler() -> Preemption:
    """One handler per process, installed as early as possible (trainer.run does it before any work)."""
    global _PREEMPTION
    if _PREEMPTION is None:
        _PREEMPTION = Preemption()
    return _PREEMPTION


def solo(what: str, work: Callable[[], T], log: bool = True) -> T:
    """collectives.on_main with preemption: rank 0 runs `work` alone, stopped at once by a signal, and every
    rank stops with it; a signal that reached only the waiting ranks is honoured right after."""
    handler = preemption_handler()

    def guarded() -> T:
        with handler.immediate():
            return work()

    try:
        result = collectives.on_main(what, guarded, log=log)
    except collectives.MainWorkFailed as failed:
        if failed.error_type == Preempted.__name__:
            raise Preempted(str(failed)) from None
        raise
    handler.check(f"after {what}")
    return result


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the stop signals are the main process's to handle; a worker killed by
    SIGTERM would make the main process fail instead of writing its checkpoint."""
    for sig in (*SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
