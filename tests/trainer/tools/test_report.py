"""`recsys report`: a real (small) training run's directory -> PNGs, report.md, report.html; with and
without a `recsys evaluate` output, on an older run directory, and the error path."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from tests.helpers.runs import run_trainer
from trainer.tools import report, report_plots

SEGMENT_LABELS = ["new users (0 clicks)", "1-9 clicks", "10+ clicks"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run: 2 epochs of 63 steps on 8,000 synthetic rows, stopped at step 60 and resumed,
    so the log holds train, valid, resume and test records."""
    root = tmp_path_factory.mktemp("report")
    data = prepare_synthetic(SyntheticSpec(rows=10_000), root / "data", log=lambda *_: None)
    args = [
        "--data",
        str(data.root),
        "--run-dir",
        str(root / "run"),
        *"--data.batch_size 128 --training.epochs 2 --training.eval_every 30 --training.log_every 5".split(),
        *"--training.progress_bar false".split(),
    ]
    for extra in (["--training.stop_at_step", "60"], []):
        result = run_trainer([*args, *extra])
        assert result.returncode == 0, result.stderr[-4000:]
    return root / "run"


def write_evaluation(run_dir: Path, rows: int = 3000, seed: int = 0) -> dict:
    """A `recsys evaluate` output in its schema: eval/test/metrics.json and predictions.parquet
    (a slightly over-confident model, one segment spec with three segments)."""
    rng = np.random.default_rng(seed)
    segment = rng.choice(SEGMENT_LABELS, rows, p=[0.2, 0.5, 0.3])
    logit = rng.normal(-1.2, 1.4, rows)
    label = (rng.random(rows) < 1 / (1 + np.exp(-0.8 * logit))).astype(np.int8)
    prediction = 1 / (1 + np.exp(-logit))
    out = run_dir / "eval" / "test"
    out.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "row": np.arange(rows),
                "label": label,
                "prediction": prediction.astype(np.float32),
                "logit": logit.astype(np.float32),
                "activity": segment,
            }
        ),
        out / "predictions.parquet",
    )

    def metrics(mask: np.ndarray) -> dict:
        ctr, mean = float(label[mask].mean()), float(prediction[mask].mean())
        return {
            "count": int(mask.sum()),
            "positives": int(label[mask].sum()),
            "auc": 0.70 + 0.05 * ctr,
            "logloss": 0.5,
            "ne": 0.9,
            "calibration": mean / ctr,
            "ctr": ctr,
            "mean_prediction": mean,
            "recall@10": 0.3,
            "recall@50": 0.6,
        }

    evaluation = {
        "checkpoint": str(run_dir / "checkpoints" / "step-00000126"),
        "step": 126,
        "data": "data/synthetic",
        "split": "test",
        "task": "binary",
        "ks": [10, 50],
        "user_column": "cat_0",
        "overall": metrics(np.ones(rows, bool)),
        "segments": {"activity": [{"segment": s, **metrics(segment == s)} for s in SEGMENT_LABELS]},
    }
    (out / "metrics.json").write_text(json.dumps(evaluation, indent=2))
    return evaluation


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read back by matplotlib (so it is a valid image)."""
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.std() > 0  # not blank
    return pixels.shape[1], pixels.shape[0]


def pixels(size: tuple[float, float]) -> tuple[int, int]:
    return round(size[0] * report_plots.DPI), round(size[1] * report_plots.DPI)


def test_report_of_an_evaluated_run(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    evaluation = write_evaluation(run_dir)
    assert report.main([str(run_dir)]) == 0
    out = run_dir / "report"
    sizes = {
        "training_curves.png": pixels(report_plots.CURVES_SIZE),
        "throughput.png": pixels(report_plots.THROUGHPUT_SIZE),
        "calibration_test.png": pixels(report_plots.CALIBRATION_SIZE),
        "segments_test_activity.png": pixels(report_plots.segment_figsize(len(SEGMENT_LABELS))),
    }
    assert {p.name for p in out.glob("*.png")} == set(sizes)
    for name, size in sizes.items():
        assert image_size(out / name) == size, name

    md = (out / "report.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for split in ("test", "valid", "best_valid"):
        for value in summary[split].values():
            assert f"{value:.4f}" in md
    assert f"valid, best (step {summary['best_valid_step']})" in md
    assert f"{summary['oracle_auc']:.4f}" in md and f"{summary['samples_per_s']:,.0f} samples/s" in md
    assert "1 (resumed at step 60)" in md
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", md)) == sorted(sizes)
    assert "## Evaluation: test split" in md and "### Segments: activity" in md
    for row in evaluation["segments"]["activity"]:  # the segment table: label, count, calibration
        assert re.search(rf"\| {re.escape(row['segment'])} \| {row['count']:,} \|.*\| {row['calibration']:.4f} \|", md)
    assert "above the diagonal: the model under-predicts" in md.lower()

    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted((out / n).read_bytes() for n in sizes)
    assert "<h3>Segments: activity</h3>" in page


def test_an_older_run_without_eval_summary_or_resumes(trained, tmp_path):
    """An older run: no eval/, summary.json without the newer keys, a torn last line in the log."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    keep = {"model", "dataset", "steps", "valid", "test"}
    summary = {k: v for k, v in json.loads((trained / "summary.json").read_text()).items() if k in keep}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [line for line in (trained / "metrics.jsonl").read_text().splitlines() if '"resume"' not in line]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"time": 1, "pha')
    out = tmp_path / "elsewhere"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == {"training_curves.png", "throughput.png"}
    md = (out / "report.md").read_text()
    assert "No evaluation yet" in md and f"{summary['test']['auc']:.4f}" in md and "| restarts |" not in md


def test_a_directory_that_is_no_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "report").exists()
    assert report.main([str(tmp_path / "missing")]) == 2
