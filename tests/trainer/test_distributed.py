"""Host-dependent choices of the distributed setup (trainer/distributed.py)."""

import os

import pytest
import torch

from trainer.distributed import DistEnv, loader_workers


def _env(ranks_on_host: int) -> DistEnv:
    return DistEnv(rank=0, world_size=2 * ranks_on_host, local_rank=0, local_world_size=ranks_on_host,
                   device=torch.device("cpu"), backend="gloo")


@pytest.mark.parametrize("cores, ranks, workers", [(2, 1, 1), (2, 2, 0), (3, 2, 0), (4, 2, 1), (96, 8, 1), (1, 1, 0)])
def test_auto_loader_workers_need_a_spare_core_per_rank(monkeypatch, cores, ranks, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loader_workers(-1, _env(ranks)) == workers
    assert loader_workers(3, _env(ranks)) == 3 and loader_workers(0, _env(ranks)) == 0  # explicit counts stay
