"""The numerics guard: a run whose loss explodes or turns NaN stops with one error naming the step
and the last good checkpoint, exit 3, and commits no checkpoint, summary or "best" after it; or,
with training.skip_nonfinite_batches, skips a few such batches without moving anything."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tests.helpers.dist import free_port, rank_context
from tests.helpers.runs import ROOT, run_trainer
from trainer.checkpoint import locate
from trainer.guard import MIN_HISTORY, Diverged, NumericsGuard
from trainer.headline import Headline
from trainer.tools.export import checkpoint_tensors

DATA = ROOT / "tests" / "data" / "format_v1" / "data"


@pytest.fixture(scope="module")
def world_of_one():
    with rank_context(0, 1, free_port()) as env:
        yield env


def test_a_non_finite_loss_stops_whatever_the_factor(world_of_one):
    for factor in (10.0, 0.0):
        guard = NumericsGuard(factor)
        guard.first_step(torch.tensor(0.69))
        guard.check_loss(5, 0.7, 5)
        with pytest.raises(Diverged, match="training diverged at step 10: the mean loss of the last 5 steps is nan"):
            guard.check_loss(10, math.nan, 5)


def test_a_spike_over_the_reference_stops(world_of_one):
    guard = NumericsGuard(10.0)
    guard.first_step(torch.tensor(0.7))
    with pytest.raises(Diverged, match="1e\\+03x the loss of the first step"):
        guard.check_loss(5, 700.0, 5)  # blown up within the first interval
    guard = NumericsGuard(10.0)
    guard.first_step(torch.tensor(0.7))
    for i in range(MIN_HISTORY):
        guard.check_loss(5 * (i + 1), 0.5, 5)
    guard.check_loss(30, 4.9, 5)  # 9.8x the median: noisy, not diverged
    with pytest.raises(Diverged, match="the median of the 6 intervals before"):
        guard.check_loss(35, 6.0, 5)
    off = NumericsGuard(0.0)
    off.first_step(torch.tensor(0.7))
    off.check_loss(5, 1e30, 5)


def test_weights_with_nan_are_found_before_a_save(world_of_one):
    guard = NumericsGuard(10.0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    guard.check_weights(model, 7, world_of_one.device)
    with torch.no_grad():
        model[1].weight[0, 0] = math.inf
    guard.last_good = "runs/x/checkpoints/step-00000005"
    with pytest.raises(Diverged, match=r"step 7: 1 weight tensors hold inf or NaN \(here: 1.weight\).*step-00000005"):
        guard.check_weights(model, 7, world_of_one.device)


def test_nan_is_never_best():
    auc, rmse = Headline("auc"), Headline("rmse")
    assert not auc.better(math.nan, None) and not rmse.better(math.nan, 1.0) and auc.better(0.6, None)


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_error_and_commits_nothing_after(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *f"--data {DATA} --run-dir {run_dir} --training.progress_bar false --data.batch_size 64".split(),
        *"--training.log_every 5 --checkpoint.every_steps 10 --training.epochs 2".split(),
    ]
    first = run_trainer([*args, "--training.max_steps", "10"], nproc=2)  # a good checkpoint at step 10
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (run_dir / "summary.json").read_text()
    result = run_trainer([*args, "--optimizer.dense_lr", "1000", "--optimizer.sparse_lr", "1000"], nproc=2)
    ranks = result.stderr.split("failed (exitcode: 3)")[0]  # torchrun's own report follows
    assert result.returncode != 0 and "Traceback" not in ranks, result.stderr[-4000:]
    (error,) = [line for line in ranks.splitlines() if line.startswith("error")]
    assert error.startswith("error: training diverged at step 12: the mean loss of the last 2 steps is ")
    assert error.endswith(f"the last good checkpoint: {run_dir / 'checkpoints' / 'step-00000010'}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000010"]
    assert (run_dir / "summary.json").read_text() == summary  # the good run's, untouched
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["phase"] in ("valid", "test") and r["step"] > 10]


@pytest.mark.slow
def test_skipped_nonfinite_batches_move_nothing_and_a_spent_budget_stops_the_run(tmp_path):
    """RECSYS_FAULT=nan makes one rank's loss NaN: both ranks skip that backward, so a run whose
    step 6 was skipped ends with the tensors (weights, fused-table and Adam state) of a run that
    stopped at step 5; a batch beyond the budget stops the run as diverged."""
    args = [
        *f"--data {DATA} --training.progress_bar false --data.batch_size 64 --training.log_every 5".split(),
        *"--optimizer.lr_schedule constant --training.skip_nonfinite_batches 1".split(),
    ]
    five, six = tmp_path / "five", tmp_path / "six"
    first = run_trainer([*args, "--run-dir", str(five), "--training.max_steps", "5"], nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    skipped = run_trainer([*args, "--run-dir", str(six), "--training.max_steps", "6"], nproc=2, fault="nan@6:1")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "step 6: the loss is not finite on 1 rank(s): batch skipped (1 of training.skip_nonfinite_batches 1)" in (
        skipped.stdout
    )
    summary = json.loads((six / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == [6] and math.isfinite(summary["test"]["logloss"])
    records = [json.loads(line) for line in (six / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "skipped"] == [6]
    assert all(math.isfinite(r["loss"]) for r in records if r["phase"] == "train")
    for part in ("model", "optim"):
        a, b = (checkpoint_tensors(locate(run), part) for run in (five, six))
        assert a.keys() == b.keys() and a
        assert [k for k in a if not torch.equal(a[k], b[k])] == []

    spent = tmp_path / "spent"
    result = run_trainer([*args, "--run-dir", str(spent), "--training.max_steps", "6"], nproc=2, fault="nan@2,4:0")
    ranks = result.stderr.split("failed (exitcode: 3)")[0]
    assert result.returncode != 0 and "Traceback" not in ranks, result.stderr[-4000:]
    (error,) = [line for line in ranks.splitlines() if line.startswith("error")]
    assert error.startswith("error: training diverged at step 4: its loss is not finite on 1 rank(s), and 1 batches")
    assert "(training.skip_nonfinite_batches 1: steps 2)" in error
