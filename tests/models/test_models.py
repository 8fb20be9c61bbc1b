import pytest
import torch

from data_pipeline.reader import ParquetBatches
from models import MODELS, ModelConfig, build_model
from tests.helpers.data import TINY_SPARSE, write_dataset


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_shapes(tmp_path, tiny_table, name):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    cfg = ModelConfig(
        name=name,
        embedding_dim=4,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
        dcn_low_rank_dim=2,
        user_features=["a", "d0"],
        item_features=["m", "d1"],
    )
    model = build_model(cfg, schema, torch.device("cpu"), torch.device("cpu"))
    loss, (detached, logits, labels, weights) = model(batch)
    assert logits.shape == (5,) and loss.ndim == 0
    loss.backward()
    tables = model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert [t.num_embeddings for t in tables] == [10, 8]


def test_padding_rows_do_not_count(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    model = build_model(
        ModelConfig(embedding_dim=4, dense_arch_layer_sizes=[4]), schema, torch.device("cpu"), torch.device("cpu")
    )
    full, _ = model(batch)
    batch.weights[3:] = 0
    batch.labels[3:] = 1 - batch.labels[3:]  # flipping labels of weight-0 rows changes nothing
    masked, (_, logits, _, _) = model(batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:3], batch.labels[:3])
    torch.testing.assert_close(masked, expected)
    assert not torch.isclose(full, masked)


def test_unknown_model_name(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    with pytest.raises(ValueError, match="not one of"):
        build_model(ModelConfig(name="nope"), schema, torch.device("cpu"), torch.device("cpu"))


def test_regression_task_uses_weighted_squared_error(tmp_path, tiny_table):
    table = tiny_table.set_column(0, "label", tiny_table.column("label").cast("float32"))
    schema = write_dataset(tmp_path, {"train": [table]}, TINY_SPARSE, ["d0", "d1"])
    schema.task = "regression"
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    batch.labels = torch.tensor([1.0, 5.0, 3.5, 2.0, 4.0])
    batch.weights[4] = 0
    model = build_model(
        ModelConfig(embedding_dim=4, dense_arch_layer_sizes=[4]), schema, torch.device("cpu"), torch.device("cpu")
    )
    loss, (_, predictions, _, _) = model(batch)
    torch.testing.assert_close(loss, ((predictions[:4] - batch.labels[:4]) ** 2).mean())


def test_two_tower_scores_are_tower_dot_products_plus_biases(tmp_path, tiny_table):
    from models.two_tower import TwoTower

    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    schema.task, schema.label_range = "regression", [1.0, 5.0]
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    cfg = ModelConfig(
        name="two_tower", embedding_dim=4, tower_layer_sizes=[8], user_features=["a", "d0"], item_features=["m", "d1"]
    )
    model = TwoTower(cfg, schema, torch.device("cpu"), torch.device("cpu"))
    assert (
        build_model(cfg, schema, torch.device("cpu"), torch.device("cpu")).offset == 3.0
    )  # predictions start mid-range
    embedded = model.sparse_arch(batch.sparse).to_dict()
    u = model.user.mlp(torch.cat([embedded["a"], batch.dense[:, :1]], dim=1))  # the user tower sees only its columns
    v = model.item.mlp(torch.cat([embedded["m"], batch.dense[:, 1:]], dim=1))
    expected = (u * v).sum(1, keepdim=True) + model.bias(batch.dense, batch.sparse) + model.global_bias
    torch.testing.assert_close(model(batch.dense, batch.sparse), expected)
    with pytest.raises(ValueError, match="names columns the dataset lacks: zz"):
        TwoTower(
            ModelConfig(name="two_tower", user_features=["zz"], item_features=["m"]),
            schema,
            torch.device("cpu"),
            torch.device("cpu"),
        )
