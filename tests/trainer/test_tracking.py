"""Experiment tracking against real stores: a local MLflow store (sqlite, MLflow's local backend)
and W&B in offline mode, written by a real 2-rank run; a stopped and resumed run stays one run."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import synthetic
from tests.helpers.runs import run_trainer, train

FLAGS = "--data.batch_size 64 --training.max_steps 20 --training.log_every 5 --checkpoint.every_steps 0".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("data"), rows=4000).root


def stop_at_10(data, run_dir, *flags: str) -> None:
    args = ["--data", str(data), "--run-dir", str(run_dir), "--training.progress_bar", "false", *FLAGS, *flags]
    result = run_trainer([*args, "--training.stop_at_step", "10"], nproc=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def records(run_dir, phase: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


@pytest.mark.slow
def test_mlflow_gets_params_metrics_and_files_and_a_resumed_run_stays_one_run(tmp_path, data, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    artifacts = tmp_path / "artifacts"  # MLflow's default is ./mlruns in the trainer's working directory
    mlflow.create_experiment("ctr", artifact_location=artifacts.as_uri())
    run_dir = tmp_path / "run"
    backends = ["--logging.backends", "tensorboard", "mlflow", "--logging.experiment", "ctr"]
    stop_at_10(data, run_dir, *backends)
    (stopped,) = mlflow.search_runs(experiment_names=["ctr"], output_format="list")
    assert stopped.info.status == "KILLED" and stopped.info.run_name == "run"

    summary = train(data, run_dir, *FLAGS, *backends)  # the same command resumes the same MLflow run
    (run,) = mlflow.search_runs(experiment_names=["ctr"], output_format="list")
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "dlrm" and params["data.batch_size"] == "64"
    assert params["logging.backends"] == "['tensorboard', 'mlflow']"
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    logged = records(run_dir, "train")
    assert sorted(m.step for m in history) == [r["step"] for r in logged] == [5, 10, 15, 20]
    assert {m.step: m.value for m in history}[20] == pytest.approx(logged[-1]["loss"])
    assert run.data.metrics["test/auc"] == pytest.approx(summary["test"]["auc"])
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"config.toml", "plan.txt", "summary.json"}
    assert (artifacts / run.info.run_id / "artifacts" / "plan.txt").is_file()
    assert (run_dir / "tb").is_dir()


@pytest.mark.slow
def test_wandb_offline_run_resumes_under_one_id(tmp_path, data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    backends = ["--logging.backends", "wandb"]
    stop_at_10(data, run_dir, *backends)
    train(data, run_dir, *FLAGS, *backends)
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one run id, two attempts
    logs = [next(r.glob("*.wandb")).read_bytes() for r in runs]
    assert b"train/loss" in logs[0] and b"test/auc" in logs[1]
    assert not (run_dir / "tb").exists()  # TensorBoard was not chosen


def test_a_backend_is_a_choice():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'neptune' is not one of tensorboard, mlflow, wandb"):
        load_config(["--logging.backends", "neptune"])
