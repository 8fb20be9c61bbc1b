"""Experiment tracking: where a run's records go besides metrics.jsonl (rank 0 only).

    recsys train ... --logging.backends tensorboard mlflow      # MLFLOW_TRACKING_URI names the store
    recsys train ... --logging.backends wandb                   # WANDB_MODE=offline works without a server

Each backend is one small class with the four calls of `Tracker` (torchtune's MetricLoggerInterface
shape): the resolved config once, a record per log/eval event with its step, files at the end, and
the run's status. A tracker's run id is part of the run log's checkpointed state, so a resumed or
restarted job goes on in the same MLflow / W&B run instead of opening a new one. The libraries are
imported only when their backend is chosen (pip install 'recsys-trainer[tracking]').
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from data_pipeline.config import check_choices
from trainer.logs import get_logger

log = get_logger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")


@dataclass
class LoggingConfig:
    backends: list[Literal[BACKENDS]] = field(default_factory=lambda: ["tensorboard"])
    """Where the records of metrics.jsonl also go: tensorboard (<run_dir>/tb), mlflow (the store
    MLFLOW_TRACKING_URI names; a sqlite:///path.db file or a server), wandb (WANDB_* variables;
    WANDB_MODE=offline keeps it local). An empty list: metrics.jsonl only."""
    experiment: str = ""
    """mlflow: the experiment (default: MLFLOW_EXPERIMENT_NAME, else "recsys"); wandb: the
    project (default: WANDB_PROJECT, else "recsys"). The run is named after the run directory."""
    verbose: bool = False
    """Every rank logs at DEBUG (normally rank 0 at INFO, the others at WARNING) and third-party
    warnings the trainer hides are shown (trainer/logs.py). `--verbose` for short."""

    def __post_init__(self) -> None:
        check_choices(self, "logging")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"logging.backends lists a backend twice: {self.backends}")


class Tracker(Protocol):
    run_id: str
    """The backend's id of this run ("" where it has none), kept in checkpoints to resume it."""

    def log_config(self, params: dict[str, Any]) -> None: ...

    def log(self, phase: str, step: int, values: dict[str, float]) -> None: ...

    def log_files(self, paths: list[Path]) -> None: ...

    def close(self, status: str) -> None:
        """status: FINISHED, KILLED (stopped to resume later) or FAILED."""


def numbers(phase: str, values: dict[str, Any]) -> dict[str, float]:
    """A record's numeric values under `phase/key` (the names TensorBoard shows)."""
    return {
        f"{phase}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


class TensorBoardTracker:
    run_id = ""

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log_config(self, params: dict[str, Any]) -> None:
        pass  # config.toml beside tb/ holds it

    def log(self, phase: str, step: int, values: dict[str, float]) -> None:
        for key, value in numbers(phase, values).items():
            self.writer.add_scalar(key, value, step)

    def log_files(self, paths: list[Path]) -> None:
        pass

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker:
    """Through MlflowClient (no fluent global run: the trainer's run is explicit)."""

    def __init__(self, run_dir: Path, experiment: str, run_id: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._entities = mlflow.entities
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else MLflow's default store
        self.resumed = bool(run_id)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "recsys"
            found = self.client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
        self.run_id = run_id
        how = "goes on in" if self.resumed else "logs to"
        log.info(f"mlflow: this run {how} MLflow run {run_id} at {mlflow.get_tracking_uri()}")

    def log_config(self, params: dict[str, Any]) -> None:
        if self.resumed:  # MLflow refuses to change a logged param; the resumed run keeps its own
            return
        items = [self._entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, phase: str, step: int, values: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        metrics = [self._entities.Metric(k, v, now, step) for k, v in numbers(phase, values).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
    def __init__(self, run_dir: Path, experiment: str, run_id: str) -> None:
        import wandb

        project = experiment or os.environ.get("WANDB_PROJECT") or "recsys"
        self.run = wandb.init(
            project=project, dir=str(run_dir), name=run_dir.resolve().name, id=run_id or None, resume="allow"
        )
        self.run_id = self.run.id

    def log_config(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log(self, phase: str, step: int, values: dict[str, float]) -> None:
        self.run.log(numbers(phase, values), step=step)

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_trackers(
    cfg: LoggingConfig, run_dir: Path, run_ids: dict[str, str], purge_step: int | None
) -> dict[str, Tracker]:
    """The chosen backends, each going on with its run of `run_ids` when it has one."""
    trackers: dict[str, Tracker] = {}
    for name in cfg.backends:
        if name == "tensorboard":
            trackers[name] = TensorBoardTracker(run_dir, purge_step)
        elif name == "mlflow":
            trackers[name] = MLflowTracker(run_dir, cfg.experiment, run_ids.get(name, ""))
        else:
            trackers[name] = WandbTracker(run_dir, cfg.experiment, run_ids.get(name, ""))
    return trackers


def missing_packages(cfg: LoggingConfig) -> list[str]:
    """The chosen backends whose library is not installed (checked before any rank starts)."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
    return [name for name in cfg.backends if importlib.util.find_spec(modules[name]) is None]
