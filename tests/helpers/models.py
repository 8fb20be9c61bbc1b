"""Small configs of every registered model, for tests that build them (fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

from models import ModelConfig
from trainer.config import Config, ShardingConfig

TOWERS = dict(
    user_features=[f"cat_{i}" for i in range(13)] + [f"int_{i}" for i in range(7)],
    item_features=[f"cat_{i}" for i in range(13, 26)] + [f"int_{i}" for i in range(7, 13)],
)
"""two_tower's towers over the synthetic dataset's columns."""


def small_config(name: str, run_dir: Path) -> Config:
    """A config of model `name` with small layers, sharded table-wise."""
    extra = TOWERS if name == "two_tower" else {}
    model = ModelConfig(
        name=name,
        embedding_dim=8,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        deep_layer_sizes=[16],
        tower_layer_sizes=[16],
        **extra,
    )
    return Config(run_dir=str(run_dir), model=model, sharding=ShardingConfig(sharding_types=["table_wise"]))
