"""DeepFM (Guo et al. 2017): one embedding per sparse feature, shared by a factorization machine
(first-order weights + pairwise dot products of the embeddings) and a deep MLP over the
embeddings and dense features; logit = first order + second order + deep.

The deep part is torchrec's `DeepFM` module (flatten, concatenate, MLP). Its
`FactorizationMachine` is not used: it crosses every scalar of the flattened input with every
other, where the paper's FM crosses whole feature vectors (sum over pairs of fields i < j of
<v_i, v_j>), which `second_order` computes.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.deepfm import SparseArch
from torchrec.modules.deepfm import DeepFM as DeepPart
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.schema import DatasetSchema
from models.config import ModelConfig
from models.embeddings import SparseLinear, embedding_tables
from models.wide_deep import deep_mlp


def second_order(embeddings: torch.Tensor) -> torch.Tensor:
    """FM pairwise term of [B, F, D] field embeddings, in O(F * D):
    sum_{i<j} <v_i, v_j> = 1/2 * sum_d ((sum_i v_id)^2 - sum_i v_id^2). Returns [B, 1]."""
    square_of_sum = embeddings.sum(dim=1).pow(2)
    sum_of_squares = embeddings.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1, keepdim=True)


class DeepFM(nn.Module):
    """forward(dense [B, n_dense], sparse KJT) -> logits [B, 1]. Dense features enter the
    first-order term and the deep MLP (the FM pairs sparse fields only)."""

    def __init__(
        self, cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
    ) -> None:
        super().__init__()
        self.num_fields, self.dim = len(schema.sparse), cfg.embedding_dim
        self.features = schema.sparse_names
        ebc = EmbeddingBagCollection(tables=embedding_tables(schema.sparse, cfg.embedding_dim), device=sparse_device)
        self.sparse_arch = SparseArch(ebc)
        self.first_order = SparseLinear(schema.sparse, len(schema.dense), "linear", dense_device, sparse_device)
        in_features = len(schema.dense) + self.num_fields * self.dim
        self.deep = DeepPart(deep_mlp(in_features, cfg.deep_layer_sizes, cfg.dropout, cfg.batch_norm, dense_device))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        # [B, F, D] in the dataset's feature order (a sharded collection returns the plan's order)
        embedded = self.sparse_arch(sparse).to_dict()
        embeddings = torch.stack([embedded[name] for name in self.features], dim=1)
        deep = self.deep([dense, embeddings])
        return self.first_order(dense, sparse) + second_order(embeddings) + deep


def build_deepfm(
    cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
) -> DeepFM:
    return DeepFM(cfg, schema, dense_device, sparse_device)
