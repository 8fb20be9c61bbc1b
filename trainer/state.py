"""The run's own state besides the model and optimizer tensors. Each part owns its serialisation
(`state_dict` / `load_state_dict`, JSON-able), so the checkpointer stores what they return and
never reads their fields (torchtitan's `Stateful` parts).

    TrainState       where the run is: step, epoch and batches of it trained, the last validation
    BestValidation   the best validation so far, and how long ago it was (early stopping, keep-best)
    RngState         this process's random generators (torch, CUDA, Python, NumPy), per rank
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from data_pipeline.reader import SPLIT_RULE
from trainer.headline import Headline


@dataclass(frozen=True)
class DataOrder:
    """What the order of the training batches depends on: a checkpoint taken under another order
    cannot skip exactly the batches it trained, only the same share of the epoch's rows."""

    world_size: int
    batch_size: int
    num_workers: int
    seed: int
    split_rule: int = SPLIT_RULE
    """The reader's rule for splitting rows across ranks and workers (`data_pipeline.reader.SPLIT_RULE`);
    a checkpoint that does not record one was written under rule 1."""
    train_files: str = ""
    """A digest of the train split's files (`data_pipeline.schema.split_identity`); "" in a
    checkpoint written before it was recorded (then not compared)."""

    def changes(self, other: DataOrder) -> list[str]:
        """What differs between the orders, by knob name; [] if they read the same batches."""

        # 0 and 1 workers read the same order (one share of the rank's rows); and one rank with one
        # share reads every row group whole, in the epoch's order, under every split rule
        def rule(order: DataOrder) -> int:
            return order.split_rule if order.world_size * max(order.num_workers, 1) > 1 else SPLIT_RULE

        out = [
            name
            for name, a, b in (
                ("world size", self.world_size, other.world_size),
                ("data.batch_size", self.batch_size, other.batch_size),
                ("data.num_workers", max(self.num_workers, 1), max(other.num_workers, 1)),
                ("training.seed", self.seed, other.seed),
                ("the reader's split rule", rule(self), rule(other)),
            )
            if a != b
        ]
        if self.train_files and other.train_files and self.train_files != other.train_files:
            out.append("the train split's files")
        return out

    def same_as(self, other: DataOrder) -> bool:
        return not self.changes(other)


@dataclass
class TrainState:
    """Where the run is. `epoch_batches` counts the batches of `epoch` already trained: a resumed
    run skips exactly those (an epoch's order is a function of seed and epoch)."""

    order: DataOrder
    """This run's data order (saved; a loaded checkpoint's goes to `saved_order`)."""
    step: int = 0
    epoch: int = 0
    epoch_batches: int = 0
    complete: bool = False
    """Whether training had ended when the state was saved (only the test split was left)."""
    valid: dict[str, float] = field(default_factory=dict)
    """The last validation's metrics, and its step."""
    valid_step: int | None = None
    train_time: float = 0.0
    """Seconds spent in training steps, over every attempt."""
    most_popular: dict[str, dict[str, float]] = field(default_factory=dict)
    """split -> the most-popular baseline's retrieval metrics."""
    skipped_steps: list[int] = field(default_factory=list)
    """The steps whose batch was skipped for a non-finite loss (training.skip_nonfinite_batches)."""
    saved_order: DataOrder | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in asdict(self).items() if k not in ("order", "saved_order")}
        return {**state, **asdict(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = {name: state[name] for name in ("world_size", "batch_size", "num_workers", "seed")}
        self.saved_order = DataOrder(
            **order, split_rule=state.get("split_rule", 1), train_files=state.get("train_files", "")
        )
        for name in ("step", "epoch", "epoch_batches", "complete", "valid", "valid_step", "train_time", "most_popular"):
            setattr(self, name, state[name])
        self.skipped_steps[:] = state.get("skipped_steps", [])  # in place: NonFiniteSkips holds the list

    def resume_position(self, steps_per_epoch: list[int]) -> tuple[int, int, str | None]:
        """(epoch, batches of it to skip, a note when the data order changed) to continue from.
        Under another data order the same share of the epoch's rows is skipped instead."""
        epoch, position, note = self.epoch, self.epoch_batches, None
        saved = self.saved_order or self.order
        changed = saved.changes(self.order)
        if changed:
            rows = position * saved.batch_size * saved.world_size
            size = steps_per_epoch[epoch] if epoch < len(steps_per_epoch) else 0
            position = min(rows // (self.order.batch_size * self.order.world_size), size)
            note = (
                f"{', '.join(changed)} changed: the data order differs from the original run's; resuming epoch "
                f"{epoch} at batch {position} (the same share of its rows)"
            )
        if epoch < len(steps_per_epoch) and position >= steps_per_epoch[epoch]:
            epoch, position = epoch + 1, 0
        return epoch, position, note


class BestValidation:
    """The best validation result and how many evaluations have passed without beating it, by the
    run's headline metric. `should_stop` turns true after `patience` evaluations without
    improvement (never, with patience 0)."""

    def __init__(self, headline: Headline, patience: int = 0) -> None:
        self.headline, self.patience = headline, patience
        self.metrics: dict[str, float] = {}
        self.step: int | None = None
        self.evals_since_best = 0
        self.note: str | None = None
        """Set by load_state_dict when the saved best could not be kept."""

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record one evaluation; True if it is the best so far."""
        name = self.headline.name
        if self.headline.better(metrics[name], self.metrics[name] if self.metrics else None):
            self.metrics, self.step, self.evals_since_best = dict(metrics), step, 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return 0 < self.patience <= self.evals_since_best

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.headline.name,
            "metrics": self.metrics,
            "step": self.step,
            "evals_since_best": self.evals_since_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved best; or none, with `self.note` saying why, when it was chosen by another
        metric (training.top_k changed, say): a best by one metric cannot be beaten by another."""
        saved = state.get("metric") or next(iter(state["metrics"]), None)  # format 1: the first metric was it
        self.note = None
        if state["metrics"] and saved != self.headline.name:
            self.metrics, self.step, self.evals_since_best = {}, None, 0
            self.note = (
                f"the checkpoint's best validation was chosen by {saved}, this run chooses by "
                f"{self.headline.name}: the best starts afresh"
            )
            return
        self.metrics, self.step, self.evals_since_best = state["metrics"], state["step"], state["evals_since_best"]


class RngState:
    """This process's random generators. Saved per rank (rank-<r>.pt, plain tensors for
    torch.load(weights_only=True)); restored only where the data order is the same, after the
    epoch's loader is opened (opening it draws from torch's generator)."""

    @staticmethod
    def state_dict() -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        version, internal, gauss = random.getstate()
        state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        }
        return state

    @staticmethod
    def load_state_dict(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all(state["cuda"])
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
        npy = state["numpy"]
        np.random.set_state(
            (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
        )
