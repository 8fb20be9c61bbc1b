"""The training loop: build -> [resume] -> (train phase -> validate -> checkpoint)* -> test -> summary.

A phase hands the train pipeline an iterator that ends exactly at the phase boundary
(`islice`), so the pipeline drains the batches it buffered ahead before the phase returns: no
batch of one phase is ever consumed by another, and the same pipeline serves training and
evaluation (in eval mode it runs forward only).

Phases also end at checkpoint steps, so a checkpoint always sees a drained pipeline. A checkpoint
records the epoch and how many of its batches were trained; a resumed run skips exactly those
(the epoch's order is a function of seed and epoch), restores the RNG states after opening the
epoch's loader, and from there repeats the uninterrupted run bit for bit (on CPU).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from data_pipeline.batch import Batch
from data_pipeline.reader import ParquetBatches, RankLoader
from data_pipeline.schema import DataError, DatasetSchema, check_files
from models import build_model
from trainer.catalogue import CatalogueRetrieval, supports_retrieval
from trainer.checkpoint import (
    Checkpointer,
    Resume,
    committed,
    fault,
    find_init,
    lr_state,
    set_lr_state,
    set_rng_state,
    step_dir_name,
    truncate_records,
)
from trainer.config import Config
from trainer.distributed import DistEnv, describe_plan, local_state_tensors, plan_with_estimate, shard_model
from trainer.metrics import BestValidation, headline, task_metrics
from trainer.observe import StepProfiler, TableCoverage, memory_per_rank, memory_record
from trainer.optim import LearningRates, apply_sparse_optimizer, build_optimizer
from trainer.run_log import RunLog

SPLITS = ("train", "valid", "test")


def preflight(cfg: Config) -> DatasetSchema:
    """Everything checkable before any process group exists: dataset, files, columns, types."""
    schema = DatasetSchema.load(cfg.data.path)
    for split in SPLITS:
        check_files(schema, split)
    return schema


def train_loader(cfg: Config, env: DistEnv, schema: DatasetSchema) -> RankLoader:
    """This rank's share of the train split: shuffled, full batches only (pinned on CUDA)."""
    data = cfg.data
    return RankLoader(
        ParquetBatches(
            schema,
            "train",
            data.batch_size,
            env.rank,
            env.world_size,
            shuffle=data.shuffle,
            num_workers=data.num_workers,
            drop_last=True,
            seed=cfg.training.seed,
            shuffle_buffer_rows=data.shuffle_buffer_rows,
        ),
        env.device.type == "cuda",
    )


def eval_loader(cfg: Config, env: DistEnv, schema: DatasetSchema, split: str) -> RankLoader:
    """This rank's share of `split` in file order, every row (the last batch padded)."""
    return RankLoader(
        ParquetBatches(
            schema,
            split,
            cfg.data.eval_batch_size,
            env.rank,
            env.world_size,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            drop_last=False,
            seed=cfg.training.seed,
        ),
        env.device.type == "cuda",
    )


def build_sharded(
    cfg: Config, env: DistEnv, schema: DatasetSchema
) -> tuple[DistributedModelParallel, CombinedOptimizer, ShardingPlan, list[dict[str, float]] | None]:
    """The model as it trains: built with its tables on `meta`, the sparse optimizer fused into
    them, planned, sharded (DMP), and the dense optimizer combined with the fused one. Returns
    (model, optimizer, plan, the planner's memory estimate per rank). One path, so the trainer
    and the benchmarks' minimal loop train the same thing."""
    model = build_model(cfg.model, schema, dense_device=env.device, sparse_device=torch.device("meta"))
    opt = cfg.optimizer
    apply_sparse_optimizer(model, opt.sparse, opt.sparse_lr, opt.eps, opt.table_lrs())
    plan, estimate = plan_with_estimate(model, env, cfg.data.batch_size, cfg.sharding)
    sharded = shard_model(model, env, plan)
    optimizer = build_optimizer(sharded, opt.dense, opt.dense_lr, opt.eps, opt.weight_decay, opt.grad_clip_norm)
    return sharded, optimizer, plan, estimate


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, schema: DatasetSchema, resume: Resume | None = None) -> None:
        """`resume`: the checkpoint to continue from (`trainer.checkpoint.find_resume`)."""
        self.cfg, self.env, self.schema, self.resume = cfg, env, schema, resume
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        torch.manual_seed(cfg.training.seed)

        data = cfg.data
        self.train_data = train_loader(cfg, env, schema)
        self.eval_data = {split: eval_loader(cfg, env, schema, split) for split in ("valid", "test")}
        if len(self.train_data) == 0:
            raise DataError(
                f"split 'train' yields no full batch of {data.batch_size} rows on some rank: "
                f"{len(self.train_data.dataset.row_groups)} row groups for {env.world_size} ranks x "
                f"{self.train_data.dataset.shares} workers; lower data.batch_size or write smaller row groups"
            )

        opt = cfg.optimizer
        self.model, self.optimizer, self.plan, self.memory_estimate = build_sharded(cfg, env, schema)
        pipeline = TrainPipelineSparseDist if cfg.training.pipelined else TrainPipelineBase
        forward = self._bf16_forward if cfg.training.mixed_precision == "bf16" else None
        self.pipeline = pipeline(self.model, self.optimizer, env.device, custom_model_fwd=forward)

        self.towers = self.model.module.model  # the model inside the loss wrapper
        self.retrieval = None
        if cfg.training.top_k and hasattr(self.towers, "encode") and supports_retrieval(schema):
            self.retrieval = CatalogueRetrieval(
                schema,
                self.towers.user_id,
                self.towers.item_id,
                cfg.training.top_k,
                env.rank,
                env.world_size,
                env.device,
                data.eval_batch_size,
            )
        self.most_popular: dict[str, dict[str, float]] = {}  # split -> the baseline's retrieval metrics

        self.checkpoints = Checkpointer(cfg, env, self.model, self.optimizer, schema)
        self.profiler = StepProfiler(cfg.training.profile_steps, Path(cfg.run_dir) / "profile", env.rank, env.device)
        self.memory = memory_per_rank(env.device)  # [rank, (peak host RSS, peak device) GB], updated as it trains
        self.tables = TableCoverage(schema, cfg.training.table_stats_max_rows, env.device)
        self.table_stats: dict[str, float] = {}
        self.dropped_records = 0
        if resume is not None and env.is_main:  # records of a failed attempt after the checkpoint go
            self.dropped_records = truncate_records(
                Path(cfg.run_dir) / "metrics.jsonl", resume.meta["train_state"]["metrics_bytes"]
            )
        self.log = RunLog(
            cfg.run_dir,
            enabled=env.is_main,
            purge_step=resume.meta["train_state"]["step"] + 1 if resume is not None else None,
        )
        self.step = 0
        self.saved_step = -1  # the step of the last checkpoint this run saved or loaded
        self.valid_step: int | None = None
        self.train_time = 0.0
        self.steps_per_epoch = []
        for epoch in range(cfg.training.epochs):
            self.train_data.set_epoch(epoch)
            self.steps_per_epoch.append(len(self.train_data))
        every_step = sum(self.steps_per_epoch)
        self.total_steps = min(every_step, cfg.training.max_steps or every_step)
        self.higher_is_better = schema.task == "binary"  # the headline metric: auc up, rmse down
        self.lr = LearningRates(
            self.optimizer,
            self.total_steps,
            opt.lr_schedule,
            opt.warmup_steps,
            opt.min_lr_ratio,
            opt.plateau_factor,
            opt.plateau_patience,
            self.higher_is_better,
        )

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
            self.profiler.before_step(self.step + 1)
            try:
                loss, *_ = self.pipeline.progress(batches)
            except StopIteration:
                break
            self.step += 1
            note = self.profiler.after_step(self.step)
            if note and self.env.is_main:
                progress.write(note)
            fault("kill", self.step, self.env.rank)
            self.lr.after_step()
            loss_sum += torch.stack([loss.detach().float(), torch.ones((), device=loss.device)])
            progress.update(1)
            if self.step % every == 0:
                dist.all_reduce(loss_sum)  # mean over ranks; also syncs the device before timing
                now = time.perf_counter()
                rate = loss_sum[1].item() / self.env.world_size * self.global_batch / (now - last)
                mean_loss = (loss_sum[0] / loss_sum[1]).item()
                self.log.record("train", self.step, loss=mean_loss, samples_per_s=rate, lr=self.lr.current())
                self.memory = memory_per_rank(self.env.device)
                self.log.record("memory", self.step, **memory_record(self.memory))
                progress.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}")
                loss_sum.zero_()
                last = now
        self.train_time += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Score every row of `split` once (ranks pad to equal batch counts; padding is not scored)."""
        self.model.eval()
        metrics = task_metrics(
            self.schema.task, self.env.device, self.schema.label_range, self.cfg.training.auroc_thresholds
        )
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
            retrieved, self.most_popular[split] = self.retrieval.evaluate(
                split, lambda b: self.towers.encode(b.dense, b.sparse)
            )
            results = {**retrieved, **results}  # first: the headline metric
        self.model.train()
        return results

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.env.world_size

    # ---- checkpoints ------------------------------------------------------------------------
    def _train_state(self, epoch: int, position: int, valid: dict, best: BestValidation) -> dict:
        """Everything besides model and optimizer tensors that the run needs to continue exactly."""
        metrics = Path(self.cfg.run_dir) / "metrics.jsonl"
        complete = (
            self.step >= self.total_steps
            or best.should_stop
            or (epoch == self.cfg.training.epochs - 1 and position >= self.steps_per_epoch[epoch])
        )
        return {
            "step": self.step,
            "epoch": epoch,
            "epoch_batches": position,
            "complete": complete,
            "world_size": self.env.world_size,
            "batch_size": self.cfg.data.batch_size,
            "num_workers": self.train_data.dataset.num_workers,
            "seed": self.cfg.training.seed,
            "lr": lr_state(self.lr),
            "valid": valid,
            "valid_step": self.valid_step,
            "best": {"metrics": best.metrics, "step": best.step, "evals_since_best": best.evals_since_best},
            "train_time": self.train_time,
            "most_popular": self.most_popular,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
        }

    def _save(self, epoch: int, position: int, valid: dict, best: BestValidation) -> None:
        if not self.cfg.checkpoint.enabled or self.saved_step == self.step:
            return
        keep = {best.step} if self.cfg.checkpoint.keep_best and best.step is not None else set()
        self.checkpoints.save(self.step, self._train_state(epoch, position, valid, best), keep)
        self.saved_step = self.step

    def _restore(self, best: BestValidation) -> tuple[int, int, dict, dict | None]:
        """Load `self.resume`; returns (epoch, batches of it already trained, last validation
        metrics, this rank's RNG states or None)."""
        assert self.resume is not None
        start = time.perf_counter()
        state, notes = self.checkpoints.load(self.resume)
        self.step, self.saved_step = state["step"], state["step"]
        set_lr_state(self.lr, state["lr"])
        best.metrics, best.step, best.evals_since_best = (
            state["best"]["metrics"],
            state["best"]["step"],
            state["best"]["evals_since_best"],
        )
        self.train_time, self.most_popular, self.valid_step = (
            state["train_time"],
            state["most_popular"],
            state["valid_step"],
        )
        epoch, position = state["epoch"], state["epoch_batches"]
        # 0 and 1 workers read the same order (one share of the rank's row groups)
        same_order = (state["world_size"], state["batch_size"], max(state["num_workers"], 1), state["seed"]) == (
            self.env.world_size,
            self.cfg.data.batch_size,
            self.train_data.dataset.shares,
            self.cfg.training.seed,
        )
        if not same_order:  # another data order: skip the same share of the epoch's rows
            rows = position * state["batch_size"] * state["world_size"]
            position = min(
                rows // self.global_batch, self.steps_per_epoch[epoch] if epoch < len(self.steps_per_epoch) else 0
            )
            notes.append(
                "world size, batch size, loader workers or seed changed: the data order differs from the "
                f"original run's; resuming epoch {epoch} at batch {position} (the same share of its rows)"
            )
        if epoch < len(self.steps_per_epoch) and position >= self.steps_per_epoch[epoch]:
            epoch, position = epoch + 1, 0
        self.log.record(
            "resume",
            self.step,
            checkpoint=str(self.resume.path),
            epoch=epoch,
            epoch_batches=position,
            attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            dropped_records=self.dropped_records,
        )
        if self.env.is_main:
            print(
                f"resumed from {self.resume.path} (step {self.step}, epoch {epoch}, batch {position} of it): "
                f"checked in {self.resume.seconds:.2f} s, loaded in {time.perf_counter() - start:.2f} s",
                flush=True,
            )
            if state["complete"]:
                print(
                    "  note: the checkpoint is the end of training: nothing is left to train, only the test split "
                    "(a new --run-dir, or --checkpoint.dir, trains afresh)",
                    flush=True,
                )
            for line in [*(f"changed since the checkpoint: {c}" for c in self.resume.changes), *notes]:
                print(f"  note: {line}", flush=True)
        return epoch, position, state["valid"], state.get("rng") if same_order else None

    def _test_weights(self, best: BestValidation, best_weights: dict[str, torch.Tensor]) -> int:
        """With training.keep_best: put the best validation's weights in the model (from memory, or
        from the best checkpoint after a restart); returns the step of the weights tested."""
        if not self.cfg.training.keep_best or best.step is None or best.step == self.step:
            return self.step
        if best_weights:
            for key, tensor in local_state_tensors(self.model).items():
                tensor.detach().copy_(best_weights[key])
        else:
            path = self.checkpoints.root / step_dir_name(best.step)
            if path not in committed(self.checkpoints.root):
                if self.env.is_main:
                    print(
                        f"warning: the weights of the best validation (step {best.step}) were neither kept in "
                        f"memory nor in a checkpoint (checkpoint.keep_best); testing the last weights"
                    )
                return self.step
            self.checkpoints.load_model(path)
        if self.env.is_main:
            print(f"test with the weights of step {best.step} (best valid {headline(best.metrics)[0]})")
        return best.step

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t, ck = self.cfg, self.cfg.training, self.cfg.checkpoint
        main = self.env.is_main
        plan_text = describe_plan(self.plan)
        if main:
            print(
                f"world_size {self.env.world_size} on {self.env.device.type} ({self.env.backend}); "
                f"model {cfg.model.name}; global batch {self.global_batch}; loader workers per rank "
                f"{self.train_data.dataset.num_workers}; "
                f"{torch.get_num_threads()} intra-op threads per rank"
            )
            print("sharding plan:\n" + plan_text, flush=True)
            if self.memory_estimate:
                print(
                    "planner's memory estimate per rank (GB, device/host): "
                    + ", ".join(
                        f"{r}: {e['hbm_gb']:.3f}/{e['ddr_gb']:.3f}" for r, e in enumerate(self.memory_estimate)
                    ),
                    flush=True,
                )
        self.log.write_file("config.toml", cfg.to_toml())
        self.log.write_file("plan.txt", plan_text + "\n")

        total = self.total_steps
        valid: dict[str, float] = {}
        best = BestValidation(self.higher_is_better, t.early_stopping_patience)
        best_weights: dict[str, torch.Tensor] = {}
        self.checkpoints.cleanup()
        start_epoch, start_position, rng = 0, 0, None
        if self.resume is not None:
            start_epoch, start_position, valid, rng = self._restore(best)
        elif ck.init_from:
            report = self.checkpoints.init_from(find_init(cfg, self.env))
            if main:
                print(report, flush=True)
        self.position = (start_epoch, start_position)
        stopped = False
        # `with`: the bar is closed (and its line ended) even when a phase raises.
        with tqdm(
            total=total, initial=self.step, unit="step", disable=not (main and t.progress_bar), dynamic_ncols=True
        ) as progress:
            for epoch in range(start_epoch, t.epochs):
                if self.step >= total or best.should_stop or stopped:
                    break
                self.train_data.set_epoch(epoch)
                # The RNG states saved mid-epoch come from after the loader was opened (which draws from
                # torch's generator); those saved at an epoch's end, from before the next one's.
                if epoch == start_epoch and rng is not None and not start_position:
                    set_rng_state(rng)
                batches = iter(self.train_data)
                position = 0
                if epoch == start_epoch and start_position:
                    skip_start = time.perf_counter()
                    collections.deque(itertools.islice(batches, start_position), maxlen=0)  # read and drop
                    position = start_position
                    if main:
                        print(
                            f"skipped the {start_position} batches of epoch {epoch} trained before the checkpoint in "
                            f"{time.perf_counter() - skip_start:.2f} s",
                            flush=True,
                        )
                    if rng is not None:
                        set_rng_state(rng)
                size = self.steps_per_epoch[epoch]
                while position < size and self.step < total and not best.should_stop:
                    n = min(size - position, total - self.step)
                    if t.eval_every:
                        n = min(n, t.eval_every - position % t.eval_every)
                    if ck.enabled and ck.every_steps:
                        n = min(n, ck.every_steps - self.step % ck.every_steps)
                    if t.stop_at_step > self.step:
                        n = min(n, t.stop_at_step - self.step)
                    self.train_steps(self.tables.observe(itertools.islice(batches, n)), progress)
                    position += n
                    self.position = (epoch, position)
                    improved = False
                    if position == size or self.step == total or (t.eval_every and position % t.eval_every == 0):
                        valid = self.evaluate("valid")
                        self.valid_step = self.step
                        self.log.record("valid", self.step, epoch=epoch, **valid)
                        if self.tables:
                            self.table_stats = self.tables.report()
                            self.log.record("tables", self.step, **self.table_stats)
                        if main:
                            progress.write(f"step {self.step}: valid " + _format(valid))
                        self.lr.after_eval(headline(valid)[1])
                        improved = best.update(valid, self.step)
                        if improved and t.keep_best:
                            # On the host: a second copy of the tables must not take device memory.
                            best_weights = {
                                k: v.detach().to("cpu", copy=True) for k, v in local_state_tensors(self.model).items()
                            }
                        if best.should_stop and main:
                            progress.write(
                                f"early stop at step {self.step}: no better valid {headline(valid)[0]} "
                                f"for {best.evals_since_best} evaluations (best at step {best.step})"
                            )
                    stopped = self.step == t.stop_at_step
                    if (ck.every_steps and self.step % ck.every_steps == 0) or (improved and ck.keep_best) or stopped:
                        self._save(epoch, position, valid, best)
                    if stopped:
                        break
        if stopped:
            self.checkpoints.wait()
            self.log.close()
            if main:
                where = (
                    f"; checkpoint {self.checkpoints.root / step_dir_name(self.step)}"
                    if ck.enabled
                    else " (checkpoints are off)"
                )
                print(
                    f"stopped at step {self.step} (training.stop_at_step){where}; "
                    "run the same command again to continue"
                )
            return {"stopped_at_step": self.step}
        self._save(*self.position, valid, best)  # the end (unless the last step already saved one)
        self.checkpoints.wait()  # committed before the test split (which may load the best) and the summary

        tested_step = self._test_weights(best, best_weights)
        test = self.evaluate("test")
        self.memory = memory_per_rank(self.env.device)  # peaks include the evaluations
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
            "planner_estimate_per_rank": self.memory_estimate,
            "table_coverage": {
                k.removesuffix("_coverage"): v for k, v in self.table_stats.items() if k.endswith("_coverage")
            },
            "peak_rss_gb_per_rank": [round(x, 3) for x in self.memory[:, 0].tolist()],
            "device_gb_per_rank": [round(x, 3) for x in self.memory[:, 1].tolist()],
            "resumed_from": str(self.resume.path) if self.resume is not None else None,
            "checkpoints": {
                "dir": str(self.checkpoints.root),
                "saved": self.checkpoints.saves,
                "save_s": round(self.checkpoints.save_seconds, 3),
                "stall_s": round(self.checkpoints.stall_seconds, 3),
                "bytes": self.checkpoints.last_bytes,
            },
        }
        self.log.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
        self.log.close()
        if main:
            oracle = f" (oracle auc {summary['oracle_auc']:.4f})" if summary["oracle_auc"] else ""
            print(
                f"test {_format(test)}{oracle} | valid {_format(valid)} | {summary['samples_per_s']:,.0f} samples/s "
                f"| {self.step} steps | summary: {self.log.dir / 'summary.json'}"
            )
        return summary


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != "ctr")
