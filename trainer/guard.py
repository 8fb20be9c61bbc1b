"""The numerics guard: a diverging run stops with one clear error instead of saving garbage.

With learning rates far too high the loss can reach 1e22 or NaN while the run goes on to exit 0,
commit checkpoints and call a NaN model "best". The guard reads only what the loop already
all-reduces (the mean loss of each log interval, and of each phase's tail), so it adds no host
sync to a step, and before each checkpoint it checks the weights themselves are finite (a finite
loss can still have produced an infinite update). It stops the run when:
  - a loss or a weight is not finite;
  - a log interval's mean loss is over `training.divergence_factor` times a reference: the median
    of the intervals before it, or, until there are MIN_HISTORY of them, the loss of the process's
    first step (the untrained model's, in a fresh run: a run can blow up within one interval).
    0 turns this test off.
Every rank sees the same all-reduced numbers, so every rank raises together. Not saved in
checkpoints: a resumed run starts a fresh median (and trains exactly as before either way).

`training.skip_nonfinite_batches N` lets a run skip up to N batches whose loss is not finite on
some rank instead (`NonFiniteSkips`): the ranks agree on each step's loss before its backward, and
skip the backward together (no gradient: no weight, fused table or optimizer state moves; the
step, its batch and the learning-rate schedule go on). The skipped steps are saved with the run's
state, so the budget holds across resumes.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist

from trainer.distributed import local_state_tensors
from trainer.logs import get_logger

log = get_logger(__name__)

WINDOW = 20
"""Log intervals in the running median."""
MIN_HISTORY = 5
"""Log intervals seen before the spike test starts (the first losses fall fast)."""


class Diverged(RuntimeError):
    """Training produced non-finite numbers or a loss spike; the message says where."""


class NumericsGuard:
    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.history: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.last_good = "none"
        """The last checkpoint committed with finite weights, for the error message."""
        self._first: torch.Tensor | None = None  # the first step's loss, on the device until needed
        self._first_mean: float | None = None

    def first_step(self, loss: torch.Tensor) -> None:
        """Keep the loss of this process's first step (no host sync)."""
        if self._first is None:
            self._first = loss.detach().float().clone()

    def _reference(self) -> tuple[float, str] | None:
        if len(self.history) >= MIN_HISTORY:
            return statistics.median(self.history), f"median of the {len(self.history)} intervals before"
        if self._first is None:
            return None
        if self._first_mean is None:  # every rank checks at the same steps: a collective is safe here
            first = self._first.clone()
            dist.all_reduce(first)
            self._first_mean = first.item() / dist.get_world_size()
        return self._first_mean, "loss of the first step"

    def _raise(self, step: int, what: str) -> None:
        raise Diverged(f"training diverged at step {step}: {what}; the last good checkpoint: {self.last_good}")

    def check_loss(self, step: int, mean_loss: float, steps: int, logged: bool = True) -> None:
        """`mean_loss`: the all-reduced mean over the `steps` steps up to `step`; `logged`: a full
        log interval (only those join the median; a phase's short tail is tested, not kept)."""
        if not math.isfinite(mean_loss):
            self._raise(step, f"the mean loss of the last {steps} steps is {mean_loss}")
        reference = self._reference() if self.factor > 0 else None
        if reference is not None and math.isfinite(reference[0]) and reference[0] > 0:
            value, what = reference
            if mean_loss > self.factor * value:
                self._raise(
                    step,
                    f"the mean loss of the last {steps} steps is {mean_loss:.6g}, {mean_loss / value:.3g}x the "
                    f"{what} ({value:.6g}; training.divergence_factor {self.factor:g}); lower the learning rates",
                )
        if logged:
            self.history.append(mean_loss)

    def check_weights(self, model: nn.Module, step: int, device: torch.device) -> None:
        """Every rank's weights finite (a collective), before a checkpoint or a best copy is kept."""
        bad = torch.zeros((), device=device)
        names = []
        for name, tensor in local_state_tensors(model).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad += 1
                names.append(name.split("#")[0])
        dist.all_reduce(bad)
        if bad.item():
            where = f" (here: {', '.join(sorted(set(names))[:3])})" if names else ""
            self._raise(step, f"{int(bad.item())} weight tensors hold inf or NaN{where}")


class NonFiniteSkips:
    """Which training batches had a non-finite loss on some rank and were skipped; at most `budget`.

    `skipped` is the run's list of skipped steps (TrainState.skipped_steps, saved in checkpoints);
    `step` gives the step being trained. Every rank all-reduces the same flag, so every rank skips
    (or raises) together: a rank that ran its backward alone would wait forever for the others'
    gradients."""

    def __init__(self, budget: int, skipped: list[int], step: Callable[[], int]) -> None:
        self.budget, self.skipped, self.step = budget, skipped, step
        self.now = False
        """Whether the batch just trained was skipped (its loss counts in no mean)."""

    def keep(self, losses: torch.Tensor) -> bool:
        """Whether to run this batch's backward (a collective and a host sync)."""
        bad = (~torch.isfinite(losses.detach())).any().to(torch.float32).reshape(1)
        dist.all_reduce(bad)
        self.now = bool(bad.item())
        if not self.now:
            return True
        step = self.step()
        if len(self.skipped) >= self.budget:
            raise Diverged(
                f"training diverged at step {step}: its loss is not finite on {int(bad.item())} rank(s), and "
                f"{len(self.skipped)} batches were skipped already (training.skip_nonfinite_batches "
                f"{self.budget}: steps {', '.join(map(str, self.skipped))}); lower the learning rates or check "
                "the data"
            )
        self.skipped.append(step)
        log.warning(
            "step %d: the loss is not finite on %d rank(s): batch skipped (%d of training.skip_nonfinite_batches %d)",
            step, int(bad.item()), len(self.skipped), self.budget,
        )  # fmt: skip
        return False


class _SkipsNonFinite:
    """A train pipeline whose backward asks `skips` first (None: always runs it)."""

    skips: NonFiniteSkips | None = None

    def _backward(self, losses: torch.Tensor) -> None:
        if self.skips is None or self.skips.keep(losses):
            super()._backward(losses)  # type: ignore[misc]


class GuardedPipeline(_SkipsNonFinite, TrainPipelineSparseDist):
    """torchrec's pipelined trainer (input dist of the next batch overlapping this one's compute)."""


class GuardedBasePipeline(_SkipsNonFinite, TrainPipelineBase):
    """torchrec's plain trainer (training.pipelined false)."""
