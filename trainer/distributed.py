"""All distributed setup in one place: device, process group, sharding plan, DMP wrapping.

The device and backend are chosen at run time: `cuda:LOCAL_RANK` with NCCL when a GPU is
visible, otherwise CPU with gloo, so the same code runs on a laptop, in CI and on a GPU cluster.
Rank and world size come from the variables torchrun and TorchX set; a plain `python -m trainer`
runs as a one-rank world.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    PlannerError,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from trainer.config import UVM_KERNELS, ShardingConfig

T = TypeVar("T")


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


def free_port() -> int:
    """A TCP port free on this host now (for a one-rank world's rendezvous, and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or, outside torchrun, create a one-rank) process group on the right device."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
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


def raise_on_every_rank(check: Callable[[], T], errors: type[Exception]) -> T:
    """Run `check` on every rank; if it raises `errors` on any, raise the first such message on all
    (before a collective that the other ranks would otherwise enter alone, and hang in)."""
    result, error = None, None
    try:
        result = check()
    except errors as e:
        error = str(e)
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, error)
    found = [m for m in messages if m]
    if found:
        raise errors(found[0])
    return result


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 alone, its result (which may be an exception to raise) on every rank."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PlanError(ValueError):
    """No sharding plan fits the tables into the memory the planner was given."""


def topology(env: DistEnv, sharding: ShardingConfig) -> Topology:
    """The hardware the planner plans for: this device's memory (or the configured caps), the
    ranks per host, and the configured bandwidths (torchrec's defaults where unset)."""
    gb = 1024**3
    if sharding.hbm_cap_gb:
        hbm = int(sharding.hbm_cap_gb * gb)
    else:
        hbm = torch.cuda.get_device_properties(env.device).total_memory if env.device.type == "cuda" else None
    if sharding.ddr_cap_gb:
        ddr = int(sharding.ddr_cap_gb * gb)
    else:
        ddr = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // env.local_world_size
    per_ms = gb / 1000  # the planner's bandwidths are in bytes/ms
    hardware = HardwareConfig(
        hbm_cap_bytes=hbm,
        ddr_cap_bytes=ddr,
        intra_host_bw=sharding.intra_host_bw_gbps * per_ms or None,
        inter_host_bw=sharding.inter_host_bw_gbps * per_ms or None,
    )
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size),
        hardware,
        KernelConfig(
            compute_device=env.device.type, use_hardware_based_bandwidth=True
        ),  # our bandwidths, defaults for unset ones
    )


def table_constraints(model: nn.Module, sharding: ShardingConfig, device_type: str) -> dict[str, ParameterConstraints]:
    """One ParameterConstraints per table: the allowed sharding types and kernels (per-table
    entries override the global lists), the cache size for UVM caching, the narrowest column shard.
    An unpooled table (EmbeddingCollection) is never data_parallel off CUDA: torchrec's replicated
    sequence kernel fails on CPU (FBGEMM #4586)."""
    pooled = [
        t.name for m in model.modules() if isinstance(m, EmbeddingBagCollection) for t in m.embedding_bag_configs()
    ]
    unpooled = [t.name for m in model.modules() if isinstance(m, EmbeddingCollection) for t in m.embedding_configs()]
    tables = pooled + unpooled
    types, kernels = sharding.table_types(), sharding.table_kernels()
    unknown = sorted((set(types) | set(kernels)) - set(tables))
    if unknown:
        raise ValueError(
            f"sharding.table_*: no table named {', '.join(unknown)}; the model's tables: {', '.join(tables)}"
        )
    constraints = {}
    for table in tables:
        table_kernels = kernels.get(table, sharding.compute_kernels) or None
        if device_type != "cuda" and table_kernels and set(table_kernels) & set(UVM_KERNELS):
            raise ValueError(
                f"sharding: {table} may only use {table_kernels}, but UVM kernels need a GPU "
                f"(this run is on {device_type})"
            )
        table_types = types.get(table, sharding.sharding_types)
        if table in unpooled and device_type != "cuda":
            if table_types == ["data_parallel"]:
                raise ValueError(f"sharding: {table} is an unpooled table, which cannot be data_parallel on CPU")
            table_types = [t for t in table_types if t != "data_parallel"]
        constraints[table] = ParameterConstraints(
            sharding_types=table_types,
            compute_kernels=table_kernels,
            min_partition=sharding.min_partition or None,
            cache_params=CacheParams(load_factor=sharding.cache_load_factor),
        )
    return constraints


def plan_sharding(
    model: nn.Module, env: DistEnv, batch_size: int, sharding: ShardingConfig | None = None
) -> ShardingPlan:
    """Ask torchrec's planner where each table goes (see `plan_with_estimate`)."""
    return plan_with_estimate(model, env, batch_size, sharding)[0]


def plan_with_estimate(
    model: nn.Module, env: DistEnv, batch_size: int, sharding: ShardingConfig | None = None
) -> tuple[ShardingPlan, list[dict[str, float]] | None]:
    """(plan, the planner's estimate of each rank's memory) from torchrec's planner. Rank 0 plans
    and broadcasts the plan (or its failure), so all ranks agree even if their estimates differ,
    and all fail together."""
    sharding = sharding or ShardingConfig()
    planner = EmbeddingShardingPlanner(
        topology=topology(env, sharding),
        batch_size=batch_size,
        constraints=table_constraints(model, sharding, env.device.type),
        storage_reservation=FixedPercentageStorageReservation(sharding.storage_reserve),
    )

    def plan_or_error() -> tuple[ShardingPlan, list[dict[str, float]] | None] | PlanError:
        try:
            plan = planner.plan(model, get_default_sharders())
        except PlannerError as e:
            return PlanError(_plan_failure(model, env, sharding, e))
        return plan, _estimate_per_rank(planner, env.world_size)

    result = invoke_on_rank_and_broadcast_result(dist.GroupMember.WORLD, 0, plan_or_error)
    if isinstance(result, PlanError):
        raise result
    return result


def _estimate_per_rank(planner: EmbeddingShardingPlanner, world_size: int) -> list[dict[str, float]] | None:
    """The planner's storage estimate of each rank in GB (device and host memory: shards, their
    optimizer state and the lookup's input/output buffers), summed from the sharding options it
    chose. torchrec keeps those only in a private attribute; None if that ever changes."""
    options = getattr(planner, "_best_plan", None)
    if not options:
        return None
    hbm, ddr = [0] * world_size, [0] * world_size
    for option in options:
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                hbm[shard.rank] += shard.storage.hbm
                ddr[shard.rank] += shard.storage.ddr
    return [{"hbm_gb": round(h / 1e9, 4), "ddr_gb": round(d / 1e9, 4)} for h, d in zip(hbm, ddr)]


def _plan_failure(model: nn.Module, env: DistEnv, sharding: ShardingConfig, error: Exception) -> str:
    """What did not fit, in a few lines, with what to change."""
    configs = [t for m in model.modules() if isinstance(m, EmbeddingBagCollection) for t in m.embedding_bag_configs()]
    biggest = max(configs, key=lambda t: t.num_embeddings * t.embedding_dim)
    table_gb = sum(t.num_embeddings * t.embedding_dim for t in configs) * 4 / 1024**3
    memory = "hbm_cap_gb" if env.device.type == "cuda" else "ddr_cap_gb"
    last = [line.strip() for line in str(error).splitlines() if line.strip()][-1][:300]
    return (
        f"no sharding plan fits the {len(configs)} tables ({table_gb:.3f} GB of weights, the biggest {biggest.name} "
        f"{biggest.num_embeddings:,} x {biggest.embedding_dim}) on {env.world_size} rank(s) with "
        f"sharding.{memory} {getattr(sharding, memory) or 'detected'} and storage_reserve {sharding.storage_reserve}. "
        f"Give the planner more memory or ranks, or let it split tables: sharding types {sharding.sharding_types}"
        f"{', min_partition ' + str(sharding.min_partition) if sharding.min_partition else ''} "
        f"(row_wise needs CUDA; column_wise cuts shards of at least min_partition columns; "
        f"fused_uvm_caching keeps big tables in host memory). Planner: {last}"
    )


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
