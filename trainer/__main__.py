"""Per-rank entry point of the trainer.

    # one process (a one-rank world, CPU or one GPU)
    python -m trainer --config configs/demo.toml
    # N ranks on this machine (what `recsys train --nproc-per-node N` runs)
    torchrun --standalone --nproc-per-node 2 -m trainer --config configs/demo.toml --data.batch_size 4096
    # several machines: the same on every node, with --nnodes, --node-rank and --rdzv-endpoint
    # (or let TorchX do it: launch/components.py, README "Run on a cluster")

Flags: --config FILE, then any `--section.key VALUE` override; `--help` lists them all.
"""

from __future__ import annotations

import faulthandler
import os
import sys

from data_pipeline.schema import DataError
from trainer.config import load_config
from trainer.distributed import PlanError, destroy_distributed, init_distributed
from trainer.train import Trainer, preflight


def _message(error: DataError) -> str:
    """The error's own message, without the worker traceback a DataLoader wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("DataError: ", 1)[-1]
    return text


def main(argv: list[str] | None = None) -> int:
    # A rank that crashes in native code (SIGSEGV, or SIGABRT from glibc's heap checks) prints
    # every thread's Python stack first, so the job's log says where it was.
    faulthandler.enable(all_threads=True)
    cfg = load_config(argv)
    rank = os.environ.get("RANK", "0")
    try:
        schema = preflight(cfg)
    except DataError as e:
        if rank == "0":  # every rank finds the same problem; say it once
            print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    env = init_distributed()
    try:
        Trainer(cfg, env, schema).run()
    except DataError as e:
        print(f"error (rank {env.rank}): {_message(e)}", file=sys.stderr)
        return 2
    except PlanError as e:
        if env.is_main:  # rank 0's planner failed and every rank raised its message
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
