"""Validation and test inside the training job: every row of a split scored once by the sharded
model through the training pipeline (forward only), plus the full-catalogue retrieval metrics for
models with towers on datasets that list their catalogue. Decides when validation is due.

The pipeline gets an iterator that ends at the split's end, so it drains what it buffered: no
batch of one phase is consumed by another.
"""

from __future__ import annotations

import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from data_pipeline.schema import DatasetSchema
from trainer.build import eval_loader
from trainer.catalogue import CatalogueRetrieval, supports_retrieval
from trainer.config import Config
from trainer.distributed import DistEnv
from trainer.headline import Headline, headline
from trainer.metrics import task_metrics


class Evaluator:
    def __init__(self, cfg: Config, env: DistEnv, schema: DatasetSchema, model: DistributedModelParallel, pipeline):
        self.cfg, self.env, self.schema, self.model, self.pipeline = cfg, env, schema, model, pipeline
        self.eval_every = cfg.training.eval_every
        self.loaders = {split: eval_loader(cfg, env, schema, split) for split in ("valid", "test")}
        self.towers = model.module.model  # the model inside the loss wrapper
        self.retrieval = None
        top_k = cfg.training.top_k
        if top_k and hasattr(self.towers, "encode") and supports_retrieval(schema):
            self.retrieval = CatalogueRetrieval(
                schema,
                self.towers.user_id,
                self.towers.item_id,
                top_k,
                env.rank,
                env.world_size,
                env.device,
                cfg.data.eval_batch_size,
            )
        self.headline: Headline = headline(schema.task, min(top_k) if self.retrieval else None)
        """The metric that decides "better" (the first one `evaluate` reports)."""

    def steps_to_next(self, position: int) -> int | None:
        """Batches from `position` (in the epoch) to the next periodic validation (None: at epoch ends only)."""
        return self.eval_every - position % self.eval_every if self.eval_every else None

    def due(self, position: int, epoch_size: int, last_step: bool) -> bool:
        """Validate now: every `eval_every` batches of an epoch, at each epoch's end, at the last step."""
        return position == epoch_size or last_step or bool(self.eval_every and position % self.eval_every == 0)

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[dict[str, float], dict[str, float] | None]:
        """(metrics of `split`, the most-popular baseline's retrieval metrics or None). Every row
        is scored once: ranks pad to equal batch counts, and padding is not scored."""
        self.model.eval()
        metrics = task_metrics(
            self.schema.task, self.env.device, self.schema.label_range, self.cfg.training.auroc_thresholds
        )
        batches = iter(self.loaders[split])
        while True:
            try:
                _, logits, labels, weights = self.pipeline.progress(batches)
            except StopIteration:
                break
            metrics.update(logits, labels, weights)
        results, baseline = metrics.compute(), None
        if self.retrieval is not None:
            if hasattr(self.pipeline, "detach"):
                self.pipeline.detach()  # the tables' own forward back; the next progress() re-attaches
            retrieved, baseline = self.retrieval.evaluate(split, lambda b: self.towers.encode(b.dense, b.sparse))
            results = {**retrieved, **results}  # the headline metric first
        self.model.train()
        return results, baseline
