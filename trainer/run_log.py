"""What a run leaves behind in its run directory (rank 0 writes; other ranks hold a no-op log).

    config.toml     the resolved config (reload it with --config to repeat the run)
    plan.txt        the sharding plan
    metrics.jsonl   one JSON record per log/eval event
    summary.json    final figures (written atomically at the end)
    tb/             TensorBoard curves

The log is a Stateful part of a checkpoint: its state is how far metrics.jsonl had got. Loading it
cuts the file back there (the records a failed attempt wrote after the checkpoint go) and tells
TensorBoard to drop that attempt's later events.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"


class RunLog:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.last_step = 0
        """The step of the latest record."""
        self.dropped_records = 0
        """Records of a failed attempt cut from metrics.jsonl by `load_state_dict`."""
        self._purge_step: int | None = None
        self._metrics = None
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    def write_file(self, name: str, text: str) -> None:
        if self.enabled:
            write_text_atomic(self.dir / name, text)

    def record(self, phase: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        if self._metrics is None:  # opened at the first record, after any load_state_dict
            self._metrics = self.metrics_path.open("a")
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=self._purge_step)
        self.last_step = step
        self._metrics.write(json.dumps({"time": round(time.time(), 3), "phase": phase, "step": step, **values}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def state_dict(self) -> dict[str, int]:
        size = self.metrics_path.stat().st_size if self.enabled and self.metrics_path.is_file() else 0
        return {"metrics_bytes": size, "step": self.last_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Cut metrics.jsonl back to its size at the checkpoint; TensorBoard drops the events from
        the step after its last record on."""
        self.last_step = state["step"]
        self._purge_step = state["step"] + 1
        if not self.enabled or not self.metrics_path.is_file():
            return
        if self._metrics is not None:
            raise RuntimeError("RunLog.load_state_dict after the first record")
        if self.metrics_path.stat().st_size > state["metrics_bytes"]:
            with self.metrics_path.open("rb+") as f:
                f.seek(state["metrics_bytes"])
                self.dropped_records = f.read().count(b"\n")
                f.truncate(state["metrics_bytes"])

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
