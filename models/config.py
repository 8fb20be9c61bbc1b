"""The `[model]` section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.config import check_choices

DLRM_MODELS = ("dlrm", "dlrm_dcn")
DEEP_MODELS = ("wide_deep", "deepfm")
LOSSES = ("pointwise", "in_batch_softmax")
MODEL_NAMES = (*DLRM_MODELS, *DEEP_MODELS, "two_tower")
"""The registered models (models.MODELS, whose keys a test holds to these)."""


@dataclass
class ModelConfig:
    name: Literal[MODEL_NAMES] = "dlrm"
    """The model (models.MODELS)."""
    embedding_dim: int = 16
    """Embedding size of every table (DLRM's interaction and DeepFM's FM need one size for all)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """dlrm, dlrm_dcn: bottom MLP over the dense features; its last size must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """dlrm, dlrm_dcn: top MLP over the feature interactions; its last size must be 1 (one logit)."""
    dcn_num_layers: int = 3
    """dlrm_dcn only: number of low-rank cross layers."""
    dcn_low_rank_dim: int = 16
    """dlrm_dcn only: rank of each cross layer."""
    deep_layer_sizes: list[int] = field(default_factory=lambda: [256, 128])
    """wide_deep, deepfm: hidden layers of the deep MLP over [dense features, embeddings]; a last
    layer to one logit is added."""
    dropout: float = 0.0
    """wide_deep, deepfm: dropout after each hidden layer of the deep MLP (0: none)."""
    batch_norm: bool = False
    """wide_deep, deepfm: BatchNorm after each hidden linear layer of the deep MLP."""
    wide_lr: float = 0.05
    """wide_deep only: learning rate of the wide (linear) part's own Adagrad, fused into its
    tables' backward; the deep tables keep optimizer.sparse and the MLPs optimizer.dense, as in
    the paper, where the wide part is trained by a per-coordinate method (FTRL) of its own."""

    tower_layer_sizes: list[int] = field(default_factory=lambda: [64])
    """two_tower: hidden layers of each tower's MLP; a last layer to embedding_dim is added."""
    user_features: list[str] = field(default_factory=list)
    """two_tower: the columns (sparse or dense) of the user tower; empty: the dataset's
    `extra.towers.user` (written by `recsys prepare movielens`)."""
    item_features: list[str] = field(default_factory=list)
    """two_tower: the columns of the item tower; empty: the dataset's `extra.towers.item`."""
    loss: Literal[LOSSES] = "pointwise"
    """pointwise: the task's loss on each row (log loss on clicks, squared error on ratings).
    in_batch_softmax (two_tower, binary task): each positive row's item against every other item
    of the global batch, a softmax over cosine similarities / temperature (Yi et al. 2019)."""
    temperature: float = 0.05
    """in_batch_softmax: divides the cosine similarities; smaller sharpens the softmax."""
    logq_correction: bool = True
    """in_batch_softmax: subtract log(how often an item is a candidate) from its logit, so popular
    items are not pushed down merely for appearing as negatives more often (Yi et al. 2019)."""

    def __post_init__(self) -> None:
        check_choices(self, "model")
        # Each check only for the models that read the field, so every model works with the defaults.
        # (The checks across fields are in `check`: derived defaults may still change those fields.)
        if self.name in DEEP_MODELS:
            if any(size <= 0 for size in self.deep_layer_sizes):
                raise ValueError(f"model.deep_layer_sizes must be positive, got {self.deep_layer_sizes}")
            if not 0.0 <= self.dropout < 1.0:
                raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.name == "two_tower" and any(size <= 0 for size in self.tower_layer_sizes):
            raise ValueError(f"model.tower_layer_sizes must be positive, got {self.tower_layer_sizes}")
        if self.loss == "in_batch_softmax" and self.name != "two_tower":
            raise ValueError(f"model.loss in_batch_softmax needs a model with towers (two_tower), not '{self.name}'")
        if self.temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {self.temperature}")
        if self.name == "wide_deep" and self.wide_lr <= 0:
            raise ValueError(f"model.wide_lr must be positive, got {self.wide_lr}")

    def check(self) -> None:
        """The rules across fields, once every value is final (after trainer.defaults.derive)."""
        if self.name in DLRM_MODELS:
            if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
                raise ValueError(
                    f"model.dense_arch_layer_sizes must end in model.embedding_dim ({self.embedding_dim}), "
                    f"got {self.dense_arch_layer_sizes}"
                )
            if self.over_arch_layer_sizes[-1] != 1:
                raise ValueError(f"model.over_arch_layer_sizes must end in 1, got {self.over_arch_layer_sizes}")
