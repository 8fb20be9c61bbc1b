"""The run's Stateful parts: what they save is what they load, and the rules they carry (best
validation and early stopping, where a resumed run continues, the headline metric)."""

import json
import random

import numpy as np
import pytest
import torch

from trainer.headline import Headline, headline
from trainer.optim import LearningRates
from trainer.state import BestValidation, DataOrder, RngState, TrainState


def test_headline_rule():
    assert headline("binary") == Headline("auc") and headline("binary").higher_is_better
    assert headline("regression") == Headline("rmse") and not headline("regression").higher_is_better
    assert headline("binary", recall_k=10).name == "recall@10" and headline("binary", 10).higher_is_better
    assert Headline("rmse").better(0.9, 1.0) and not Headline("auc").better(0.7, 0.8)
    assert Headline("auc").better(0.5, None)  # nothing to beat yet


def test_best_validation_and_early_stopping():
    best = BestValidation(headline("regression"), patience=2)  # rmse: lower is better
    assert best.update({"rmse": 1.0, "mae": 0.8}, step=10)
    assert not best.update({"rmse": 1.1, "mae": 0.7}, step=20) and not best.should_stop
    assert best.update({"rmse": 0.9, "mae": 0.9}, step=30) and best.step == 30
    best.update({"rmse": 0.95, "mae": 0.9}, 40)
    best.update({"rmse": 0.91, "mae": 0.9}, 50)
    assert best.should_stop and best.metrics == {"rmse": 0.9, "mae": 0.9}
    assert not BestValidation(headline("binary"), patience=0).should_stop


def test_best_validation_decides_by_the_headline_not_the_first_key():
    best = BestValidation(headline("binary", recall_k=10))
    assert best.update({"auc": 0.9, "recall@10": 0.1}, 1)
    assert not best.update({"auc": 0.95, "recall@10": 0.05}, 2)  # better AUC, worse recall: not better


def test_best_validation_round_trip_through_json():
    best = BestValidation(headline("binary"), patience=3)
    best.update({"auc": 0.8}, 10)
    best.update({"auc": 0.7}, 20)
    saved = json.loads(json.dumps(best.state_dict()))
    assert saved["metric"] == "auc"
    again = BestValidation(headline("binary"), patience=3)
    again.load_state_dict(saved)
    assert (again.metrics, again.step, again.evals_since_best) == ({"auc": 0.8}, 10, 1)


ORDER = DataOrder(world_size=2, batch_size=64, num_workers=1, seed=0)


def test_train_state_round_trip_and_resume_position():
    state = TrainState(ORDER, step=30, epoch=1, epoch_batches=10, valid={"auc": 0.7}, valid_step=25, train_time=3.5)
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved["world_size"] == 2 and saved["epoch_batches"] == 10  # the layout checkpoint.json has held since v1
    resumed = TrainState(ORDER)
    resumed.load_state_dict(saved)
    assert (resumed.step, resumed.epoch, resumed.valid, resumed.train_time) == (30, 1, {"auc": 0.7}, 3.5)
    assert resumed.resume_position([20, 20]) == (1, 10, None)  # the same order: skip exactly what was trained


def test_resume_position_under_another_data_order_skips_the_same_share_of_rows():
    state = TrainState(DataOrder(world_size=1, batch_size=64, num_workers=0, seed=0))  # was: 2 ranks x 64
    state.load_state_dict({**TrainState(ORDER, epoch=0, epoch_batches=10).state_dict()})
    epoch, position, note = state.resume_position([40])
    assert (epoch, position) == (0, 20) and "data order differs" in note  # 10 x 128 rows = 20 x 64
    assert DataOrder(2, 64, 0, 0).same_as(DataOrder(2, 64, 1, 0))  # 0 and 1 workers read alike


def test_resume_position_after_a_finished_epoch_starts_the_next():
    state = TrainState(ORDER)
    state.load_state_dict(TrainState(ORDER, epoch=0, epoch_batches=20).state_dict())
    assert state.resume_position([20, 20]) == (1, 0, None)


def test_rng_state_restores_every_generator():
    saved = RngState.state_dict()
    draws = (torch.rand(3), random.random(), np.random.rand())
    RngState.load_state_dict(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_learning_rates_round_trip(schedule):
    def rates() -> LearningRates:
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return LearningRates(optimizer, 100, schedule, 5, 0.1, 0.5, 0, higher_is_better=True)

    lr = rates()
    for step in range(12):
        lr.after_step()
        if step % 4 == 3:
            lr.after_eval(0.5)  # no improvement after the first: plateau drops the rate
    saved = json.loads(json.dumps(lr.state_dict()))
    again = rates()
    again.load_state_dict(saved)
    assert again.current() == lr.current() and again.steps == 12
    lr.after_step(), again.after_step()
    assert again.current() == lr.current()


def test_a_best_chosen_by_another_metric_starts_afresh():
    """training.top_k may change on resume (an allowed change): a best by recall@10 cannot be
    compared with recall@20, so the best starts afresh, with a note."""
    before = BestValidation(headline("binary", recall_k=10))
    before.update({"recall@10": 0.3, "auc": 0.8}, 5)
    after = BestValidation(headline("binary", recall_k=20))
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert after.metrics == {} and after.step is None and "recall@10" in after.note
    assert after.update({"recall@20": 0.1, "auc": 0.7}, 6)  # and the next validation is the best
    same = BestValidation(headline("binary", recall_k=10))
    same.load_state_dict(before.state_dict())
    assert same.step == 5 and same.note is None
    legacy = BestValidation(headline("binary"))  # format 1 saved no "metric": its first metric was it
    legacy.load_state_dict({"metrics": {"auc": 0.8, "logloss": 0.4}, "step": 5, "evals_since_best": 1})
    assert legacy.step == 5 and legacy.note is None


def test_another_train_split_is_another_data_order_named_as_such():
    saved = DataOrder(2, 64, 0, 0, train_files="aaaa")
    assert saved.changes(DataOrder(2, 64, 1, 0, train_files="aaaa")) == []
    assert saved.changes(DataOrder(1, 32, 0, 0, train_files="bbbb")) == [
        "world size",
        "data.batch_size",
        "the train split's files",
    ]
    assert saved.same_as(DataOrder(2, 64, 0, 0))  # a checkpoint from before the digest: not compared
    state = TrainState(DataOrder(2, 64, 0, 0, train_files="bbbb"))
    state.load_state_dict(TrainState(saved, epoch=0, epoch_batches=10).state_dict())
    epoch, position, note = state.resume_position([40])
    assert (epoch, position) == (0, 10) and note.startswith("the train split's files changed: the data order")
