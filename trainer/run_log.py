"""What a run leaves behind in its run directory (rank 0 writes; other ranks hold a no-op log).

    config.toml     the resolved config (reload it with --config to repeat the run)
    plan.txt        the sharding plan
    metrics.jsonl   one JSON record per log/eval event
    summary.json    final figures (written atomically at the end)
    tb/             TensorBoard curves (logging.backends; MLflow and W&B: trainer/tracking.py)

The log is a Stateful part of a checkpoint: its state is how far metrics.jsonl had got and the
trackers' run ids. Loading it cuts the file back there (the records a failed attempt wrote after
the checkpoint go), tells TensorBoard to drop that attempt's later events, and has MLflow / W&B go
on in the same run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic
from trainer.tracking import LoggingConfig, Tracker, open_trackers

METRICS_FILE = "metrics.jsonl"


class RunLog:
    def __init__(
        self, run_dir: str | Path, enabled: bool, tracking: LoggingConfig | None = None, params: dict | None = None
    ) -> None:
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.tracking = LoggingConfig() if tracking is None else tracking
        self.params = params or {}
        """The resolved config as `section.key` -> value, for the trackers."""
        self.run_ids: dict[str, str] = {}
        """Each tracker's run id (from a checkpoint when resumed)."""
        self.last_step = 0
        """The step of the latest record."""
        self.dropped_records = 0
        """Records of a failed attempt cut from metrics.jsonl by `load_state_dict`."""
        self._purge_step: int | None = None
        self._metrics = None
        self._trackers: dict[str, Tracker] = {}
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
            self._trackers = open_trackers(self.tracking, self.dir, self.run_ids, self._purge_step)
            self.run_ids = {name: t.run_id for name, t in self._trackers.items() if t.run_id}
            for tracker in self._trackers.values():
                tracker.log_config(self.params)
        self.last_step = step
        self._metrics.write(json.dumps({"time": round(time.time(), 3), "phase": phase, "step": step, **values}) + "\n")
        self._metrics.flush()
        for tracker in self._trackers.values():
            tracker.log(phase, step, values)

    def state_dict(self) -> dict:
        size = self.metrics_path.stat().st_size if self.enabled and self.metrics_path.is_file() else 0
        return {"metrics_bytes": size, "step": self.last_step, "run_ids": dict(self.run_ids)}

    def load_state_dict(self, state: dict) -> None:
        """Cut metrics.jsonl back to its size at the checkpoint; TensorBoard drops the events from
        the step after its last record on; the trackers go on in their runs."""
        self.last_step = state["step"]
        self.run_ids = dict(state.get("run_ids", {}))  # (checkpoints before tracking have none)
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

    def close(self, status: str = "FINISHED") -> None:
        """End the run's records: the run's files to the trackers, and the status (FINISHED,
        KILLED: stopped to be resumed, FAILED). Safe to call twice."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        files = [self.dir / name for name in ("config.toml", "plan.txt", "summary.json")]
        trackers, self._trackers = self._trackers, {}
        for tracker in trackers.values():
            tracker.log_files([f for f in files if f.is_file()])
            tracker.close(status)
