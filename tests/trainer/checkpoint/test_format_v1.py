"""Old checkpoints and model files still load: a run saved by the trainer of commit 8d93d6b
(checkpoint.json format 1, one `train_state` dict; tests/data/format_v1/README.md) is read as format
2, resumed (its run log cut back, its learning-rate and best-validation state restored), exported
and evaluated by today's code, and its old model file scores exactly like a new export of it."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers.runs import ROOT, run_trainer
from trainer.checkpoint import locate, read_meta
from trainer.tools.evaluate import evaluate
from trainer.tools.export import export, predict

FIXTURE = ROOT / "tests" / "data" / "format_v1"
CHECKPOINT = FIXTURE / "run" / "checkpoints" / "step-00000016"


def test_format_1_is_read_as_named_parts():
    meta = read_meta(CHECKPOINT)
    assert meta["version"] == 2 and "train_state" not in meta
    state = meta["state"]
    assert set(state) == {"train", "lr", "best", "run_log"}
    assert state["train"]["step"] == 16 and state["best"]["step"] == 16 and state["lr"]["steps"] == 16
    log = (FIXTURE / "run" / "metrics.jsonl").read_bytes()
    assert state["run_log"]["step"] == 16 and log[: state["run_log"]["metrics_bytes"]].endswith(b"\n")
    assert b'"phase": "test"' in log[state["run_log"]["metrics_bytes"] :]  # written after the checkpoint


@pytest.mark.slow
def test_format_1_run_resumes_and_trains_on(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    with (run / "metrics.jsonl").open("a") as f:  # a failed attempt's record, after the checkpoint
        f.write(json.dumps({"time": 0, "phase": "train", "step": 20, "loss": 9.9}) + "\n")
    args = ["--config", str(run / "config.toml"), "--data", str(FIXTURE / "data"), "--run-dir", str(run)]
    result = run_trainer([*args, "--training.epochs", "2"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000016'} (step 16, epoch 1, batch 0 of it)" in result.stdout
    assert "changed since the checkpoint: training.epochs: 1 in the checkpoint, 2 now" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("loss") == 9.9 for r in records)  # cut back to the checkpoint
    # dropped: the original run's test record (after its last checkpoint) and the failed attempt's
    assert [r["dropped_records"] for r in records if r["phase"] == "resume"] == [2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["headline"]["metric"] == "auc"


def test_format_1_checkpoint_exports_and_scores_like_its_old_model_file(tmp_path):
    blob = export(FIXTURE / "run", tmp_path / "new.pt")
    assert blob["step"] == 16 and blob["headline"] is None  # format 1 did not record it
    old = predict(FIXTURE / "model-v1.pt", FIXTURE / "data", "test", tmp_path / "old.parquet")
    new = predict(tmp_path / "new.pt", FIXTURE / "data", "test", tmp_path / "new.parquet")
    assert old == new and old["rows"] == 200 and 0.5 < old["auc"] < 1


def test_format_1_checkpoint_evaluates(tmp_path):
    result, out = evaluate(locate(FIXTURE / "run"), FIXTURE / "data", out=tmp_path / "eval")
    assert result["step"] == 16 and result["headline"] == "auc" and result["overall"]["count"] == 200
    assert (out / "metrics.json").is_file() and (out / "predictions.parquet").is_file()
