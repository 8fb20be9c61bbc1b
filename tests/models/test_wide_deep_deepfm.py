"""Wide&Deep and DeepFM: shapes on the tiny dataset, the wide part's own optimizer (unsharded hooks
and fused under DMP), and a 2-rank run of the real trainer for each."""

import itertools
import json

import pyarrow as pa
import pytest
import torch

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema, SparseFeature
from models import ModelConfig, build_model
from models.deepfm import second_order
from models.embeddings import LINEAR_WIDTH
from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.dist import run_ranks
from tests.helpers.runs import train
from trainer.config import ShardingConfig
from trainer.distributed import DistEnv, plan_sharding, shard_model
from trainer.optim import apply_sparse_optimizer

SMALL = dict(embedding_dim=4, deep_layer_sizes=[8, 4])


def _tiny(tmp_path, table, dense=("d0", "d1"), sparse=TINY_SPARSE, task="binary"):
    schema = write_dataset(tmp_path, {"train": [table]}, list(sparse), list(dense))
    schema.task = task
    (batch,) = list(ParquetBatches(schema, "train", batch_size=table.num_rows))
    return schema, batch


def _wide_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".wide." in name}


@pytest.mark.parametrize(
    "name,task,dense,batch_norm",
    [
        ("wide_deep", "binary", ("d0", "d1"), False),
        ("wide_deep", "regression", (), True),
        ("deepfm", "binary", (), False),
        ("deepfm", "regression", ("d0", "d1"), True),
    ],
)
def test_forward_backward(tmp_path, tiny_table, name, task, dense, batch_norm):
    schema, batch = _tiny(tmp_path, tiny_table, dense, task=task)
    assert batch.dense.shape == (5, len(dense))
    cfg = ModelConfig(name=name, batch_norm=batch_norm, dropout=0.1, **SMALL)
    model = build_model(cfg, schema, torch.device("cpu"), torch.device("cpu"))
    assert model.model(batch.dense, batch.sparse).shape == (5, 1)
    loss, (_, logits, _, _) = model(batch)
    assert logits.shape == (5,) and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    tables = model.model.sparse_arch.embedding_bag_collection
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables.parameters())


def test_wide_tables_are_linear_and_hold_the_crosses(tmp_path, tiny_table):
    """Wide: one zero-initialised weight per id of every feature, crosses included; deep: base features only."""
    table = tiny_table.append_column("a_x_m", pa.array([0, 1, 2, 3, 4], pa.int64()))
    schema, _ = _tiny(tmp_path, table, sparse=[*TINY_SPARSE, SparseFeature("a_x_m", 5)])
    model = build_model(ModelConfig(name="wide_deep", **SMALL), schema, torch.device("cpu"), torch.device("cpu")).model
    wide = model.wide.embedding_bag_collection.embedding_bag_configs()
    assert [(t.name, t.embedding_dim, t.pooling.name) for t in wide] == [
        ("wide_a", LINEAR_WIDTH, "SUM"),
        ("wide_m", LINEAR_WIDTH, "SUM"),
        ("wide_a_x_m", LINEAR_WIDTH, "SUM"),
    ]
    assert all((p == 0).all() for p in model.wide.embedding_bag_collection.parameters())
    deep = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert [(t.name, t.embedding_dim, t.pooling.name) for t in deep] == [("t_a", 4, "SUM"), ("t_m", 4, "MEAN")]


def test_wide_part_gets_its_own_adagrad(tmp_path, tiny_table):
    """One backward with the in-backward hooks: the deep tables get the configured optimizer, the
    wide weights Adagrad at wide_lr, whose first step moves every weight with a gradient by lr."""
    schema, batch = _tiny(tmp_path, tiny_table)
    model = build_model(
        ModelConfig(name="wide_deep", wide_lr=0.3, **SMALL), schema, torch.device("cpu"), torch.device("cpu")
    )
    apply_sparse_optimizer(model, "rowwise_adagrad", 0.01, 1e-8)
    for p in model.model.sparse_arch.parameters():
        assert p._optimizer_classes[0].__name__ == "RowWiseAdagrad" and p._optimizer_kwargs[0]["lr"] == 0.01
    for p in model.model.wide.embedding_bag_collection.parameters():
        assert p._optimizer_classes[0] is torch.optim.Adagrad and p._optimizer_kwargs[0]["lr"] == 0.3
    before = _wide_weights(model)
    loss, _ = model(batch)
    loss.backward()
    after = _wide_weights(model)
    ids = {"wide_a": [3, 0, 9, 1], "wide_m": [1, 2, 4, 5, 6, 7]}  # the ids present in tiny_table
    for table, present in ids.items():
        delta = next(after[k] - before[k] for k in before if f".{table}." in k)
        moved = delta.abs().amax(dim=1) > 0
        assert moved.nonzero().flatten().tolist() == sorted(present)
        # lr * |g| / (|g| + eps): lr, a hair less for a gradient near eps (the init is random)
        torch.testing.assert_close(delta[moved].abs(), torch.full_like(delta[moved], 0.3), rtol=0, atol=3e-3)
        assert (delta == delta[:, :1]).all()  # the copies of a weight stay equal
    dense_key = "model.wide.dense.weight"  # the dense optimizer's: not stepped in backward
    torch.testing.assert_close(after[dense_key], before[dense_key])


def test_deepfm_first_order_uses_the_configured_sparse_optimizer(tmp_path, tiny_table):
    schema, _ = _tiny(tmp_path, tiny_table)
    model = build_model(ModelConfig(name="deepfm", **SMALL), schema, torch.device("cpu"), torch.device("cpu"))
    apply_sparse_optimizer(model, "adagrad", 0.02, 1e-8)
    tables = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    assert len(tables) == 4 and all(p._optimizer_kwargs[0]["lr"] == 0.02 for p in tables)


def test_second_order_is_the_sum_over_field_pairs():
    v = torch.randn(3, 5, 4)
    expected = sum((v[:, i] * v[:, j]).sum(dim=1) for i, j in itertools.combinations(range(5), 2))
    torch.testing.assert_close(second_order(v), expected.unsqueeze(1))


def test_config_checks_apply_to_their_model_only():
    ModelConfig(name="wide_deep", embedding_dim=8).check()  # DLRM's bottom-MLP rule does not apply
    ModelConfig(name="deepfm", embedding_dim=8, over_arch_layer_sizes=[4]).check()
    with pytest.raises(ValueError, match="dense_arch_layer_sizes"):
        ModelConfig(name="dlrm", embedding_dim=8).check()  # across fields: once derived values are in
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(name="deepfm", dropout=1.0)
    with pytest.raises(ValueError, match="wide_lr"):
        ModelConfig(name="wide_deep", wide_lr=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_synthetic(
        SyntheticSpec(rows=20000, files=2, row_group_rows=2048),
        tmp_path_factory.mktemp("syn") / "d",
        log=lambda *_: None,
    )


def _sharded_step(env: DistEnv, data: str, out_path: str) -> None:
    """One rank under DMP: the fused (fbgemm) update of the sharded wide tables is Adagrad at wide_lr."""
    schema = DatasetSchema.load(data)
    model = build_model(ModelConfig(name="wide_deep", wide_lr=0.3, **SMALL), schema, env.device, torch.device("meta"))
    apply_sparse_optimizer(model, "rowwise_adagrad", 0.01, 1e-8)
    dmp = shard_model(model, env, plan_sharding(model, env, 64, ShardingConfig(sharding_types=["table_wise"])))
    key = "model.wide.embedding_bag_collection.embedding_bags.wide_cat_0.weight"
    before = dmp.state_dict()[key].local_shards()[0].tensor.clone()
    loss, _ = dmp(next(iter(ParquetBatches(schema, "train", 64))))
    loss.backward()
    delta = dmp.state_dict()[key].local_shards()[0].tensor - before
    with open(out_path, "w") as f:
        json.dump({"moves": sorted({round(x, 5) for x in delta.abs().flatten().tolist()})}, f)


def test_sharded_wide_tables_step_with_wide_lr(tmp_path, dataset):
    run_ranks(_sharded_step, 1, data=str(dataset.root), out_path=str(tmp_path / "out.json"))
    moves = json.loads((tmp_path / "out.json").read_text())["moves"]
    # Adagrad's first step is wide_lr * |g| / (|g| + eps): wide_lr for every id in the batch, a hair less
    # for an id whose gradient is within a few orders of eps (the init is random); 0 for the rest.
    assert all(m == 0.0 or 0.29 < m <= 0.3 for m in moves), moves
    assert max(moves) == 0.3


TOWERS = [
    "--model.user_features",
    *[f"cat_{i}" for i in range(13)],
    *[f"int_{i}" for i in range(7)],
    "--model.item_features",
    *[f"cat_{i}" for i in range(13, 26)],
    *[f"int_{i}" for i in range(7, 13)],
]


@pytest.mark.parametrize(
    "name,table_prefix,extra", [("wide_deep", "wide_", []), ("deepfm", "linear_", []), ("two_tower", "bias_", TOWERS)]
)
def test_two_sharded_ranks_train(tmp_path, dataset, name, table_prefix, extra):
    run_dir = tmp_path / "run"
    summary = train(dataset.root, run_dir, "--model", name, "--data.batch_size", "256", *extra)
    assert summary["model"] == name and summary["world_size"] == 2
    assert summary["test"]["auc"] > 0.6, summary
    plan = [line.split() for line in (run_dir / "plan.txt").read_text().splitlines()[1:]]
    linear = [row for row in plan if row[0].startswith(table_prefix)]
    assert len(linear) == len(dataset.sparse)
    # the planner replicates the smallest (data_parallel on "0,1") and shards the rest over both ranks
    assert {row[1] for row in linear if row[2] == "0,1"} == {"data_parallel"}
    assert {row[2] for row in linear if row[1] != "data_parallel"} == {"0", "1"}
