"""One multi-process harness for every multi-rank test (torchrec's
`distributed/test_utils/multi_process.py` is the model):

    def _body(env: DistEnv, data: str) -> None:      # runs on every rank, inside its process group
        ...
    run_ranks(_body, world_size=2, data=str(path))    # asserts every rank exits 0

Each rank is a fresh process (`spawn`) that gets the variables torchrun would set, joins the group
through the trainer's own `init_distributed` (so the device is chosen at run time: cuda:LOCAL_RANK
with NCCL where there is a GPU, else CPU with gloo), runs the body, and destroys the group. A rank
that raises prints its traceback and exits 1; one that hangs is killed after `timeout` seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from trainer.distributed import DistEnv, destroy_distributed, free_port, init_distributed

__all__ = ["copy_state_dict", "free_port", "rank_context", "run_ranks"]


@contextmanager
def rank_context(rank: int, world_size: int, port: int) -> Iterator[DistEnv]:
    """This process as rank `rank` of `world_size`: torchrun's variables, the process group
    (created on entry, destroyed on exit), one intra-op thread as torchrun would give it."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    env = init_distributed()
    try:
        yield env
    finally:
        destroy_distributed()


def _entry(body: Callable[..., None], rank: int, world_size: int, port: int, kwargs: dict) -> None:
    try:
        with rank_context(rank, world_size, port) as env:
            body(env, **kwargs)
    except BaseException:  # noqa: BLE001 - reported, then the exit code says it
        print(f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_ranks(body: Callable[..., None], world_size: int = 2, timeout: float = 600, **kwargs) -> None:
    """Run `body(env, **kwargs)` on `world_size` ranks, each in its own process and process group;
    assert that every rank exits 0 within `timeout` seconds. `body` must be a module-level function
    and `kwargs` picklable (spawned processes import them afresh)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_entry, args=(body, rank, world_size, port, kwargs), name=f"rank{rank}")
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    hung = [p.name for p in processes if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    codes = {p.name: p.exitcode for p in processes}
    assert not hung, f"ranks still running after {timeout} s (killed): {hung}; exit codes {codes}"
    assert all(code == 0 for code in codes.values()), f"a rank failed (see its traceback above): {codes}"


def copy_state_dict(local: dict, full: dict) -> None:
    """Copy full (unsharded) tensors into a sharded model's state: each local shard gets its slice."""
    for name, tensor in local.items():
        source = full[name]
        if isinstance(tensor, ShardedTensor):
            for shard in tensor.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[r : r + h, c : c + w])
        else:
            tensor.copy_(source)
