"""Embedding tables the models share: one pooled table per sparse feature, and linear (one weight
per id) tables. Built from `dataset.json`'s features; placed by the planner (models build them on
`meta` to shard, on the CPU unsharded)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import SparseFeature


def embedding_tables(features: list[SparseFeature], dim: int) -> list[EmbeddingBagConfig]:
    """One `t_<name>` table per feature, sized from dataset.json. Multi-hot bags are averaged, so a
    row's vector does not grow with its list length."""
    return [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            feature_names=[f.name],
            num_embeddings=f.num_embeddings,
            embedding_dim=dim,
            pooling=PoolingType.MEAN if f.multi_hot else PoolingType.SUM,
        )
        for f in features
    ]


LINEAR_WIDTH = 4
"""Stored width of a linear (one weight per id) table. fbgemm's sharded kernels need rows of a
multiple of 4 floats, so a width-1 table cannot be sharded; each weight is kept as 4 copies that
start at 0 and get the same gradient, so they stay equal, and the model reads their mean. Under
Adagrad (plain or rowwise; both scale-free in the gradient) each copy, and so the mean, moves as a
width-1 weight would (eps aside); plain SGD would move it 4 times slower."""


class SparseLinear(nn.Module):
    """A linear model: one weight per id of every feature (summed over a multi-hot bag), plus a
    linear term on the dense features. Output [B, 1], no bias (the deep part has one).

    The weights are an EmbeddingBagCollection of `<prefix>_<name>` tables, so they shard like
    any table; they start at 0, as a linear model trained online does."""

    def __init__(
        self,
        features: list[SparseFeature],
        num_dense: int,
        prefix: str,
        dense_device: torch.device,
        sparse_device: torch.device,
    ) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(
                name=f"{prefix}_{f.name}",
                feature_names=[f.name],
                num_embeddings=f.num_embeddings,
                embedding_dim=LINEAR_WIDTH,
                pooling=PoolingType.SUM,
                init_fn=nn.init.zeros_,
            )
            for f in features
        ]
        self.embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=sparse_device)
        self.dense = nn.Linear(num_dense, 1, bias=False, device=dense_device) if num_dense else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        weights = self.embedding_bag_collection(sparse).values()  # [B, F * LINEAR_WIDTH]
        out = weights.sum(dim=1, keepdim=True) / LINEAR_WIDTH  # the mean of equal copies
        if self.dense is not None:
            out = out + self.dense(dense)
        return out
