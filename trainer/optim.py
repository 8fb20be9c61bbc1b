"""Optimizers: the sparse one fused into the embedding backward, the dense one stepped as usual.

`apply_sparse_optimizer` marks the embedding tables before sharding; DMP turns the mark into
fbgemm's fused update (no gradient for a table is ever materialised). Unsharded, the same mark
runs the same update as a backward hook, which is what lets tests compare the two.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

SPARSE = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
DENSE = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def _kwargs(name: str, lr: float, eps: float) -> dict:
    return {"lr": lr} if name == "sgd" else {"lr": lr, "eps": eps}


SPARSE_OPTIMIZER_HINT = "sparse_optimizer"
"""Optional attribute of an EmbeddingBagCollection, set by the model: `{"name": ..., "lr": ...}`
(either key may be left out) to train that collection's tables with another sparse optimizer or
rate than the configured one."""


TableOptimizers = dict[str, tuple[type, dict]]
"""table name -> (optimizer class, its kwargs): what `apply_sparse_optimizer` gave each table."""


def apply_sparse_optimizer(
    model: nn.Module, name: str, lr: float, eps: float, table_lr: dict[str, float] | None = None
) -> TableOptimizers:
    """Fuse optimizer `name` at `lr` into every EmbeddingBagCollection's backward, or what the
    collection's `SPARSE_OPTIMIZER_HINT` asks for; `table_lr` overrides the rate of single tables
    (by table name). The hint lets a model train some tables differently (Wide&Deep's wide part:
    its own Adagrad and rate, as in the paper) from its own config, so the trainer never switches
    on model names. Tables with different rates become separate fused kernels after sharding.
    Returns what each table got, for the tables sharding leaves unfused (`build_optimizer`)."""
    table_lr = dict(table_lr or {})
    chosen: TableOptimizers = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            hint = getattr(module, SPARSE_OPTIMIZER_HINT, None) or {}
            module_name, module_lr = hint.get("name", name), hint.get("lr", lr)
            if module_name not in SPARSE:
                raise ValueError(f"sparse optimizer '{module_name}' is not one of: {', '.join(SPARSE)}")
            for table, bag in module.embedding_bags.items():
                rate = table_lr.pop(table, module_lr)
                chosen[table] = SPARSE[module_name], _kwargs(module_name, rate, eps)
                # a copy: DMP edits the kwargs it finds on the parameters into fbgemm's names
                apply_optimizer_in_backward(chosen[table][0], bag.parameters(), dict(chosen[table][1]))
    if table_lr:
        raise ValueError(f"optimizer.table_lr names tables the model does not have: {', '.join(sorted(table_lr))}")
    return chosen


TABLE_WEIGHT = re.compile(r"(?:^|\.)(?:embedding_bags|embeddings)\.([^.]+)\.weight$")
"""The name of an embedding table's weight in a (sharded) model; group 1 is the table."""


class ReplicatedTables(KeyedOptimizerWrapper):
    """The unfused optimizer of data_parallel tables, its state named as fbgemm names a fused
    table's: Adagrad's running sum is `{table}.momentum1` (one value per row for the rowwise rule,
    the table's shape for plain Adagrad), with no step count (fbgemm keeps none; torch's update uses
    it only for lr_decay, which is 0 here). Named alike, a checkpoint moves between a plan that
    replicates a table and one that shards it (trainer/checkpoint/reshard.py converts the layout)."""

    def __init__(self, params: dict[str, nn.Parameter], cls: type, kwargs: dict) -> None:
        super().__init__(params, lambda p: cls(p, **kwargs))
        rowwise = issubclass(cls, RowWiseAdagrad)
        named: dict = {}
        for fqn, param in params.items():
            table, own = TABLE_WEIGHT.search(fqn)[1], self._optimizer.state[param]
            if "sum" in own:  # a view: the optimizer's own updates show, and loads land, in place
                named[param] = {f"{table}.momentum1": own["sum"].view(-1) if rowwise else own["sum"]}
            else:  # SGD: no state, as fused
                named[param] = {k: v for k, v in own.items() if k != "step"}
        self.state = named


def _replicated_table_optimizers(params: dict[str, nn.Parameter], tables: TableOptimizers) -> list:
    """Optimizers for the tables sharded data_parallel: DMP keeps these as plain replicated weights
    (a dense kernel, gradients all-reduced by DDP) and fuses no optimizer into them, so without
    this they would silently train with the dense optimizer (Adam at dense_lr) instead of their
    own. Each gets, unfused, the update `apply_sparse_optimizer` chose for it (torchrec's
    RowWiseAdagrad is the same rule as fbgemm's fused one)."""
    groups: dict[tuple, dict[str, nn.Parameter]] = {}
    for fqn, param in params.items():
        match = TABLE_WEIGHT.search(fqn)
        if match and match[1] in tables:
            cls, kwargs = tables[match[1]]
            groups.setdefault((cls, tuple(sorted(kwargs.items()))), {})[fqn] = param
    return [ReplicatedTables(group, cls, dict(kwargs)) for (cls, kwargs), group in groups.items()]


def build_optimizer(
    model: nn.Module,
    dense: str,
    lr: float,
    eps: float,
    weight_decay: float = 0.0,
    grad_clip_norm: float = 0.0,
    tables: TableOptimizers | None = None,
) -> CombinedOptimizer:
    """Dense optimizer over every parameter not already updated in backward, combined with the
    sharded model's fused optimizer and the data-parallel tables' own (`tables`, from
    `apply_sparse_optimizer`), so one `step`/`zero_grad`/`state_dict` covers all. Clipping
    (torchrec's GradientClippingOptimizer) sees the dense gradients after DDP's all-reduce, so
    every rank clips the same global norm; tables are not clipped, fused or not."""
    params = dict(in_backward_optimizer_filter(model.named_parameters(), include=False))
    replicated = _replicated_table_optimizers(params, tables or {})
    for optimizer in replicated:
        for fqn in optimizer.params:
            del params[fqn]
    kwargs = {**_kwargs(dense, lr, eps), "weight_decay": weight_decay}
    dense_opt = KeyedOptimizerWrapper(params, lambda p: DENSE[dense](p, **kwargs))
    if grad_clip_norm > 0:
        dense_opt = GradientClippingOptimizer(dense_opt, clipping=GradientClipping.NORM, max_gradient=grad_clip_norm)
    fused = getattr(model, "fused_optimizer", None)
    return CombinedOptimizer([*([fused] if fused is not None else []), *replicated, dense_opt])  # dense last


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """The factor on the initial learning rates at `step` (0-based): linear warmup, then constant
    or linear/cosine decay to `min_lr_ratio` at `total_steps` ("plateau" decays elsewhere)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule not in ("linear", "cosine") or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_lr_ratio + (1 - min_lr_ratio) * decay


class LearningRates:
    """Every optimizer's learning rate over the run (dense and fused sparse alike: torchrec's fused
    optimizer applies a changed param-group lr at its next step).

    Warmup and linear/cosine decay are a per-step LambdaLR; "plateau" is torch's ReduceLROnPlateau
    on the validation metric, and the LambdaLR stops after warmup so it does not undo the drops.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        schedule: str,
        warmup_steps: int,
        min_lr_ratio: float,
        plateau_factor: float,
        plateau_patience: int,
        higher_is_better: bool,
    ) -> None:
        self.schedule, self.warmup_steps = schedule, warmup_steps
        self.optimizer = optimizer
        self.per_step = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total_steps, schedule, warmup_steps, min_lr_ratio)
        )
        self.on_plateau = None
        if schedule == "plateau":
            self.on_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max" if higher_is_better else "min", factor=plateau_factor, patience=plateau_patience
            )
        self.steps = 0

    def after_step(self) -> None:
        self.steps += 1
        if self.schedule != "plateau" or self.steps <= self.warmup_steps:
            self.per_step.step()

    def after_eval(self, metric: float) -> None:
        if self.on_plateau is not None and self.steps >= self.warmup_steps:
            self.on_plateau.step(metric)

    def current(self) -> float:
        """The dense optimizer's learning rate now (the last param group), for the logs."""
        return self.optimizer.param_groups[-1]["lr"]

    def state_dict(self) -> dict:
        """The schedulers' state and every param group's current rate, as JSON."""
        per_step = {k: v for k, v in self.per_step.state_dict().items() if k != "lr_lambdas"}
        plateau = None
        if self.on_plateau is not None:
            plateau = {k: v for k, v in self.on_plateau.state_dict().items() if k != "optimizer"}
        groups = [{"lr": g["lr"], "initial_lr": g.get("initial_lr")} for g in self.optimizer.param_groups]
        return {"steps": self.steps, "per_step": per_step, "plateau": plateau, "groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Restore the schedule's position, with this run's configured rates as its base: a rate
        changed since the checkpoint takes effect (each group's lr = its new base rate times the
        multiplier the schedule, or the plateau drops, had reached)."""
        groups = list(self.optimizer.param_groups)
        bases = [g["initial_lr"] for g in groups]  # set from this run's config by LambdaLR
        self.steps = state["steps"]
        self.per_step.load_state_dict({**state["per_step"], "lr_lambdas": [None] * len(self.per_step.lr_lambdas)})
        self.per_step.base_lrs = list(bases)
        if self.on_plateau is not None and state["plateau"] is not None:
            self.on_plateau.load_state_dict(state["plateau"])
        saved = state["groups"]
        if len(saved) != len(groups):  # another plan groups the fused tables differently: the dense group's
            saved = [saved[-1]] * len(groups)
        for group, base, old in zip(groups, bases, saved):
            was = old.get("initial_lr") or old["lr"] or 1.0
            group["lr"] = old["lr"] if base == was else base * old["lr"] / was  # unchanged: bit for bit
            group["initial_lr"] = base
