"""Reading a run directory for the report: metrics.jsonl, summary.json and `recsys evaluate`'s
RUN_DIR/eval/<split>/; shared by the report's sections and its plots."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.headline import headline


class ReportError(Exception):
    """A run directory no report can be made from; the message is the error line."""


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any]
    records: dict[str, list[dict[str, Any]]]  # phase -> records in step order, one per step

    def series(self, phase: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the `phase` records that hold a number under `key`."""
        points = [(r["step"], r[key]) for r in self.records.get(phase, []) if isinstance(r.get(key), (int, float))]
        return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)

    @property
    def headline(self) -> str | None:
        """The metric that decides "better": as summary.json names it; for a run still training
        (or one from before summary.json named it), the first metric a validation reports, which
        is where the trainer puts its headline."""
        named = (self.summary.get("headline") or {}).get("metric")
        if named:
            return named
        for metrics in [
            *(r for r in self.records.get("valid", [])),
            self.summary.get("valid"),
            self.summary.get("test"),
        ]:
            names = [
                k
                for k, v in (metrics or {}).items()
                if k not in ("time", "phase", "step", "epoch") and isinstance(v, (int, float))
            ]
            if names:
                return names[0]
        return None

    @property
    def test(self) -> tuple[dict[str, Any], int | None]:
        """The test metrics and the step of the weights tested (summary first, else the log)."""
        tests = self.records.get("test", [])
        metrics = self.summary.get("test") or (
            {k: v for k, v in tests[-1].items() if k not in ("time", "phase", "step")} if tests else {}
        )
        step = self.summary.get("test_weights_step", tests[-1]["step"] if tests else None)
        return metrics, step

    @property
    def resume_steps(self) -> list[int]:
        return [r["step"] for r in self.records.get("resume", [])]


def read_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl by phase; a torn last line (a crash mid-write) is skipped, and a step logged
    twice (an older run's failed attempt) keeps its latest record."""
    by_phase: dict[str, dict[int, dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "phase" in record:
            by_phase.setdefault(record["phase"], {})[record["step"]] = record
    return {phase: [steps[s] for s in sorted(steps)] for phase, steps in by_phase.items()}


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics.exists() and not summary.exists():
        raise ReportError(
            f"{run_dir} holds neither metrics.jsonl nor summary.json: not a run directory (the trainer's --run-dir)"
        )
    try:
        loaded = json.loads(summary.read_text()) if summary.exists() else {}
    except json.JSONDecodeError as e:
        raise ReportError(f"{summary} is not valid JSON ({e})") from e
    return Run(run_dir, loaded if isinstance(loaded, dict) else {}, read_records(metrics) if metrics.exists() else {})


@dataclass
class Evaluation:
    """One split's `recsys evaluate` output: RUN_DIR/eval/<split>/."""

    split: str
    metrics: dict[str, Any]
    predictions: Path | None


def load_evaluations(run_dir: Path) -> tuple[list[Evaluation], list[str]]:
    """The evaluations found, and a note for each one that could not be read."""
    found, notes = [], []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            notes.append(f"Skipped {path}: not valid JSON ({e}).")
            continue
        predictions = path.parent / "predictions.parquet"
        found.append(Evaluation(path.parent.name, metrics, predictions if predictions.exists() else None))
    return found, notes


def run_title(run: Run) -> str:
    s = run.summary
    dataset = Path(str(s["dataset"])).name if s.get("dataset") else None
    return " on ".join(str(x) for x in (s.get("model"), dataset) if x) or run.dir.name


def eval_headline(evaluation: Evaluation) -> str:
    """The evaluation's headline (metrics.json names it; older ones: the task's)."""
    return evaluation.metrics.get("headline") or headline(evaluation.metrics.get("task", "binary")).name


def number(value: Any) -> float:
    """A metric value as a float; null (e.g. AUC of a one-class segment) becomes NaN."""
    return float(value) if isinstance(value, (int, float)) else math.nan
