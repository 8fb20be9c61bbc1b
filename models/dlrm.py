"""DLRM and DLRM-DCNv2 from torchrec, with one embedding table per sparse feature of the dataset."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from data_pipeline.schema import DatasetSchema
from models.config import ModelConfig
from models.embeddings import embedding_tables


def build_dlrm(
    cfg: ModelConfig, schema: DatasetSchema, dense_device: torch.device, sparse_device: torch.device
) -> DLRM:
    ebc = EmbeddingBagCollection(tables=embedding_tables(schema.sparse, cfg.embedding_dim), device=sparse_device)
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=list(cfg.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(cfg.over_arch_layer_sizes),
        dense_device=dense_device,
    )
    if cfg.name == "dlrm_dcn":
        return DLRM_DCN(**common, dcn_num_layers=cfg.dcn_num_layers, dcn_low_rank_dim=cfg.dcn_low_rank_dim)
    return DLRM(**common)
