"""Two towers: score = <user tower, item tower> + per-id biases + a global bias.

Each tower is an MLP over its side's embeddings and dense features, ending in `embedding_dim`
numbers; the score is their dot product, so items can be scored for a user by one matrix product
(retrieval). With the biases this is matrix factorisation with side features (Koren et al. 2009,
"biased MF"); without side features and with an identity tower it would be plain MF.

Which columns belong to which tower comes from `model.user_features` / `model.item_features`, or
from the dataset's `extra.towers` (`recsys prepare movielens` writes it). The biases are one
weight per id of every sparse feature of both towers (`SparseLinear`, sharded like any table).
Trained pointwise through `RankingModel` (squared error on ratings, log loss on clicks), or with
`model.loss = "in_batch_softmax"` through `models.losses.InBatchSoftmax`, where the score is a
cosine similarity / `model.temperature` (plus the biases) so that the softmax has a set scale.

The first sparse feature of each tower names its entity (user id, item id): the retrieval loss
masks repeats of an item by it, and the catalogue evaluation (`trainer.catalogue`) ranks by it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.deepfm import SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import DatasetSchema
from models.config import ModelConfig
from models.embeddings import LINEAR_WIDTH, SparseLinear, embedding_tables


def tower_columns(cfg: ModelConfig, schema: DatasetSchema) -> dict[str, list[str]]:
    """{"user": [...], "item": [...]}: each tower's columns, from the config or the dataset."""
    towers = (schema.extra or {}).get("towers", {})
    columns = {
        "user": list(cfg.user_features) or list(towers.get("user", [])),
        "item": list(cfg.item_features) or list(towers.get("item", [])),
    }
    known = set(schema.sparse_names) | set(schema.dense)
    for side, names in columns.items():
        if not names:
            raise ValueError(
                f"two_tower: no {side} features; set model.{side}_features or prepare the dataset with towers"
            )
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"two_tower: model.{side}_features names columns the dataset lacks: {', '.join(unknown)}")
    return columns


class Tower(nn.Module):
    """MLP over [embeddings of its sparse features, its dense features] -> `out_dim` numbers."""

    def __init__(
        self, sparse: list[str], dense_index: list[int], dim: int, layer_sizes: list[int], device: torch.device
    ) -> None:
        super().__init__()
        self.sparse = sparse
        self.register_buffer(
            "dense_index", torch.tensor(dense_index, dtype=torch.long, device=device), persistent=False
        )
        layers: list[nn.Module] = []
        width = len(sparse) * dim + len(dense_index)
        for size in layer_sizes:
            layers += [nn.Linear(width, size, device=device), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, dim, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, embedded: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        parts = [embedded[name] for name in self.sparse] + [dense.index_select(1, self.dense_index)]
        return self.mlp(torch.cat(parts, dim=1))


class TwoTower(nn.Module):
    """forward(dense [B, n_dense], sparse KJT) -> scores [B, 1]; `encode` gives the parts."""

    def __init__(
        self, cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
    ) -> None:
        super().__init__()
        columns = tower_columns(cfg, schema)
        sparse = {side: [n for n in names if n in schema.sparse_names] for side, names in columns.items()}
        dense = {side: [schema.dense.index(n) for n in names if n in schema.dense] for side, names in columns.items()}
        features = [f for f in schema.sparse if f.name in sparse["user"] + sparse["item"]]
        ebc = EmbeddingBagCollection(tables=embedding_tables(features, cfg.embedding_dim), device=sparse_device)
        self.sparse_arch = SparseArch(ebc)  # the name the other models use for their tables
        self.user = Tower(sparse["user"], dense["user"], cfg.embedding_dim, cfg.tower_layer_sizes, dense_device)
        self.item = Tower(sparse["item"], dense["item"], cfg.embedding_dim, cfg.tower_layer_sizes, dense_device)
        self.bias = SparseLinear(features, 0, "bias", dense_device, sparse_device)
        self.global_bias = nn.Parameter(torch.zeros(1, device=dense_device))  # RankingModel adds the label's mid-range
        self.user_id, self.item_id = sparse["user"][0], sparse["item"][0]  # the towers' entity ids
        self.cosine = cfg.loss == "in_batch_softmax"
        self.temperature = cfg.temperature

    def encode(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, ...]:
        """(user vectors [B, D], item vectors [B, D], user biases [B], item biases [B]) of each
        row. A row with one side's features only (a catalogue item) gets the other side's
        vector and bias of no ids, which nothing reads."""
        embedded = self.sparse_arch(sparse).to_dict()  # feature -> [B, D]
        u, v = self.user(embedded, dense), self.item(embedded, dense)
        if self.cosine:
            u = nn.functional.normalize(u, dim=1) / self.temperature
            v = nn.functional.normalize(v, dim=1)
        weights = self.bias.embedding_bag_collection(sparse).to_dict()  # feature -> [B, LINEAR_WIDTH]
        user_bias = torch.cat([weights[f] for f in self.user.sparse], dim=1).sum(dim=1) / LINEAR_WIDTH
        item_bias = torch.cat([weights[f] for f in self.item.sparse], dim=1).sum(dim=1) / LINEAR_WIDTH
        return u, v, user_bias, item_bias

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        u, v, user_bias, item_bias = self.encode(dense, sparse)
        return ((u * v).sum(dim=1) + user_bias + item_bias + self.global_bias).unsqueeze(1)


def build_two_tower(
    cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
) -> TwoTower:
    return TwoTower(cfg, schema, dense_device, sparse_device)
