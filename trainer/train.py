"""The training loop: build -> [resume] -> (train phase -> validate -> checkpoint)* -> test -> summary.

A phase hands the train pipeline an iterator that ends exactly at the phase boundary (`islice`),
so the pipeline drains the batches it buffered ahead before the phase returns: no batch of one
phase is ever consumed by another, and the same pipeline serves training and evaluation (in eval
mode it runs forward only). The components decide where phases end: the evaluator when
validation is due, the checkpointer when a save is, `training.stop_at_step`, the epoch's end.

Phases also end at checkpoint steps, so a checkpoint always sees a drained pipeline. A checkpoint
records the epoch and how many of its batches were trained (`TrainState`); a resumed run skips
exactly those (the epoch's order is a function of seed and epoch), restores the RNG states after
opening the epoch's loader, and from there repeats the uninterrupted run bit for bit (on CPU).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data_pipeline.batch import Batch
from data_pipeline.schema import DataError, DatasetSchema, split_digest
from trainer.build import build_sharded, train_loader
from trainer.checkpoint import Checkpointer, Resume, find_init, step_dir_name
from trainer.config import Config, getattr_path, toml_value
from trainer.defaults import as_record, few_steps_warning
from trainer.distributed import DistEnv, describe_plan, local_state_tensors
from trainer.evaluator import Evaluator
from trainer.faults import fault, planned
from trainer.guard import GuardedBasePipeline, GuardedPipeline, NonFiniteSkips, NumericsGuard
from trainer.logs import LOGGER, get_logger
from trainer.numbers import format_metrics
from trainer.observe import StepProfiler, TableCoverage, memory_per_rank, memory_record
from trainer.optim import LearningRates
from trainer.preempt import Preemption
from trainer.run_log import RunLog
from trainer.state import BestValidation, DataOrder, RngState, TrainState

log = get_logger(__name__)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, schema: DatasetSchema, resume: Resume | None = None) -> None:
        """`resume`: the checkpoint to continue from (`trainer.checkpoint.find_resume`)."""
        self.cfg, self.env, self.schema, self.resume = cfg, env, schema, resume
        t, opt = cfg.training, cfg.optimizer
        if t.mixed_precision == "auto":
            raise ValueError("training.mixed_precision auto reaches the Trainer unresolved (trainer.defaults.resolve)")
        if t.threads:
            torch.set_num_threads(t.threads)
        torch.manual_seed(t.seed)

        self.train_data = train_loader(cfg, env, schema)
        if len(self.train_data) == 0:
            raise DataError(
                f"split 'train' yields no full batch of {cfg.data.batch_size} rows on some rank: "
                f"{sum(g.rows for g in self.train_data.dataset.row_groups):,} rows for {env.world_size} ranks x "
                f"{self.train_data.dataset.shares} loader workers; lower data.batch_size or use fewer ranks"
            )
        self.model, self.optimizer, self.plan, self.memory_estimate = build_sharded(cfg, env, schema)
        pipeline = GuardedPipeline if t.pipelined else GuardedBasePipeline
        self.pipeline = pipeline(self.model, self.optimizer, env.device, custom_model_fwd=self._forward)
        self.evaluator = Evaluator(cfg, env, schema, self.model, self.pipeline)

        self.steps_per_epoch = []
        for epoch in range(t.epochs):
            self.train_data.set_epoch(epoch)
            self.steps_per_epoch.append(len(self.train_data))
        every_step = sum(self.steps_per_epoch)
        self.total_steps = min(every_step, t.max_steps or every_step)

        # The run's Stateful parts: what a checkpoint holds besides the tensors.
        data_files = {split: split_digest(schema, split) for split in schema.splits}
        workers = self.train_data.dataset.num_workers
        order = DataOrder(env.world_size, cfg.data.batch_size, workers, t.seed, train_files=data_files["train"])
        self.state = TrainState(order)
        if t.skip_nonfinite_batches:  # asked with the step being trained
            skipped, budget = self.state.skipped_steps, t.skip_nonfinite_batches
            self.pipeline.skips = NonFiniteSkips(budget, skipped, lambda: self.state.step + 1)
        self.best = BestValidation(self.evaluator.headline, t.early_stopping_patience)
        self.lr = LearningRates(
            self.optimizer,
            self.total_steps,
            opt.lr_schedule,
            opt.warmup_steps,
            opt.min_lr_ratio,
            opt.plateau_factor,
            opt.plateau_patience,
            self.evaluator.headline.higher_is_better,
        )
        self.log = RunLog(cfg.run_dir, enabled=env.is_main, tracking=cfg.logging, params=cfg.knobs())
        parts = {"train": self.state, "lr": self.lr, "best": self.best, "run_log": self.log}
        self.checkpoints = Checkpointer(cfg, env, self.model, self.optimizer, schema, parts, data_files)

        self.profiler = StepProfiler(t.profile_steps, Path(cfg.run_dir) / "profile", env.rank, env.device)
        self.memory = memory_per_rank(env.device)  # [rank, (peak host RSS, peak device) GB], updated as it trains
        self.tables = TableCoverage(schema, t.table_stats_max_rows, env.device)
        self.table_stats: dict[str, float] = {}
        self.best_weights: dict[str, torch.Tensor] = {}  # training.keep_best: on the host
        self.guard = NumericsGuard(t.divergence_factor)
        self.preempt = Preemption()

    def _forward(self, batch: Batch):
        """The model's forward; a training step's under bfloat16 autocast with
        training.mixed_precision bf16 (outputs back in fp32 for the loss's backward; the backward
        runs outside autocast, as torch advises). Evaluation scores in fp32, as the exported model
        serves. A training step's loss is NaN where RECSYS_FAULT=nan says (tests)."""
        if self.cfg.training.mixed_precision != "bf16" or not self.model.training:
            loss, outputs = self.model(batch)
        else:
            with torch.autocast(self.env.device.type, dtype=torch.bfloat16):
                loss, outputs = self.model(batch)
            loss, outputs = loss.float(), tuple(t.float() if t.is_floating_point() else t for t in outputs)
        if self.model.training and planned("nan", self.state.step + 1, self.env.rank):
            loss, outputs = loss * math.nan, (outputs[0] * math.nan, *outputs[1:])
        return loss, outputs

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.env.world_size

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps or self.best.should_stop

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end (or to training.stop_at_step, or a preemption signal), test, and return
        the summary (with `exit_code` when the run stopped for a signal)."""
        self.preempt.install()
        status = "FAILED"
        try:
            summary = self._run()
            status = "FINISHED" if "test" in summary else "KILLED"  # KILLED: stopped here, to be resumed
            return summary
        finally:
            self.log.close(status)
            self.preempt.uninstall()

    def _run(self) -> dict:
        t = self.cfg.training
        self._announce()
        self.checkpoints.cleanup()
        rng = self._start()
        # `with`: the bar is closed (and its line ended) even when a phase raises; log lines are
        # written above it while it runs.
        with (
            logging_redirect_tqdm([logging.getLogger(LOGGER)]),
            tqdm(
                total=self.total_steps,
                initial=self.state.step,
                unit="step",
                disable=not (self.env.is_main and t.progress_bar),
                dynamic_ncols=True,
            ) as progress,
        ):
            for epoch in range(self.state.epoch, t.epochs):
                if self.finished:
                    break
                batches, rng = self._open_epoch(epoch, rng), None
                while self.state.epoch_batches < self.steps_per_epoch[epoch] and not self.finished:
                    length = self._phase_length(epoch)
                    phase = self.preempt.batches(self.tables.observe(itertools.islice(batches, length)))
                    trained = self.train_steps(phase, progress)
                    self.state.epoch_batches += trained
                    if self.preempt.agreed and trained < length:  # mid-phase: nothing was due here
                        return self._preempted()
                    improved = self._validate_if_due(epoch, progress)
                    stopping = self.state.step == t.stop_at_step
                    if self.checkpoints.should_save(self.state.step, improved, stopping):
                        self._save()
                    if stopping:
                        return self._stop()
                    if self.preempt.agreed:  # at a boundary: what was due there ran first, as it would have
                        return self._preempted()
        self._save()  # the end (unless the last step already saved one)
        if self.preempt.agreed:
            return self._preempted()
        self.checkpoints.wait()  # committed before the test split (which may load the best) and the summary
        return self._finish()

    def _phase_length(self, epoch: int) -> int:
        """Batches until the next boundary: the epoch's or the run's end, a validation, a
        periodic checkpoint, training.stop_at_step."""
        step, position, stop_at = self.state.step, self.state.epoch_batches, self.cfg.training.stop_at_step
        bounds = [
            self.steps_per_epoch[epoch] - position,
            self.total_steps - step,
            self.evaluator.steps_to_next(position),
            self.checkpoints.steps_to_next_save(step),
            stop_at - step if stop_at > step else None,
        ]
        return min(b for b in bounds if b is not None)

    def train_steps(self, batches: Iterator[Batch], progress: tqdm) -> int:
        """Train until `batches` ends; log loss and throughput every `training.log_every` steps.
        Returns the number of steps trained."""
        self.model.train()
        every = self.cfg.training.log_every
        loss_sum = torch.zeros(2, device=self.env.device)  # (sum of losses, steps) since last log
        unlogged, first = 0, self.state.step
        start = last = time.perf_counter()
        while True:
            self.profiler.before_step(self.state.step + 1)
            try:
                loss, *_ = self.pipeline.progress(batches)
            except StopIteration:
                break
            self.state.step += 1
            step = self.state.step
            skipped = self.pipeline.skips is not None and self.pipeline.skips.now
            if skipped:
                self.log.record("skipped", step, reason="non-finite loss")
            else:
                self.guard.first_step(loss)
            self.preempt.poll()
            note = self.profiler.after_step(step)
            if note and self.env.is_main:
                log.info(note)
            fault("kill", step, self.env.rank)
            self.lr.after_step()
            if not skipped:  # a skipped batch's loss counts in no mean
                loss_sum += torch.stack([loss.detach().float(), torch.ones((), device=loss.device)])
            unlogged += 1
            progress.update(1)
            if step % every == 0:
                dist.all_reduce(loss_sum)  # mean over ranks; also syncs the device before timing
                now = time.perf_counter()
                rate = unlogged * self.global_batch / (now - last)
                if loss_sum[1].item():  # not every step of the interval skipped
                    mean_loss = (loss_sum[0] / loss_sum[1]).item()
                    self.log.record("train", step, loss=mean_loss, samples_per_s=rate, lr=self.lr.current())
                    progress.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}")
                    self.guard.check_loss(step, mean_loss, unlogged)
                self.memory = memory_per_rank(self.env.device)
                self.log.record("memory", step, **memory_record(self.memory))
                loss_sum.zero_()
                unlogged, last = 0, now
        self.state.train_time += time.perf_counter() - start
        if unlogged:  # the phase's tail: checked before anything validates or saves these weights
            dist.all_reduce(loss_sum)
            if loss_sum[1].item():
                self.guard.check_loss(self.state.step, (loss_sum[0] / loss_sum[1]).item(), unlogged, logged=False)
        self.preempt.settle()
        return self.state.step - first

    def _evaluate(self, split: str) -> dict[str, float]:
        metrics, baseline = self.evaluator.evaluate(split)
        if baseline is not None:
            self.state.most_popular[split] = baseline
        return metrics

    def _validate_if_due(self, epoch: int, progress: tqdm) -> bool:
        """Validate when due; True if the result is the best so far."""
        position, step = self.state.epoch_batches, self.state.step
        if not self.evaluator.due(position, self.steps_per_epoch[epoch], step == self.total_steps):
            return False
        valid = self.state.valid = self._evaluate("valid")
        self.state.valid_step = step
        self.log.record("valid", step, epoch=epoch, **valid)
        if self.tables:
            self.table_stats = self.tables.report()
            self.log.record("tables", step, **self.table_stats)
        if self.env.is_main:
            log.info(f"step {step}: valid " + format_metrics(valid))
        name = self.best.headline.name
        self.lr.after_eval(valid[name])
        improved = self.best.update(valid, step)
        if improved and self.cfg.training.keep_best:
            # On the host: a second copy of the tables must not take device memory.
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in local_state_tensors(self.model).items()}
        if self.best.should_stop and self.env.is_main:
            log.info(
                f"early stop at step {step}: no better valid {name} for {self.best.evals_since_best} "
                f"evaluations (best at step {self.best.step})"
            )
        return improved

    # ---- start, checkpoints, end ----------------------------------------------------------------
    def _announce(self) -> None:
        """Print the run's shape and plan; write config.toml and plan.txt."""
        plan_text = describe_plan(self.plan)
        if self.env.is_main:
            log.info(
                f"world_size {self.env.world_size} on {self.env.device.type} ({self.env.backend}); "
                f"model {self.cfg.model.name}; global batch {self.global_batch}; loader workers per rank "
                f"{self.train_data.dataset.num_workers}; "
                f"{torch.get_num_threads()} intra-op threads per rank"
            )
            for key, why in self.cfg.derived.items():
                log.info(f"derived {key} = {toml_value(getattr_path(self.cfg, key))} ({why})")
            warning = few_steps_warning(self.total_steps)
            if warning:
                log.warning(warning)
            log.info("sharding plan:\n" + plan_text)
            if self.memory_estimate:
                estimates = ", ".join(
                    f"{r}: {e['hbm_gb']:.3f}/{e['ddr_gb']:.3f}" for r, e in enumerate(self.memory_estimate)
                )
                log.info(f"planner's memory estimate per rank (GB, device/host): {estimates}")
        self.log.write_file("config.toml", self.cfg.to_toml())
        self.log.write_file("plan.txt", plan_text + "\n")

    def _start(self) -> dict | None:
        """Resume the checkpoint, or load checkpoint.init_from's weights; returns the RNG states
        to restore once the first epoch's loader is open (None: leave them)."""
        if self.resume is not None:
            return self._restore()
        if self.cfg.checkpoint.init_from:
            report = self.checkpoints.init_from(find_init(self.cfg, self.env))
            if self.env.is_main:
                log.info(report)
        return None

    def _restore(self) -> dict | None:
        start = time.perf_counter()
        rng, notes = self.checkpoints.load(self.resume)
        self.guard.last_good = str(self.resume.path)
        notes += [self.best.note] if self.best.note else []
        epoch, position, order_note = self.state.resume_position(self.steps_per_epoch)
        if order_note:  # another data order: the saved RNG states belong to another stream
            notes.append(order_note)
            rng = None
        self.state.epoch, self.state.epoch_batches = epoch, position
        step, path = self.state.step, self.resume.path
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.log.record(
            "resume", step, checkpoint=str(path), epoch=epoch, epoch_batches=position, attempt=attempt,
            dropped_records=self.log.dropped_records,
        )  # fmt: skip
        if self.env.is_main:
            log.info(
                f"resumed from {path} (step {step}, epoch {epoch}, batch {position} of it): checked in "
                f"{self.resume.seconds:.2f} s, loaded in {time.perf_counter() - start:.2f} s"
            )
            if self.state.complete:
                log.info(
                    "  note: the checkpoint is the end of training: nothing is left to train, only the test split "
                    "(a new --run-dir, or --checkpoint.dir, trains afresh)"
                )
            for line in [*(f"changed since the checkpoint: {c}" for c in self.resume.changes), *notes]:
                log.info(f"  note: {line}")
        return rng

    def _open_epoch(self, epoch: int, rng: dict | None) -> Iterator[Batch]:
        """The epoch's batches, past those a resumed run trained before its checkpoint; `rng`
        restored where the uninterrupted run had it: after opening the loader mid-epoch (opening
        draws from torch's generator), before it at an epoch's start."""
        skip = self.state.epoch_batches if epoch == self.state.epoch else 0
        self.state.epoch, self.state.epoch_batches = epoch, skip
        self.train_data.set_epoch(epoch)
        if rng is not None and not skip:
            RngState.load_state_dict(rng)
        batches = iter(self.train_data)
        if skip:
            start = time.perf_counter()
            collections.deque(itertools.islice(batches, skip), maxlen=0)  # read and drop
            if self.env.is_main:
                log.info(
                    f"skipped the {skip} batches of epoch {epoch} trained before the checkpoint in "
                    f"{time.perf_counter() - start:.2f} s"
                )
            if rng is not None:
                RngState.load_state_dict(rng)
        return batches

    def _save(self) -> None:
        s = self.state
        last_epoch = s.epoch == self.cfg.training.epochs - 1
        s.complete = self.finished or (last_epoch and s.epoch_batches >= self.steps_per_epoch[s.epoch])
        keep = {self.best.step} if self.cfg.checkpoint.keep_best and self.best.step is not None else set()
        if self.checkpoints.settings.enabled:
            self.guard.check_weights(self.model, s.step, self.env.device)  # no NaN checkpoint is ever committed
        self.checkpoints.save(s.step, keep)
        if self.checkpoints.settings.enabled:
            self.guard.last_good = str(self.checkpoints.root / step_dir_name(s.step))

    def _stop(self) -> dict:
        """training.stop_at_step: the checkpoint is saved; exit as a pre-empted job would."""
        self.checkpoints.wait()
        if self.env.is_main:
            path = self.checkpoints.path_of(self.state.step)
            where = f"; checkpoint {path}" if path else " (checkpoints are off)"
            log.info(
                f"stopped at step {self.state.step} (training.stop_at_step){where}; "
                "run the same command again to continue"
            )
        return {"stopped_at_step": self.state.step}

    def _preempted(self) -> dict:
        """A signal: the checkpoint of this step (committed before exiting, async or not), then
        exit 128 + the signal's number; the same command resumes."""
        self._save()
        self.checkpoints.wait()
        if self.env.is_main:
            path = self.checkpoints.path_of(self.state.step)
            seconds = time.monotonic() - self.preempt.received_at if self.preempt.received else None
            where = f"checkpoint {path}" if path else "checkpoints are off: nothing was saved"
            when = "signalled on another rank" if seconds is None else f"{seconds:.1f} s after rank 0 got the signal"
            log.info(
                f"preempted ({self.preempt.name}) at step {self.state.step}: {where} ({when}); "
                "run the same command again to continue"
            )
            if seconds is not None and seconds > self.cfg.checkpoint.preempt_grace_s:
                log.warning(
                    f"that is over checkpoint.preempt_grace_s ({self.cfg.checkpoint.preempt_grace_s:g} s): "
                    "a scheduler with that grace period would have killed the job first"
                )
        return {"preempted": self.preempt.name, "exit_code": 128 + self.preempt.agreed}

    def _test_weights(self) -> int:
        """With training.keep_best: put the best validation's weights in the model (from memory, or
        from the best checkpoint after a restart); returns the step of the weights tested."""
        best, step = self.best, self.state.step
        if not self.cfg.training.keep_best or best.step is None or best.step == step:
            return step
        if self.best_weights:
            for key, tensor in local_state_tensors(self.model).items():
                tensor.detach().copy_(self.best_weights[key])
        else:
            path = self.checkpoints.path_of(best.step)
            if path is None:
                if self.env.is_main:
                    log.warning(
                        f"the weights of the best validation (step {best.step}) were neither kept in "
                        f"memory nor in a checkpoint (checkpoint.keep_best); testing the last weights"
                    )
                return step
            self.checkpoints.load_model(path)
        if self.env.is_main:
            log.info(f"test with the weights of step {best.step} (best valid {best.headline.name})")
        return best.step

    def _finish(self) -> dict:
        """Score the test split, write summary.json, print the last line."""
        tested_step = self._test_weights()
        test = self._evaluate("test")
        self.memory = memory_per_rank(self.env.device)  # peaks include the evaluations
        self.log.record("test", tested_step, **test)
        summary = self._summary(test, tested_step)
        self.log.write_file("summary.json", json.dumps(summary, indent=2) + "\n")
        if self.env.is_main:
            oracle = f" (oracle auc {summary['oracle_auc']:.4f})" if summary["oracle_auc"] else ""
            log.info(
                f"test {format_metrics(test)}{oracle} | valid {format_metrics(self.state.valid)} | "
                f"{summary['samples_per_s']:,.0f} samples/s | {self.state.step} steps | "
                f"summary: {self.log.dir / 'summary.json'}"
            )
        return summary

    def _summary(self, test: dict[str, float], tested_step: int) -> dict:
        s, splits, ck = self.state, self.schema.splits, self.checkpoints
        coverage = self.table_stats.items()
        return {
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "model": self.cfg.model.name,
            "dataset": str(self.cfg.data.path),
            "steps": s.step,
            "skipped_steps": s.skipped_steps,
            "epochs": self.cfg.training.epochs,
            "global_batch_size": self.global_batch,
            "derived": as_record(self.cfg, self.cfg.derived),
            "train_time_s": round(s.train_time, 2),
            "samples_per_s": round(s.step * self.global_batch / max(s.train_time, 1e-9), 1),
            "headline": {"metric": self.best.headline.name, "higher_is_better": self.best.headline.higher_is_better},
            "valid": s.valid,
            "test": test,
            "test_weights_step": tested_step,
            "best_valid": self.best.metrics,
            "best_valid_step": self.best.step,
            "stopped_early": self.best.should_stop,
            "most_popular": s.most_popular,
            "oracle_auc": splits["test"].oracle_auc,
            "valid_oracle_auc": splits["valid"].oracle_auc,
            "sharding_plan": describe_plan(self.plan).splitlines()[1:],
            "planner_estimate_per_rank": self.memory_estimate,
            "table_coverage": {k.removesuffix("_coverage"): v for k, v in coverage if k.endswith("_coverage")},
            "peak_rss_gb_per_rank": [round(x, 3) for x in self.memory[:, 0].tolist()],
            "device_gb_per_rank": [round(x, 3) for x in self.memory[:, 1].tolist()],
            "resumed_from": str(self.resume.path) if self.resume is not None else None,
            "checkpoints": {
                "dir": str(ck.root),
                "saved": ck.saves,
                "save_s": round(ck.save_seconds, 3),
                "stall_s": round(ck.stall_seconds, 3),
                "bytes": ck.last_bytes,
            },
        }
