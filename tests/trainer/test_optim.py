"""Learning-rate schedules and per-table rates."""

import pytest
import torch

from trainer.config import OptimizerConfig
from trainer.optim import LearningRates


def _rates(schedule, steps, warmup=0, evals=None, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = LearningRates(
        opt,
        total_steps=steps,
        schedule=schedule,
        warmup_steps=warmup,
        min_lr_ratio=kw.get("min_lr_ratio", 0.0),
        plateau_factor=0.5,
        plateau_patience=0,
        higher_is_better=True,
    )
    seen = [rates.current()]
    for step in range(steps):
        opt.step()
        rates.after_step()
        if evals and step + 1 in evals:
            rates.after_eval(evals[step + 1])
        seen.append(rates.current())
    return seen


def test_warmup_then_cosine_to_min_ratio():
    seen = _rates("cosine", 10, warmup=2, min_lr_ratio=0.1)
    assert seen[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert seen[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(seen[2:], seen[3:]))  # decays monotonically after warmup


def test_plateau_drops_are_not_undone_by_warmup_schedule():
    seen = _rates("plateau", 8, warmup=2, evals={3: 0.7, 5: 0.7, 7: 0.8})
    assert seen[2] == pytest.approx(1.0)
    assert seen[5] == pytest.approx(0.5) and seen[6] == pytest.approx(
        0.5
    )  # no improvement at step 5: halved, and stays
    assert seen[-1] == pytest.approx(0.5)


def test_table_lr_entries():
    assert OptimizerConfig(table_lr=["t_user_id=0.1", "t_b = 2"]).table_lrs() == {"t_user_id": 0.1, "t_b": 2.0}
    with pytest.raises(ValueError, match="look like 't_user_id=0.1'"):
        OptimizerConfig(table_lr=["t_user_id:0.1"])
