"""Preemption: SIGTERM, SIGINT or SIGUSR1 on any rank -> a checkpoint at a step every rank agrees
on -> exit 128 + the signal's number; the same command then resumes bit for bit.

Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds (30 s by default); Slurm sends
what `--signal` names ahead of the time limit; torchrun forwards SIGTERM/SIGINT to every rank and
kills them 30 s later. A rank's handler only sets a flag. After every step each rank adds its flag
to an asynchronous all-reduce (MAX, on a gloo group of its own, so it never queues behind the
model's collectives) and reads the previous step's result: every rank learns of a signal at the
same step, one step after any rank got it, without a host sync on the step's critical path. The
loop then stops feeding the train pipeline, which drains the batches it holds (every rank the
same number), and the trainer saves and exits (trainer.train). A second signal of the same kind
while the checkpoint is written is the user insisting: the default action (termination) runs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from data_pipeline.reader import PREEMPTION_SIGNALS

T = TypeVar("T")

SIGNALS = PREEMPTION_SIGNALS


class Preemption:
    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo")  # a collective: every rank builds it in order
        self.received = 0  # this rank's signal number (0: none)
        self.received_at = 0.0  # when (time.monotonic())
        self.agreed = 0  # the signal every rank agreed to stop for (0: none yet)
        self._pending: tuple[torch.Tensor, dist.Work] | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received == signum:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.received, self.received_at = signum, time.monotonic()

    def poll(self) -> bool:
        """Call after every training step on every rank: True once the ranks agreed to stop."""
        if self._pending is not None:
            flag, work = self._pending
            work.wait()
            self._pending = None
            self.agreed = int(flag.item())
        if not self.agreed:
            flag = torch.tensor([self.received], dtype=torch.int32)
            self._pending = flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return bool(self.agreed)

    def settle(self) -> None:
        """At a phase's end: complete the pending all-reduce (no collective left in flight across
        an evaluation or a save) and take its result."""
        self.poll()
        if self._pending is not None:
            flag, work = self._pending
            work.wait()
            self._pending = None
            self.agreed = int(flag.item())

    def batches(self, batches: Iterator[T]) -> Iterator[T]:
        """`batches` until the ranks agreed to stop."""
        for batch in batches:
            if self.agreed:
                return
            yield batch

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name if self.agreed else ""
