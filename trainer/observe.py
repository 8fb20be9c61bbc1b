"""What a run reports about itself besides metrics: memory per rank and an optional profiler
trace of a few training steps."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def memory_per_rank(device: torch.device) -> torch.Tensor:
    """[world_size, 2]: each rank's peak host RSS and peak device memory allocated, in GB (a
    collective: every rank calls it)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    rss = rss_kb / 1e6 if sys.platform != "darwin" else rss_kb / 1e9  # bytes on macOS
    used = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    mine = torch.tensor([[rss, used]], dtype=torch.float64, device=device)
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
