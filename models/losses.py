"""The training wrappers: batch in, (loss, outputs) out, the shape torchrec's train pipelines expect.

`RankingModel` is the pointwise loss of the dataset's task (log loss on clicks, squared error on
ratings). `InBatchSoftmax` is the in-batch softmax loss of a two-tower model (Yi et al. 2019,
"Sampling-bias-corrected neural modeling for large corpus item recommendations"): each positive row
is a query, its user vector against the item vectors of every row of the global batch (all ranks'
rows are gathered, so a batch of B per rank gives B x world_size candidates, including the
dataset's sampled negatives). The softmax over their scores should pick the row's own item. Other
rows carrying the same item are masked ("accidental hits"), and with logQ correction each
candidate's score is lowered by log(its share of all candidates seen in training so far), so that
popular items are not pushed down for being drawn as negatives more often.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.schema import TASKS
from models.penalty import EmbeddingL2


class Penalised:
    """The training wrappers' optional embedding penalty (models.penalty): the trainer attaches
    one after sharding; the reported loss (outputs[0]) stays the data loss alone."""

    embedding_l2: EmbeddingL2 | None = None

    def penalised(self, loss: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """`loss` plus the penalty of the lookups this forward made (one per row of `outputs`).
        Nothing is kept while the train pipeline traces the forward, so its graph has no penalty."""
        if self.embedding_l2 is None or not self.embedding_l2.outputs:
            return loss
        return loss + self.embedding_l2.take(outputs.shape[0])


class RankingModel(Penalised, nn.Module):
    """Pointwise model: weighted loss over `model(batch.dense, batch.sparse)` outputs.

    The task comes from `dataset.json`: "binary" -> log loss on logits; "regression" -> squared
    error on the raw output (metrics clip it to the label range). Rows of weight 0 (evaluation
    padding) contribute nothing; the loss is the weighted mean.
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

    def scores(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """The model's raw output of each row: logits for binary tasks, values for regression."""
        return self.model(dense, sparse).squeeze(-1) + self.offset

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.scores(batch.dense, batch.sparse)
        if self.task == "binary":
            losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        else:
            losses = (logits - batch.labels) ** 2
        loss = (losses * batch.weights).sum() / batch.weights.sum().clamp(min=1.0)
        return self.penalised(loss, logits), (loss.detach(), logits.detach(), batch.labels, batch.weights)


def entity_ids(sparse: KeyedJaggedTensor, feature: str) -> torch.Tensor:
    """The id of a single-id feature in each row, -1 where it is missing."""
    column = sparse[feature]
    lengths = column.lengths()
    ids = torch.full((lengths.numel(),), -1, dtype=torch.long, device=lengths.device)
    ids[lengths > 0] = column.values()[column.offsets()[:-1][lengths > 0]].long()
    return ids


def _gather(tensor: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Every rank's `tensor` concatenated in rank order (gradients flow back when asked)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    group = dist.group.WORLD
    if differentiable:
        return funcol.wait_tensor(funcol.all_gather_single_autograd(tensor, 0, group))
    return funcol.all_gather_single(tensor, 0, group)


class InBatchSoftmaxLoss(nn.Module):
    """Softmax cross-entropy of each query's own item among the global batch's items.

    A module with no sharded child, so torchrec's train pipeline treats it as a leaf and does not
    trace into the collectives. `candidate_counts` (how often each item id was a candidate) is
    updated from the gathered ids, so it is the same on every rank.
    """

    def __init__(self, num_items: int, item_feature: str, logq_correction: bool, device: torch.device) -> None:
        super().__init__()
        self.item_feature = item_feature
        self.logq_correction = logq_correction
        self.register_buffer("candidate_counts", torch.zeros(num_items, dtype=torch.long, device=device))

    def forward(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        item_bias: torch.Tensor,
        sparse: KeyedJaggedTensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        ids = entity_ids(sparse, self.item_feature)
        present = (weights > 0) & (ids >= 0)
        all_items, all_bias = _gather(item, True), _gather(item_bias, True)
        all_ids, all_present = _gather(ids, False), _gather(present, False)
        if self.training:
            self.candidate_counts += torch.bincount(all_ids[all_present], minlength=self.candidate_counts.numel())

        query = torch.nonzero(present & (labels > 0)).squeeze(1)
        if len(query) == 0:  # keep every parameter in the graph (DDP expects gradients for all)
            return (user.sum() + all_items.sum() + all_bias.sum()) * 0.0
        own = query + (dist.get_rank() * len(ids) if dist.is_initialized() else 0)  # each query's column
        logits = user[query] @ all_items.T + all_bias
        if self.logq_correction:
            share = (self.candidate_counts.double() + 1) / (
                self.candidate_counts.sum().double() + len(self.candidate_counts)
            )
            logits = logits - share.log().float()[all_ids.clamp(min=0)]
        hidden = ~all_present.unsqueeze(0) | (all_ids.unsqueeze(0) == ids[query].unsqueeze(1))
        hidden[torch.arange(len(query), device=own.device), own] = False
        logits = logits.masked_fill(hidden, float("-inf"))
        return F.cross_entropy(logits, own)


class InBatchSoftmax(Penalised, nn.Module):
    """Training wrapper like `RankingModel`: batch in, (loss, (loss, scores, labels, weights)) out.
    The scores are the model's pointwise scores of each row, so the click metrics (AUC on the
    split's positives against its sampled negatives) still apply."""

    task = "binary"

    def __init__(self, model: nn.Module, num_items: int, logq_correction: bool, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.loss = InBatchSoftmaxLoss(num_items, model.item_id, logq_correction, device)

    def _pointwise(self, user, item, user_bias, item_bias) -> torch.Tensor:
        return (user * item).sum(dim=1) + user_bias + item_bias + self.model.global_bias

    def scores(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Each row's pointwise score (a logit): its user vector against its own item's."""
        return self._pointwise(*self.model.encode(dense, sparse))

    def forward(
        self, batch: Batch
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        user, item, user_bias, item_bias = self.model.encode(batch.dense, batch.sparse)
        scores = self._pointwise(user, item, user_bias, item_bias)
        loss = self.loss(user, item, item_bias, batch.sparse, batch.labels, batch.weights)
        return self.penalised(loss, scores), (loss.detach(), scores.detach(), batch.labels, batch.weights)
