"""Which metric decides "better", and in which direction: written once, read by training
(validation, early stopping, keep-best, the plateau schedule), the evaluation tool and the report.

Torch-free, so the offline tools that only read run directories stay light.
"""

from __future__ import annotations

from dataclasses import dataclass

LOWER_IS_BETTER = frozenset({"rmse", "mae", "logloss", "ne"})
"""Metrics that improve downwards; every other metric (auc, recall@K, ndcg@K, ...) improves upwards."""


@dataclass(frozen=True)
class Headline:
    name: str
    """The metric's key in a metrics dict (auc, rmse, recall@10)."""

    @property
    def higher_is_better(self) -> bool:
        return self.name not in LOWER_IS_BETTER

    def better(self, value: float, than: float | None) -> bool:
        """Whether `value` beats `than` (None: nothing to beat yet); NaN never does."""
        if value != value:
            return False
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than


def headline(task: str, recall_k: int | None = None) -> Headline:
    """The metric that decides "better" for a run: recall@K at the smallest cut-off when the run
    ranks a whole catalogue (retrieval), else AUC for a binary task and RMSE for regression."""
    if recall_k is not None:
        return Headline(f"recall@{recall_k}")
    return Headline("auc" if task == "binary" else "rmse")
