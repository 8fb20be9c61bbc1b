"""Evaluation metrics that are correct across ranks: torchmetrics keeps per-rank state and
gathers it on `compute()` (a collective, so every rank must call it)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC


class RatingMetrics:
    """RMSE and MAE of predictions clipped to the label range (e.g. 1-5 stars), weighted."""

    def __init__(self, device: torch.device, label_range: list[float] | None = None) -> None:
        self.squared = MeanMetric().to(device)
        self.absolute = MeanMetric().to(device)
        self.label_range = label_range

    @torch.no_grad()
    def update(self, predictions: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        if self.label_range:
            predictions = predictions.clamp(*self.label_range)
        real = weights > 0
        errors = predictions[real].float() - labels[real].float()
        self.squared.update(errors**2, weights[real])
        self.absolute.update(errors.abs(), weights[real])

    def compute(self) -> dict[str, float]:
        return {"rmse": math.sqrt(self.squared.compute().item()), "mae": self.absolute.compute().item()}


def task_metrics(task: str, device: torch.device, label_range: list[float] | None = None, auroc_thresholds: int = 0):
    """The metrics of a dataset's task (its headline metric, `trainer.headline`, first)."""
    return ClickMetrics(device, auroc_thresholds) if task == "binary" else RatingMetrics(device, label_range)


class ClickMetrics:
    """AUC, log loss, normalised entropy (log loss / entropy of the base CTR) and calibration
    (mean predicted probability / observed CTR: 1 is calibrated, above 1 over-predicts) of a split."""

    def __init__(self, device: torch.device, auroc_thresholds: int = 0) -> None:
        self.auc = BinaryAUROC(thresholds=auroc_thresholds or None).to(device)
        self.logloss = MeanMetric().to(device)
        self.ctr = MeanMetric().to(device)
        self.predicted = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> None:
        real = weights > 0  # padding rows (weight 0) are not scored
        probabilities = torch.sigmoid(logits[real].float())
        self.auc.update(probabilities, labels[real].long())
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        self.logloss.update(losses[real], weights[real])
        self.ctr.update(labels[real], weights[real])
        self.predicted.update(probabilities, weights[real])

    def compute(self) -> dict[str, float]:
        auc, logloss, ctr = self.auc.compute().item(), self.logloss.compute().item(), self.ctr.compute().item()
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
        calibration = self.predicted.compute().item() / ctr if ctr > 0 else float("nan")
        return {"auc": auc, "logloss": logloss, "ne": logloss / entropy, "calibration": calibration, "ctr": ctr}


def top_k_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user ranking metrics of each row of `scores` [U, N] (items a user must not be
    recommended already set to -inf) against `relevant` [U, N] (bool; every row has at least one).

    For each K: recall@K = relevant items in the top K / relevant items; NDCG@K = DCG of the top K
    (gain 1 per relevant item, discount log2(position + 1)) / the DCG of a perfect list;
    precision@K = relevant items in the top K / K; hit_rate@K = 1 if any relevant item is in the
    top K. Then mrr = 1 / the rank of the best-ranked relevant item in the whole list. With one
    relevant item per user (leave-last-out) recall@K is the hit rate. Returns name -> [U] values,
    to be summed (recall@K and ndcg@K of the first K lead: the first is the headline).
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = relevant.gather(1, top).float()  # [U, K]
    count = relevant.sum(dim=1).float()
    discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, device=scores.device, dtype=torch.float))
    out = {}
    for k in ks:
        ideal = torch.cumsum(discount, 0)[(count.clamp(max=k) - 1).long()]
        out[f"recall@{k}"] = hits[:, :k].sum(dim=1) / count
        out[f"ndcg@{k}"] = (hits[:, :k] * discount[:k]).sum(dim=1) / ideal
    for k in ks:
        out[f"precision@{k}"] = hits[:, :k].sum(dim=1) / k
        out[f"hit_rate@{k}"] = hits[:, :k].amax(dim=1)
    best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
    out["mrr"] = 1.0 / (1 + (scores > best).sum(dim=1).float())  # ties go the relevant item's way
    return out
