"""The training wrapper: batch in, (loss, outputs) out, the shape torchrec's train pipelines expect."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch


class RankingModel(nn.Module):
    """Binary click model: weighted log loss over `model(batch.dense, batch.sparse)` logits.

    Rows of weight 0 (evaluation padding) contribute nothing; the loss is the weighted mean.
    `forward` only reads attributes of `batch` before calling the model, so the train pipeline's
    tracer can find the sharded embedding lookup's input (`batch.sparse`) and overlap its
    all-to-all with the previous step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense, batch.sparse).squeeze(-1)
        losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        loss = (losses * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.weights)
