"""All distributed setup in one place: device, process group, sharding plan, DMP wrapping.

The device and backend are chosen at run time: `cuda:LOCAL_RANK` with NCCL when a GPU is
visible, otherwise CPU with gloo, so the same code runs on a laptop, in CI and on a GPU cluster.
Rank and world size come from the variables torchrun and TorchX set; a plain `python -m trainer`
runs as a one-rank world.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or, outside torchrun, create a one-rank) process group on the right device."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
        device=device,
        backend=backend,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def plan_sharding(
    model: nn.Module,
    env: DistEnv,
    batch_size: int,
    sharding_types: list[str] | None = None,
    hbm_cap_gb: float = 0.0,
    ddr_cap_gb: float = 0.0,
) -> ShardingPlan:
    """Ask torchrec's planner where each table goes. Every rank computes the plan and rank 0's
    is broadcast (`collective_plan`), so all ranks agree even if their estimates differ."""
    gb = 1024**3
    topology = Topology(
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        compute_device=env.device.type,
        hbm_cap=int(hbm_cap_gb * gb) if hbm_cap_gb else None,
        ddr_cap=int(ddr_cap_gb * gb) if ddr_cap_gb else None,
    )
    constraints = None
    if sharding_types:
        tables = [t.name for m in model.modules() if isinstance(m, EmbeddingBagCollection) for t in m.embedding_bag_configs()]
        constraints = {t: ParameterConstraints(sharding_types=list(sharding_types)) for t in tables}
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    return planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)


def shard_model(model: nn.Module, env: DistEnv, plan: ShardingPlan) -> DistributedModelParallel:
    """Shard the embedding tables as planned (materialising them from `meta`); the remaining
    dense modules become data-parallel (DDP)."""
    return DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=get_default_sharders())


def describe_plan(plan: ShardingPlan) -> str:
    """table -> sharding type -> ranks, one line per table."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, p in module_plan.items():  # type: ignore[union-attr]
            rows.append((table, p.sharding_type, ",".join(map(str, p.ranks or [])), p.compute_kernel, module_path))
    width = max((len(r[0]) for r in rows), default=5)
    kind = max((len(r[1]) for r in rows), default=8)
    lines = [f"{'table':<{width}}  {'sharding':<{kind}}  {'ranks':<8} {'kernel':<8} module"]
    lines += [f"{t:<{width}}  {s:<{kind}}  {r:<8} {k:<8} {m}" for t, s, r, k, m in rows]
    return "\n".join(lines)


def local_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every state tensor (a sharded table's local shards), as views into the
    live weights: copying into them changes the model. Used to keep and restore the best weights."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    tensors = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            for i, shard in enumerate(value.local_shards()):
                tensors[f"{key}#{i}"] = shard.tensor
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
    return tensors
