"""What a run is built from, before its loop starts: this rank's loaders and the sharded model
with its optimizers (the checks that need no process group are trainer/preflight.py). One path,
so the trainer and the benchmarks' minimal loop train the same thing."""

from __future__ import annotations

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer

from data_pipeline.loader import RankLoader
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema
from models import build_model
from models.penalty import penalise
from trainer.config import Config
from trainer.distributed import DistEnv, plan_with_estimate, shard_model
from trainer.logs import noise_levels
from trainer.optim import apply_sparse_optimizer, build_optimizer


def train_loader(cfg: Config, env: DistEnv, schema: DatasetSchema) -> RankLoader:
    """This rank's share of the train split: shuffled, full batches only (pinned on CUDA)."""
    data = cfg.data
    return RankLoader(
        ParquetBatches(
            schema,
            "train",
            data.batch_size,
            env.rank,
            env.world_size,
            shuffle=data.shuffle,
            num_workers=data.num_workers,
            drop_last=True,
            seed=cfg.training.seed,
            shuffle_buffer_rows=data.shuffle_buffer_rows,
        ),
        env.device.type == "cuda",
        noise_levels(cfg.logging.verbose),
    )


def eval_loader(cfg: Config, env: DistEnv, schema: DatasetSchema, split: str) -> RankLoader:
    """This rank's share of `split` in file order, every row (the last batch padded)."""
    return RankLoader(
        ParquetBatches(
            schema,
            split,
            cfg.data.eval_batch_size,
            env.rank,
            env.world_size,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            drop_last=False,
            seed=cfg.training.seed,
        ),
        env.device.type == "cuda",
        noise_levels(cfg.logging.verbose),
    )


def build_sharded(
    cfg: Config, env: DistEnv, schema: DatasetSchema
) -> tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan, list[dict[str, float]] | None]:
    """The model as it trains: built with its tables on `meta`, the sparse optimizer fused into
    them, planned, sharded (DMP), and the dense optimizer combined with the fused one. Returns
    (model, optimizer, plan, the planner's memory estimate per rank)."""
    model = build_model(cfg.model, schema, dense_device=env.device, sparse_device=torch.device("meta"))
    opt = cfg.optimizer
    tables = apply_sparse_optimizer(model, opt.sparse, opt.sparse_lr, opt.eps, opt.table_lrs())
    plan, estimate = plan_with_estimate(model, env, cfg.data.batch_size, cfg.sharding)
    sharded = shard_model(model, env, plan)
    if cfg.training.compile:
        compile_dense(sharded.module)
    if opt.embedding_l2 > 0:
        penalise(sharded.module, opt.embedding_l2)
    optimizer = build_optimizer(
        sharded, opt.dense, opt.dense_lr, opt.eps, opt.weight_decay, opt.grad_clip_norm, tables=tables
    )
    return sharded, optimizer, plan, estimate


def compile_dense(module: torch.nn.Module) -> None:
    """torch.compile, in place, every largest submodule with its own forward, parameters and no
    sharded table: the dense MLPs and cross layers compile, the tables' lookups and all-to-alls
    (which the pipeline splits across steps) stay eager. In place, so DDP's hooks and the state
    dict's keys are unchanged."""
    for child in module.children():
        has_forward = type(child).forward is not torch.nn.Module.forward  # not a ModuleDict/ModuleList
        if not has_forward or any(isinstance(m, ShardedModule) for m in child.modules()):
            compile_dense(child)
        elif any(True for _ in child.parameters()):
            child.compile()
