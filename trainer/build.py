"""What a run is built from, before its loop starts: the dataset checks that need no process
group, this rank's loaders, and the sharded model with its optimizers. One path, so the trainer
and the benchmarks' minimal loop train the same thing."""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from pathlib import Path

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer

from data_pipeline.loader import RankLoader
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import SPLITS, DatasetSchema, check_files
from data_pipeline.storage import is_local, is_url
from models import build_model
from models.penalty import penalise
from trainer.checkpoint.resume import checkpoint_root
from trainer.config import Config, ConfigError
from trainer.distributed import DistEnv, plan_with_estimate, shard_model
from trainer.logs import noise_levels
from trainer.optim import apply_sparse_optimizer, build_optimizer
from trainer.tracking import missing_packages


def preflight(cfg: Config) -> DatasetSchema:
    """Everything checkable before any process group exists: dataset, files, columns, types, and
    that the run can write where it will (found now, not at the first save after the compute)."""
    schema = DatasetSchema.load(cfg.data.path)
    for split in SPLITS:
        check_files(schema, split)
    if is_url(cfg.run_dir):  # Path() would quietly make it the local folder "s3:/bucket/..."
        raise ConfigError(
            f"run_dir {cfg.run_dir}: a run directory is local (metrics.jsonl, TensorBoard, the lock); "
            "put the checkpoints in the bucket with --checkpoint.dir URL"
        )
    missing = missing_packages(cfg.logging)
    if missing == ["tensorboard"] and "logging.backends" not in cfg.explicit:  # the default, not asked for
        cfg.logging.backends.remove("tensorboard")
        missing = []
        if os.environ.get("RANK", "0") == "0":
            print(
                "note: TensorBoard is not installed: curves go to metrics.jsonl only "
                "(pip install 'recsys-trainer[tensorboard]')"
            )
    run_dir = Path(cfg.run_dir)
    checked = [("run directory", run_dir)]
    checked += [("TensorBoard directory", run_dir / "tb")] if "tensorboard" in cfg.logging.backends else []
    for what, path in checked:
        check_writable(path, what)
    if missing:
        raise ConfigError(
            f"logging.backends {' '.join(missing)}: not installed here (pip install 'recsys-trainer[tracking]', "
            "or pick other backends)"
        )
    if cfg.checkpoint.enabled:
        check_writable(checkpoint_root(cfg), "checkpoint.dir")
    return schema


def check_writable(path: Path, what: str) -> None:
    """Raise ConfigError unless `path` is a directory this process can create entries in, or can
    be created: a probe directory is made (and removed) in its nearest existing ancestor, so
    nothing is left behind, even in a run directory another run holds. On an object store, an
    empty probe object is written and deleted (credentials, bucket and permissions, all at once)."""
    if not is_local(path):
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as e:  # botocore's and the other stores' errors share no base class
            raise ConfigError(f"{what} {path} cannot be written: {type(e).__name__}: {e}") from None
        return
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file" if existing == path else f"{existing} is a file")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-probe-"))
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written: {e.strerror or type(e).__name__}") from None


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
    if opt.embedding_l2 > 0:
        penalise(sharded.module, opt.embedding_l2)
    optimizer = build_optimizer(
        sharded, opt.dense, opt.dense_lr, opt.eps, opt.weight_decay, opt.grad_clip_norm, tables=tables
    )
    return sharded, optimizer, plan, estimate
