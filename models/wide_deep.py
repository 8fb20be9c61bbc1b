"""Wide & Deep (Cheng et al. 2016): a linear model over the sparse ids and their crosses, trained
jointly with an MLP over embeddings and dense features; logit = wide + deep.

The wide part trains with its own Adagrad at `model.wide_lr` (the paper uses FTRL, another
per-coordinate method): its collection carries a hint that `trainer.optim.apply_sparse_optimizer`
honours. The deep tables get `optimizer.sparse`, the MLP and the dense linear term `optimizer.dense`.

`deep_mlp` is shared with DeepFM (its deep part); `models.embeddings.SparseLinear` is the wide part.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.deepfm import SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import DatasetSchema
from models.config import ModelConfig
from models.embeddings import SparseLinear, embedding_tables


def crossed_features(schema: DatasetSchema) -> set[str]:
    """Features named `a_x_b[_x_c]` whose parts are features too: the crosses that
    `recsys prepare tabular --cross` writes. They feed the wide part only, as in the paper."""
    names = set(schema.sparse_names)
    return {n for n in names if "_x_" in n and all(part in names for part in n.split("_x_"))}


def deep_mlp(
    in_features: int, layer_sizes: list[int], dropout: float, batch_norm: bool, device: torch.device
) -> nn.Sequential:
    """Linear [-> BatchNorm] -> ReLU [-> Dropout] per hidden layer, then a linear layer to one logit."""
    layers: list[nn.Module] = []
    for size in layer_sizes:
        layers.append(nn.Linear(in_features, size, device=device))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size, device=device))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = size
    layers.append(nn.Linear(in_features, 1, device=device))
    return nn.Sequential(*layers)


class WideDeep(nn.Module):
    """forward(dense [B, n_dense], sparse KJT) -> logits [B, 1] = wide + deep."""

    def __init__(
        self, cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
    ) -> None:
        super().__init__()
        num_dense = len(schema.dense)
        self.wide = SparseLinear(schema.sparse, num_dense, "wide", dense_device, sparse_device)
        self.wide.embedding_bag_collection.sparse_optimizer = {
            "name": "adagrad",
            "lr": cfg.wide_lr,
        }  # see trainer.optim
        crosses = crossed_features(schema)
        deep_features = [f for f in schema.sparse if f.name not in crosses]
        ebc = EmbeddingBagCollection(tables=embedding_tables(deep_features, cfg.embedding_dim), device=sparse_device)
        self.sparse_arch = SparseArch(ebc)  # the name DLRM and torchrec's DeepFM use for the deep tables
        self.deep_features = [f.name for f in deep_features]
        in_features = num_dense + len(deep_features) * cfg.embedding_dim
        self.deep = deep_mlp(in_features, cfg.deep_layer_sizes, cfg.dropout, cfg.batch_norm, dense_device)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        # [B, F * D] in the dataset's feature order: a sharded collection returns its features in
        # the sharding plan's order, so .values() would tie the MLP's inputs to the plan
        embedded = self.sparse_arch(sparse).to_dict()  # the tables ignore the cross keys
        embedded = torch.cat([embedded[name] for name in self.deep_features], dim=1)
        deep = self.deep(torch.cat([dense, embedded], dim=1))
        return self.wide(dense, sparse) + deep


def build_wide_deep(
    cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
) -> WideDeep:
    return WideDeep(cfg, schema, dense_device, sparse_device)
