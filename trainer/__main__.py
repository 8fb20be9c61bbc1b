"""Per-rank entry point of the trainer.

    # one process (a one-rank world, CPU or one GPU)
    python -m trainer --config configs/demo.toml
    # N ranks on this machine (what `recsys train --nproc-per-node N` runs)
    torchrun --standalone --nproc-per-node 2 -m trainer --config configs/demo.toml --data.batch_size 4096
    # several machines: the same on every node, with --nnodes, --node-rank and --rdzv-endpoint
    # (or let TorchX do it: launch/components.py, docs/cluster.md)

Flags: --config FILE, then any `--section.key VALUE` override; `--help` lists them all.

A run saves checkpoints in <run_dir>/checkpoints and, started again (by hand, or by torchrun
--max-restarts after a failure), continues from the latest one (checkpoint.resume = "auto").
Rank 0 holds a lock on the run directory for the run's life (data_pipeline.dirlock): a second
run into it fails at once, naming the first.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from data_pipeline.dirlock import DirInUse, DirLock
from data_pipeline.schema import DataError, DatasetSchema
from trainer.checkpoint import CheckpointError, find_resume
from trainer.checkpoint.store import OutOfSpace
from trainer.config import Config, load_config
from trainer.defaults import resolve
from trainer.distributed import DistEnv, PlanError, destroy_distributed, init_distributed, raise_on_every_rank
from trainer.guard import Diverged
from trainer.logs import get_logger, setup_logging
from trainer.preflight import message, preflight
from trainer.train import Trainer

log = get_logger(__name__)

PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
"""How gloo reports a collective whose peer process is gone."""

PEER_LOST_GRACE_S = 10.0
"""How long a rank whose peer vanished waits before it exits 1 (torchrun stops it sooner)."""

DIVERGED_EXIT = 3
"""The exit code of a run the numerics guard stopped (2 is bad input)."""


def _join_attempt_process_group() -> None:
    """Under torchrun, join the process group through a per-attempt namespace of the agent's store.

    torchrun restarts a failed worker group (--max-restarts) with the same TCPStore, in which the
    keys the failed attempt wrote are still set: a restarted rank can read a dead peer's address
    and fail with "Gloo connectFullMesh failed ... Connection refused" (pytorch/pytorch#167288).
    A prefix per attempt (TORCHELASTIC_RESTART_COUNT) gives every attempt fresh keys.
    `init_distributed` then finds the group initialised and only picks the device."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    from torch.distributed.constants import default_pg_timeout

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=default_pg_timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=dist.PrefixStore(f"/attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
    )


def train_rank(cfg: Config, env: DistEnv, schema: DatasetSchema) -> dict:
    """This rank's part of the run, in its process group: the run directory's lock (rank 0), the
    checkpoint to resume, training; returns the summary. Errors are raised (main turns them into
    `error:` lines; the Python API, trainer.api, lets them through)."""
    setup_logging(env.rank, cfg.logging.verbose)
    lock = DirLock(cfg.run_dir, "run directory")
    try:
        raise_on_every_rank(lambda: lock.acquire() if env.is_main else None, DirInUse)
        if lock.note:
            log.info(f"note: {lock.note}")
        resume = find_resume(cfg, env, schema)
        return Trainer(cfg, env, schema, resume).run()
    finally:
        lock.release()


def _say_from_rank(cfg, env, line: str) -> None:
    """Print one rank's own line to the shared stderr. Rank 0's progress bar may be mid-line there
    (its line is ended only when rank 0 itself stops), so another rank starts a fresh line first:
    the message must begin a line for a reader (or `grep ^error`) to find it."""
    fresh = "\n" if env.rank != 0 and cfg.training.progress_bar else ""
    sys.stderr.write(f"{fresh}{line}\n")  # one write: nothing from rank 0 lands inside the line
    sys.stderr.flush()


def _outlive_the_cause() -> None:
    """Let the rank that failed first exit first. Its peers see the lost connection while it is
    still tearing down, and torchrun reports whichever rank exits first as the root cause: an exit
    1 from here would hide the failing rank's exit 2 behind torchrun's failure report (seen on a
    loaded machine). torchrun terminates this rank as soon as the other one is gone, so the wait
    costs nothing there; SIGTERM is made fatal again in case the preemption handler still holds it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(PEER_LOST_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    # A rank that crashes in native code (SIGSEGV, or SIGABRT from glibc's heap checks) prints
    # every thread's Python stack first, so the job's log says where it was.
    faulthandler.enable(all_threads=True)
    rank = os.environ.get("RANK", "0")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv, prog="python -m trainer")
        schema = preflight(cfg)
        resolve(cfg, schema, int(os.environ.get("WORLD_SIZE", "1")))
    except (DataError, ValueError) as e:
        if rank == "0":  # every rank finds the same problem; say it once
            print(f"error: {message(e)}", file=sys.stderr)
        return 2
    _join_attempt_process_group()
    env = init_distributed()
    try:
        summary = train_rank(cfg, env, schema)
    except DirInUse as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        if env.is_main:  # every rank saw the same all-reduced numbers
            print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT
    except OutOfSpace as e:  # found by each rank whose write failed
        _say_from_rank(cfg, env, f"error (rank {env.rank}): {e}")
        return 2
    except CheckpointError as e:
        if env.is_main:  # every rank agreed on the same problem
            print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        _say_from_rank(cfg, env, f"error (rank {env.rank}): {message(e)}")
        return 2
    except RuntimeError as e:
        if not any(words in str(e) for words in PEER_LOST):
            raise
        # a collective failed because another rank exited: that rank printed the cause
        _say_from_rank(cfg, env, f"rank {env.rank}: stopped because another rank failed (its error is above)")
        _outlive_the_cause()
        return 1
    except PlanError as e:
        if env.is_main:  # rank 0's planner failed and every rank raised its message
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return summary.get("exit_code", 0)  # 128 + the signal's number after a preemption


if __name__ == "__main__":
    sys.exit(main())
