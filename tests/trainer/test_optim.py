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


def _schedule(schedule: str, lr: float) -> tuple[torch.optim.Optimizer, LearningRates]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    rates = LearningRates(opt, 10, schedule, 2, 0.1, plateau_factor=0.5, plateau_patience=0, higher_is_better=True)
    return opt, rates


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_a_rate_changed_on_resume_takes_effect_at_the_schedules_position(schedule):
    opt, rates = _schedule(schedule, 1.0)
    for step in range(6):
        opt.step()
        rates.after_step()
        if step == 3:
            rates.after_eval(0.5)
            rates.after_eval(0.4)  # plateau: halved
    saved = rates.state_dict()
    before = rates.current()
    same_opt, same = _schedule(schedule, 1.0)
    same.load_state_dict(saved)
    assert same.current() == before  # unchanged config: bit for bit
    new_opt, resumed = _schedule(schedule, 0.01)
    resumed.load_state_dict(saved)
    assert resumed.current() == pytest.approx(before * 0.01)
    for rates_, opt_ in ((rates, opt), (resumed, new_opt)):
        opt_.step()
        rates_.after_step()
    assert resumed.current() == pytest.approx(rates.current() * 0.01)
