"""Fault injection for the tests of crash safety and restarts, read from RECSYS_FAULT:

    RECSYS_FAULT=kill@STEP:RANK   RANK SIGKILLs itself after training step STEP
    RECSYS_FAULT=save@STEP:RANK   RANK fails inside the save of step STEP, after writing its files
    RECSYS_FAULT=nan@STEP:RANK    RANK's loss is NaN at step STEP (trainer.train's forward)

STEP may list several steps, comma-separated (nan@5,9:1).

Only on a job's first attempt (torchrun's TORCHELASTIC_RESTART_COUNT = 0), so a restarted job
runs clean. Unset, `fault` returns at once.
"""

from __future__ import annotations

import os
import signal


def planned(point: str, step: int, rank: int) -> bool:
    """Whether RECSYS_FAULT names this point, step and rank (on a job's first attempt)."""
    spec = os.environ.get("RECSYS_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    kind, _, where = spec.partition("@")
    at, _, who = where.partition(":")
    return kind == point and step in {int(s) for s in at.split(",")} and int(who or 0) == rank


def fault(point: str, step: int, rank: int) -> None:
    """Fail here if RECSYS_FAULT names this point ("kill" or "save"), step and rank."""
    if planned(point, step, rank):
        if point == "kill":
            print(f"RECSYS_FAULT: rank {rank} kills itself (SIGKILL) after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"RECSYS_FAULT: rank {rank} fails inside the save of step {step}")
