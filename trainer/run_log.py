"""What a run leaves behind in its run directory (rank 0 writes; other ranks hold a no-op log).

config.toml     the resolved config (reload it with --config to repeat the run)
plan.txt        the sharding plan
metrics.jsonl   one JSON record per log/eval event
summary.json    final figures (written atomically at the end)
tb/             TensorBoard curves
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic


class RunLog:
    def __init__(
        self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard drops the events a failed attempt
        wrote from there on."""
        self.dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (self.dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=purge_step)

    def write_file(self, name: str, text: str) -> None:
        if self.enabled:
            write_text_atomic(self.dir / name, text)

    def record(self, phase: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"time": round(time.time(), 3), "phase": phase, "step": step, **values}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._metrics.close()
            if self._tb is not None:
                self._tb.close()
