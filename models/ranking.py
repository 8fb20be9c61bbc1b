"""The training wrapper: batch in, (loss, outputs) out, the shape torchrec's train pipelines expect."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.schema import TASKS


class RankingModel(nn.Module):
    """Pointwise model: weighted loss over `model(batch.dense, batch.sparse)` outputs.

    The task comes from `dataset.json`: "binary" -> log loss on logits; "regression" -> squared
    error on the raw output (metrics clip it to the label range). Rows of weight 0 (evaluation padding) contribute nothing; the loss is the weighted mean.
    `forward` only reads attributes of `batch` before calling the model, so the train pipeline's
    tracer can find the sharded embedding lookup's input (`batch.sparse`) and overlap its
    all-to-all with the previous step.
    """

    def __init__(self, model: nn.Module, task: str = "binary", offset: float = 0.0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task '{task}' is not one of {', '.join(TASKS)}")
        self.model = model
        self.task = task
        self.offset = offset
        """Added to the model's output: the middle of a regression label's range, so predictions
        start near the labels (3 stars, not 0) instead of spending the first steps getting there."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense, batch.sparse).squeeze(-1) + self.offset
        if self.task == "binary":
            losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        else:
            losses = (logits - batch.labels) ** 2
        loss = (losses * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.weights)
