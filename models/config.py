"""The `[model]` section of the config tree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "dlrm"
    """Registered model name: see `models.MODELS` (dlrm, dlrm_dcn)."""
    embedding_dim: int = 16
    """Embedding size of every table (DLRM's interaction needs one size for all)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP over the dense features; its last size must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP over the feature interactions; its last size must be 1 (one logit)."""
    dcn_num_layers: int = 3
    """dlrm_dcn only: number of low-rank cross layers."""
    dcn_low_rank_dim: int = 16
    """dlrm_dcn only: rank of each cross layer."""

    def __post_init__(self) -> None:
        if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ValueError(
                f"model.dense_arch_layer_sizes must end in model.embedding_dim ({self.embedding_dim}), "
                f"got {self.dense_arch_layer_sizes}"
            )
        if self.over_arch_layer_sizes[-1] != 1:
            raise ValueError(f"model.over_arch_layer_sizes must end in 1, got {self.over_arch_layer_sizes}")
