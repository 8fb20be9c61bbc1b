"""What a run reports about itself besides metrics: memory per rank, how much of each embedding
table training touches, and an optional profiler trace of a few training steps."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch
from data_pipeline.schema import DatasetSchema


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return rss / 1e6 if sys.platform != "darwin" else rss / 1e9  # bytes on macOS


def memory_per_rank(device: torch.device) -> torch.Tensor:
    """[world_size, 2]: each rank's peak host RSS and peak device memory allocated, in GB (a
    collective: every rank calls it)."""
    used = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    mine = torch.tensor([[peak_rss_gb(), used]], dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return mine.cpu()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return torch.cat(everyone).cpu()


def memory_record(per_rank: torch.Tensor) -> dict[str, float]:
    """The max and min over ranks (a rank far above the others points to an unbalanced plan)."""
    rss, used = per_rank[:, 0], per_rank[:, 1]
    record = {"peak_rss_gb_max": rss.max().item(), "peak_rss_gb_min": rss.min().item()}
    if used.max() > 0:
        record.update(device_gb_max=used.max().item(), device_gb_min=used.min().item())
    return record


class StepProfiler:
    """torch.profiler over training steps [first, last] (`training.profile_steps`): one Chrome /
    TensorBoard trace per rank in <run_dir>/profile, opened in TensorBoard's profiler tab or
    chrome://tracing / Perfetto."""

    def __init__(self, steps: list[int], out: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[-1]) if steps else (0, -1)
        self.out, self.rank, self.device = out, rank, device
        self.profiler: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.out.mkdir(parents=True, exist_ok=True)
            handler = torch.profiler.tensorboard_trace_handler(str(self.out), worker_name=f"rank{self.rank}")
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, on_trace_ready=handler)
            self.profiler.start()

    def after_step(self, step: int) -> str | None:
        """Call with the number of the step just run; returns a note when a trace was written."""
        if self.profiler is None:
            return None
        self.profiler.step()
        if step < self.last:
            return None
        self.profiler.stop()
        self.profiler = None
        return f"profile of steps {self.first}-{self.last} written to {self.out} (one trace per rank)"


class TableCoverage:
    """How much of each embedding table training touches: per sparse feature, the share of its
    table's rows that the train batches have looked up at least once (union over ranks), and the
    share of the lookups since the last report that went to a row seen before (the reuse a row
    cache, e.g. `fused_uvm_caching`, can exploit; under 1 while new rows keep appearing).

    One bool per row on every rank, so only tables of at most `max_rows` rows are tracked; the
    tracked tables share one bitmap, so a batch costs a few vectorised ops whatever the number of
    features. Counted from the batches this process trained: a resumed run starts counting afresh."""

    def __init__(self, schema: DatasetSchema, max_rows: int, device: torch.device) -> None:
        """`device`: where the report's all-reduce runs (the run's device: NCCL reduces CUDA tensors only)."""
        self.device = device
        tracked = [f for f in schema.sparse if 0 < f.num_embeddings <= max_rows]
        self.names = [f.name for f in tracked]
        self.index = {name: j for j, name in enumerate(self.names)}
        sizes = np.array([f.num_embeddings for f in tracked], dtype=np.int64)
        self.ends = sizes.cumsum()  # feature j's rows are bitmap[ends[j] - sizes[j] : ends[j]]
        self.starts = self.ends - sizes
        self.seen = np.zeros(int(sizes.sum()), dtype=bool)
        self.lookups = np.zeros((2, len(tracked)))  # (lookups, to a seen row) since report
        self._keys: tuple | None = None  # the last KJT key order -> (tracked index, bitmap start, all tracked)

    def __bool__(self) -> bool:
        return bool(self.names)

    def _key_maps(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray, bool]:
        if self._keys is None or self._keys[0] != keys:
            index = np.array([self.index.get(k, -1) for k in keys], dtype=np.int64)
            start = np.where(index >= 0, self.starts[np.maximum(index, 0)], 0)
            self._keys = (keys, index, start, bool((index >= 0).all()))
        return self._keys[1:]

    def observe(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """`batches`, unchanged, after marking the rows each one looks up."""
        for batch in batches:
            if self.names:
                self._mark(batch.sparse.values().cpu().numpy(), batch.sparse.keys(), batch.sparse.length_per_key())
            yield batch

    def _mark(self, values: np.ndarray, keys: list[str], lengths: list[int]) -> None:
        # numpy, not torch: a batch is a few thousand ids, where torch's per-op overhead, and its
        # OpenMP threads fighting the training ranks for cores, cost 2-40x more (BENCHMARKS.md)
        index, start, all_tracked = self._key_maps(keys)
        feature = np.repeat(index, lengths)
        rows = values + np.repeat(start, lengths)  # positions in the shared bitmap
        if not all_tracked:
            keep = feature >= 0
            feature, rows = feature[keep], rows[keep]
        count = len(self.names)
        new_rows = np.unique(rows[~self.seen[rows]])  # a repeat within the batch is a reuse too
        new = np.bincount(np.searchsorted(self.ends, new_rows, side="right"), minlength=count)
        lookups = np.bincount(feature, minlength=count)
        self.lookups[0] += lookups
        self.lookups[1] += lookups - new
        self.seen[rows] = True

    def report(self) -> dict[str, float]:
        """{feature_coverage, feature_reuse} since the last report (a collective: every rank calls it)."""
        if not self.names:
            return {}
        seen = torch.from_numpy(self.seen).to(self.device, torch.uint8)
        lookups = torch.from_numpy(self.lookups).to(self.device, copy=True)
        if dist.is_initialized():
            dist.all_reduce(seen, op=dist.ReduceOp.MAX)
            dist.all_reduce(lookups)
        seen, lookups = seen.cpu(), lookups.cpu()
        out = {}
        for j, name in enumerate(self.names):
            start, end = int(self.starts[j]), int(self.ends[j])
            out[f"{name}_coverage"] = seen[start:end].sum().item() / (end - start)
            if lookups[0, j] > 0:
                out[f"{name}_reuse"] = (lookups[1, j] / lookups[0, j]).item()
        self.lookups[:] = 0
        return out
