"""The training loop: build -> (train phase -> validate)* -> test -> summary.

A phase hands the train pipeline an iterator that ends exactly at the phase boundary
(`islice`), so the pipeline drains the batches it buffered ahead before the phase returns: no
batch of one phase is ever consumed by another, and the same pipeline serves training and
evaluation (in eval mode it runs forward only).
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from tqdm import tqdm

from data_pipeline.batch import Batch
from data_pipeline.reader import ParquetBatches, RankLoader
from data_pipeline.schema import DataError, DatasetSchema, check_files
from models import build_model
from trainer.config import Config
from trainer.distributed import DistEnv, describe_plan, local_state_tensors, plan_sharding, shard_model
from trainer.metrics import BestValidation, headline, task_metrics
from trainer.optim import LearningRates, apply_sparse_optimizer, build_optimizer
from trainer.retrieval import CatalogueRetrieval, supports_retrieval
from trainer.run_log import RunLog

SPLITS = ("train", "valid", "test")


def preflight(cfg: Config) -> DatasetSchema:
    """Everything checkable before any process group exists: dataset, files, columns, types."""
    schema = DatasetSchema.load(cfg.data.path)
    for split in SPLITS:
        check_files(schema, split)
    return schema


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, schema: DatasetSchema) -> None:
        self.cfg, self.env, self.schema = cfg, env, schema
        torch.manual_seed(cfg.training.seed)

        data = cfg.data
        common = dict(schema=schema, rank=env.rank, world_size=env.world_size, num_workers=data.num_workers, seed=cfg.training.seed)
        pin = env.device.type == "cuda"
        self.train_data = RankLoader(ParquetBatches(split="train", batch_size=data.batch_size, shuffle=data.shuffle, drop_last=True,
                                                    shuffle_buffer_rows=data.shuffle_buffer_rows, **common), pin)
        self.eval_data = {
            split: RankLoader(ParquetBatches(split=split, batch_size=data.eval_batch_size, shuffle=False, drop_last=False, **common), pin)
            for split in ("valid", "test")
        }
        if len(self.train_data) == 0:
            raise DataError(
                f"split 'train' yields no full batch of {data.batch_size} rows on some rank: "
                f"{len(self.train_data.dataset.row_groups)} row groups for {env.world_size} ranks x "
                f"{max(data.num_workers, 1)} workers; lower data.batch_size or write smaller row groups"
            )

        model = build_model(cfg.model, schema, dense_device=env.device, sparse_device=torch.device("meta"))
        opt = cfg.optimizer
        apply_sparse_optimizer(model, opt.sparse, opt.sparse_lr, opt.eps, opt.table_lrs())
        self.plan = plan_sharding(model, env, data.batch_size, cfg.sharding)
        self.model = shard_model(model, env, self.plan)
        self.optimizer = build_optimizer(self.model, opt.dense, opt.dense_lr, opt.eps, opt.weight_decay, opt.grad_clip_norm)
        pipeline = TrainPipelineSparseDist if cfg.training.pipelined else TrainPipelineBase
        forward = self._bf16_forward if cfg.training.mixed_precision == "bf16" else None
        self.pipeline = pipeline(self.model, self.optimizer, env.device, custom_model_fwd=forward)

        self.towers = self.model.module.model  # the model inside the loss wrapper
        self.retrieval = None
        if cfg.training.top_k and hasattr(self.towers, "encode") and supports_retrieval(schema):
            self.retrieval = CatalogueRetrieval(schema, self.towers.user_id, self.towers.item_id, cfg.training.top_k,
                                                env.rank, env.world_size, env.device, data.eval_batch_size)
        self.most_popular: dict[str, dict[str, float]] = {}  # split -> the baseline's retrieval metrics

        self.log = RunLog(cfg.run_dir, enabled=env.is_main)
        self.step = 0
        self.train_time = 0.0
        self.steps_per_epoch = []
        for epoch in range(cfg.training.epochs):
            self.train_data.set_epoch(epoch)
            self.steps_per_epoch.append(len(self.train_data))
        every_step = sum(self.steps_per_epoch)
        self.total_steps = min(every_step, cfg.training.max_steps or every_step)
        self.higher_is_better = schema.task == "binary"  # the headline metric: auc up, rmse down
        self.lr = LearningRates(self.optimizer, self.total_steps, opt.lr_schedule, opt.warmup_steps, opt.min_lr_ratio,
                                opt.plateau_factor, opt.plateau_patience, self.higher_is_better)

    def _bf16_forward(self, batch: Batch):
        """The model's forward under bfloat16 autocast; outputs back in fp32 for the loss's
        backward and the metrics. The backward pass runs outside autocast, as torch advises."""
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16):
            loss, outputs = self.model(batch)
        return loss.float(), tuple(t.float() if t.is_floating_point() else t for t in outputs)

    # ---- phases -------------------------------------------------------------------------------
    def train_steps(self, batches: Iterator[Batch], progress: tqdm) -> None:
        """Train until `batches` ends; log loss and throughput every `training.log_every` steps."""
        self.model.train()
        every = self.cfg.training.log_every
        loss_sum = torch.zeros(2, device=self.env.device)  # (sum of losses, steps) since last log
        start = last = time.perf_counter()
        while True:
            try:
                loss, *_ = self.pipeline.progress(batches)
            except StopIteration:
                break
            self.step += 1
            self.lr.after_step()
            loss_sum += torch.stack([loss.float(), torch.ones((), device=loss.device)])
            progress.update(1)
            if self.step % every == 0:
                dist.all_reduce(loss_sum)  # mean over ranks; also syncs the device before timing
                now = time.perf_counter()
                rate = loss_sum[1].item() / self.env.world_size * self.global_batch / (now - last)
                mean_loss = (loss_sum[0] / loss_sum[1]).item()
                self.log.record("train", self.step, loss=mean_loss, samples_per_s=rate, lr=self.lr.current())
                progress.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}")
                loss_sum.zero_()
                last = now
        self.train_time += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Score every row of `split` once (ranks pad to equal batch counts; padding is not scored)."""
        self.model.eval()
        metrics = task_metrics(self.schema.task, self.env.device, self.schema.label_range, self.cfg.training.auroc_thresholds)
        batches = iter(self.eval_data[split])
        while True:
            try:
                _, logits, labels, weights = self.pipeline.progress(batches)
            except StopIteration:
                break
            metrics.update(logits, labels, weights)
        results = metrics.compute()
        if self.retrieval is not None:
            if hasattr(self.pipeline, "detach"):
                self.pipeline.detach()  # the tables' own forward back; the next progress() re-attaches
            retrieved, self.most_popular[split] = self.retrieval.evaluate(split, lambda b: self.towers.encode(b.dense, b.sparse))
            results = {**retrieved, **results}  # first: the headline metric
        self.model.train()
        return results

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.env.world_size

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        main = self.env.is_main
        plan_text = describe_plan(self.plan)
        if main:
            print(f"world_size {self.env.world_size} on {self.env.device.type} ({self.env.backend}); "
                  f"model {cfg.model.name}; global batch {self.global_batch}")
            print("sharding plan:\n" + plan_text, flush=True)
        self.log.write_file("config.toml", cfg.to_toml())
        self.log.write_file("plan.txt", plan_text + "\n")

        total = self.total_steps
        valid: dict[str, float] = {}
        best = BestValidation(self.higher_is_better, t.early_stopping_patience)
        best_weights: dict[str, torch.Tensor] = {}
        # `with`: the bar is closed (and its line ended) even when a phase raises.
        with tqdm(total=total, unit="step", disable=not (main and t.progress_bar), dynamic_ncols=True) as progress:
            for epoch in range(t.epochs):
                if self.step >= total or best.should_stop:
                    break
                self.train_data.set_epoch(epoch)
                batches = iter(self.train_data)
                left = self.steps_per_epoch[epoch]
                while left > 0 and self.step < total and not best.should_stop:
                    n = min(left, t.eval_every or left, total - self.step)
                    self.train_steps(itertools.islice(batches, n), progress)
                    left -= n
                    valid = self.evaluate("valid")
                    self.log.record("valid", self.step, epoch=epoch, **valid)
                    if main:
                        progress.write(f"step {self.step}: valid " + _format(valid))
                    self.lr.after_eval(headline(valid)[1])
                    if best.update(valid, self.step) and t.keep_best:
                        # On the host: a second copy of the tables must not take device memory.
                        best_weights = {k: v.detach().to("cpu", copy=True) for k, v in local_state_tensors(self.model).items()}
                    if best.should_stop and main:
                        progress.write(f"early stop at step {self.step}: no better valid {headline(valid)[0]} "
                                       f"for {best.evals_since_best} evaluations (best at step {best.step})")
        tested_step = self.step
        if best_weights and best.step != self.step:
            for key, tensor in local_state_tensors(self.model).items():
                tensor.detach().copy_(best_weights[key])
            tested_step = best.step
            if main:
                print(f"test with the weights of step {best.step} (best valid {headline(best.metrics)[0]})")
        test = self.evaluate("test")
        self.log.record("test", tested_step, **test)

        summary = {
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "model": cfg.model.name,
            "dataset": str(cfg.data.path),
            "steps": self.step,
            "epochs": t.epochs,
            "global_batch_size": self.global_batch,
            "train_time_s": round(self.train_time, 2),
            "samples_per_s": round(self.step * self.global_batch / max(self.train_time, 1e-9), 1),
            "valid": valid,
            "test": test,
            "test_weights_step": tested_step,
            "best_valid": best.metrics,
            "best_valid_step": best.step,
            "stopped_early": best.should_stop,
            "most_popular": self.most_popular,
            "oracle_auc": self.schema.splits["test"].oracle_auc,
            "valid_oracle_auc": self.schema.splits["valid"].oracle_auc,
            "sharding_plan": plan_text.splitlines()[1:],
        }
        self.log.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
        self.log.close()
        if main:
            oracle = f" (oracle auc {summary['oracle_auc']:.4f})" if summary["oracle_auc"] else ""
            print(f"test {_format(test)}{oracle} | valid {_format(valid)} | {summary['samples_per_s']:,.0f} samples/s "
                  f"| {self.step} steps | summary: {self.log.dir / 'summary.json'}")
        return summary


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != "ctr")
