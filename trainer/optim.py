"""Optimizers: the sparse one fused into the embedding backward, the dense one stepped as usual.

`apply_sparse_optimizer` marks the embedding tables before sharding; DMP turns the mark into
fbgemm's fused update (no gradient for a table is ever materialised). Unsharded, the same mark
runs the same update as a backward hook, which is what lets tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SPARSE = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
DENSE = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def _kwargs(name: str, lr: float, eps: float) -> dict:
    return {"lr": lr} if name == "sgd" else {"lr": lr, "eps": eps}


SPARSE_OPTIMIZER_HINT = "sparse_optimizer"
"""Optional attribute of an EmbeddingBagCollection, set by the model: `{"name": ..., "lr": ...}`
(either key may be left out) to train that collection's tables with another sparse optimizer or
rate than the configured one."""


def apply_sparse_optimizer(model: nn.Module, name: str, lr: float, eps: float) -> None:
    """Fuse optimizer `name` at `lr` into every EmbeddingBagCollection's backward, or what the
    collection's `SPARSE_OPTIMIZER_HINT` asks for. The hint lets a model train some tables
    differently (Wide&Deep's wide part: its own Adagrad and rate, as in the paper) from its own
    config, so the trainer never switches on model names."""
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            hint = getattr(module, SPARSE_OPTIMIZER_HINT, None) or {}
            module_name, module_lr = hint.get("name", name), hint.get("lr", lr)
            if module_name not in SPARSE:
                raise ValueError(f"sparse optimizer '{module_name}' is not one of: {', '.join(SPARSE)}")
            apply_optimizer_in_backward(SPARSE[module_name], module.parameters(), _kwargs(module_name, module_lr, eps))


def build_optimizer(model: nn.Module, dense: str, lr: float, eps: float) -> CombinedOptimizer:
    """Dense optimizer over every parameter not already updated in backward, combined with the
    sharded model's fused optimizer (so one `step`/`zero_grad`/`state_dict` covers both)."""
    params = dict(in_backward_optimizer_filter(model.named_parameters(), include=False))
    dense_opt = KeyedOptimizerWrapper(params, lambda p: DENSE[dense](p, **_kwargs(dense, lr, eps)))
    fused = getattr(model, "fused_optimizer", None)
    return CombinedOptimizer([fused, dense_opt] if fused is not None else [dense_opt])
