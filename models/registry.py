"""The model registry: a new model is one module and one entry here. Models know nothing of
sharding: the trainer builds their embedding tables on the `meta` device and the planner places
them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from data_pipeline.schema import DatasetSchema
from models.config import ModelConfig
from models.deepfm import build_deepfm
from models.dlrm import build_dlrm
from models.losses import InBatchSoftmax, RankingModel
from models.two_tower import build_two_tower
from models.wide_deep import build_wide_deep

ModelBuilder = Callable[[ModelConfig, DatasetSchema, torch.device, torch.device], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "dlrm": build_dlrm,
    "dlrm_dcn": build_dlrm,
    "wide_deep": build_wide_deep,
    "deepfm": build_deepfm,
    "two_tower": build_two_tower,
}


def build_model(
    cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
) -> nn.Module:
    """The named model wrapped for training with `model.loss`; embedding tables on
    `sparse_device` (`meta` to shard)."""
    if cfg.name not in MODELS:
        raise ValueError(f"model.name '{cfg.name}' is not one of: {', '.join(sorted(MODELS))}")
    cfg.check()
    if cfg.loss == "in_batch_softmax":
        if schema.task != "binary":
            raise ValueError(
                f"model.loss in_batch_softmax needs 0/1 labels (positives are 1); "
                f"{schema.root} has task '{schema.task}'"
            )
        model = MODELS[cfg.name](cfg, schema, dense_device, sparse_device)
        num_items = next(f.num_embeddings for f in schema.sparse if f.name == model.item_id)
        return InBatchSoftmax(model, num_items, cfg.logq_correction, dense_device)
    offset = sum(schema.label_range) / 2 if schema.task == "regression" and schema.label_range else 0.0
    return RankingModel(MODELS[cfg.name](cfg, schema, dense_device, sparse_device), task=schema.task, offset=offset)
