"""Guard for the whole distributed wiring: 2 gloo ranks under DMP (sharded tables, fused rowwise
Adagrad, DDP'd MLPs, TrainPipelineSparseDist) give the same losses as one plain process training
an unsharded copy with the same initial weights on the same rows."""

import json

import pytest
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema
from models import ModelConfig, build_model
from models.penalty import penalise
from tests.helpers.dist import copy_state_dict, run_ranks
from trainer.config import ShardingConfig
from trainer.distributed import DistEnv, plan_sharding, shard_model
from trainer.optim import apply_sparse_optimizer, build_optimizer

STEPS, BATCH = 6, 64
MODEL = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def _batches(schema, rank, world_size):
    return list(ParquetBatches(schema, "train", BATCH, rank=rank, world_size=world_size, shuffle=False))[:STEPS]


def _concat(a: Batch, b: Batch) -> Batch:
    ja, jb = a.sparse.to_dict(), b.sparse.to_dict()
    keys = a.sparse.keys()
    return Batch(
        dense=torch.cat([a.dense, b.dense]),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=torch.cat([torch.cat([ja[k].values(), jb[k].values()]) for k in keys]),
            lengths=torch.cat([torch.cat([ja[k].lengths(), jb[k].lengths()]) for k in keys]),
        ),
        labels=torch.cat([a.labels, b.labels]),
        weights=torch.cat([a.weights, b.weights]),
    )


def _rank(env: DistEnv, data: str, init_path: str, out_path: str, sharding_type: str, embedding_l2: float) -> None:
    rank, world_size = env.rank, env.world_size
    schema = DatasetSchema.load(data)
    model = build_model(MODEL, schema, env.device, torch.device("meta"))
    tables = apply_sparse_optimizer(model, "rowwise_adagrad", 0.05, 1e-8)
    plan = plan_sharding(model, env, BATCH, ShardingConfig(sharding_types=[sharding_type]))
    dmp = shard_model(model, env, plan)
    if embedding_l2:
        assert penalise(dmp.module, embedding_l2) == 1
    copy_state_dict(dmp.state_dict(), torch.load(init_path))
    pipeline = TrainPipelineSparseDist(dmp, build_optimizer(dmp, "adam", 1e-3, 1e-8, tables=tables), env.device)
    it = iter(_batches(schema, rank, world_size))
    losses = []
    while True:
        try:
            loss, *_ = pipeline.progress(it)
        except StopIteration:
            break
        torch.distributed.all_reduce(loss)
        losses.append(loss.item() / world_size)
    types = {p.sharding_type for m in plan.plan.values() for p in m.values()}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "types": sorted(types)}, f)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_synthetic(
        SyntheticSpec(rows=8000, files=2, row_group_rows=500, max_vocab=2000),
        tmp_path_factory.mktemp("syn") / "d",
        log=lambda *_: None,
    )


@pytest.mark.parametrize(
    "sharding_type, embedding_l2",
    [
        ("table_wise", 0.0),
        ("table_column_wise", 0.0),  # what the planner picks for the demo on CPU
        ("table_column_wise", 0.5),  # the embedding penalty: its gradient goes through the same fused update
        # data-parallel tables: replicated, DDP-averaged gradients, and their own (unfused)
        # rowwise Adagrad from trainer.optim, not the dense Adam DMP would leave them to
        ("data_parallel", 0.0),
        ("data_parallel", 0.5),
    ],
)
def test_two_sharded_ranks_match_one_unsharded_process(tmp_path, dataset, sharding_type, embedding_l2):
    torch.manual_seed(0)
    reference = build_model(MODEL, dataset, torch.device("cpu"), torch.device("cpu"))
    torch.save(reference.state_dict(), tmp_path / "init.pt")
    apply_sparse_optimizer(reference, "rowwise_adagrad", 0.05, 1e-8)
    if embedding_l2:
        penalise(reference, embedding_l2)
    optimizer = build_optimizer(reference, "adam", 1e-3, 1e-8)
    expected = []
    for a, b in zip(_batches(dataset, 0, 2), _batches(dataset, 1, 2)):
        optimizer.zero_grad()
        loss, outputs = reference(_concat(a, b))
        loss.backward()
        optimizer.step()
        expected.append(outputs[0].item())  # the data loss, as the pipeline reports (the penalty apart)
        assert (loss.item() > expected[-1]) == (embedding_l2 > 0)  # the penalty is in the loss trained on

    run_ranks(
        _rank,
        2,
        data=str(dataset.root),
        init_path=str(tmp_path / "init.pt"),
        out_path=str(tmp_path / "out.json"),
        sharding_type=sharding_type,
        embedding_l2=embedding_l2,
    )
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["types"] == [sharding_type]
    assert len(result["losses"]) == STEPS
    assert expected[0] != expected[-1]  # the weights did move
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), rtol=1e-4, atol=1e-5)
