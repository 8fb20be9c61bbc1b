"""Metrics against a direct computation on the same numbers."""

import math

import numpy as np
import torch

from trainer.metrics import ClickMetrics, RatingMetrics, task_metrics


def test_rating_metrics_clip_to_label_range_and_skip_padding():
    predictions = torch.tensor([0.2, 3.0, 6.0, 4.5, 2.0])
    labels = torch.tensor([1.0, 4.0, 5.0, 4.0, 3.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    metrics = task_metrics("regression", torch.device("cpu"), [1.0, 5.0])
    assert isinstance(metrics, RatingMetrics)
    metrics.update(predictions[:2], labels[:2], weights[:2])  # two batches, like an eval loop
    metrics.update(predictions[2:], labels[2:], weights[2:])
    errors = np.clip([0.2, 3.0, 6.0, 4.5], 1, 5) - np.array([1.0, 4.0, 5.0, 4.0])
    result = metrics.compute()
    assert math.isclose(result["rmse"], float(np.sqrt((errors**2).mean())), rel_tol=1e-6)
    assert math.isclose(result["mae"], float(np.abs(errors).mean()), rel_tol=1e-6)


def test_click_metrics_match_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=200)
    labels = (rng.random(200) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    metrics = task_metrics("binary", torch.device("cpu"))
    assert isinstance(metrics, ClickMetrics)
    metrics.update(torch.tensor(logits), torch.tensor(labels), torch.ones(200))
    result = metrics.compute()
    p = 1 / (1 + np.exp(-logits))
    pos, neg = p[labels == 1], p[labels == 0]
    auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    logloss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    ctr = labels.mean()
    assert math.isclose(result["auc"], auc, rel_tol=1e-5)
    assert math.isclose(result["logloss"], logloss, rel_tol=1e-5)
    assert math.isclose(result["ne"], logloss / -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)), rel_tol=1e-5)
    assert math.isclose(result["calibration"], p.mean() / ctr, rel_tol=1e-5)
