"""An exported model scores like the sharded model it came from, for every registered model: with
the same weights, the unsharded CPU model (what `recsys predict` runs) gives the same outputs as
the model sharded table-wise over 2 gloo ranks (what training and the trainer's evaluation run).

It guards the models against depending on the sharding plan: a sharded EmbeddingBagCollection
returns its features in the plan's order, so a model that reads `.values()` of it positionally
would feed its MLP other columns under another plan, another world size, or unsharded."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from data_pipeline.prepare.synthetic import SyntheticSpec, generate
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema
from models import MODELS, ModelConfig, build_model
from tests.trainer.test_sharded_equals_unsharded import copy_state_dict
from trainer.config import ShardingConfig
from trainer.distributed import destroy_distributed, free_port, init_distributed, plan_sharding, shard_model
from trainer.optim import apply_sparse_optimizer

pytestmark = pytest.mark.slow

TOWERS = dict(
    user_features=[f"cat_{i}" for i in range(13)] + [f"int_{i}" for i in range(7)],
    item_features=[f"cat_{i}" for i in range(13, 26)] + [f"int_{i}" for i in range(7, 13)],
)


def config(name: str) -> ModelConfig:
    extra = TOWERS if name == "two_tower" else {}
    return ModelConfig(
        name=name,
        embedding_dim=8,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        deep_layer_sizes=[16],
        tower_layer_sizes=[16],
        **extra,
    )


def _rank(rank, world_size, port, data, out):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    env = init_distributed()
    schema = DatasetSchema.load(data)
    batch = next(iter(ParquetBatches(schema, "test", 256, rank=rank, world_size=world_size)))
    results = {}
    for name in MODELS:
        torch.manual_seed(0)
        reference = build_model(config(name), schema, torch.device("cpu"), torch.device("cpu"))
        for p in reference.parameters():  # the linear tables start at 0: give every weight a value
            torch.nn.init.uniform_(p.data, -0.5, 0.5)
        model = build_model(config(name), schema, env.device, torch.device("meta"))
        apply_sparse_optimizer(model, "rowwise_adagrad", 0.05, 1e-8)
        dmp = shard_model(model, env, plan_sharding(model, env, 256, ShardingConfig(sharding_types=["table_wise"])))
        copy_state_dict(dmp.state_dict(), reference.state_dict())
        dmp.eval(), reference.eval()
        with torch.no_grad():
            results[name] = (dmp(batch)[1][1], reference(batch)[1][1])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    destroy_distributed()


def test_unsharded_model_scores_like_the_sharded_one(tmp_path):
    data = generate(
        tmp_path / "data", SyntheticSpec(rows=8000, files=2, row_group_rows=500, max_vocab=2000), log=lambda *_: None
    ).root
    mp.spawn(_rank, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sorted(results) == sorted(MODELS)
        for name, (sharded, unsharded) in results.items():
            assert unsharded.std() > 0.1, name  # the outputs do depend on the weights
            torch.testing.assert_close(
                sharded,
                unsharded,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m, name=name, rank=rank: f"{name} on rank {rank}: {m}",
            )
