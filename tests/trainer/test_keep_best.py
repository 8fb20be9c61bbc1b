"""Early stopping keeps the best weights: with `training.keep_best`, the test split is scored with
the weights of the best validation, on 2 sharded ranks; `recsys evaluate --best` scores the same.

The dataset's test split points at the valid files, so test metrics must equal the best (not the
last) validation metrics exactly."""

import json

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.schema import DatasetSchema
from tests.helpers.runs import run_recsys, train


def test_test_split_is_scored_with_the_best_weights(tmp_path):
    schema = prepare_synthetic(
        SyntheticSpec(rows=20_000, files=2, row_group_rows=1024), tmp_path / "data", log=lambda *_: None
    )
    raw = json.loads((schema.root / "dataset.json").read_text())
    raw["splits"]["test"] = raw["splits"]["valid"]
    (schema.root / "dataset.json").write_text(json.dumps(raw))
    DatasetSchema.load(schema.root)
    run_dir = tmp_path / "run"
    flags = "--data.batch_size 128 --training.epochs 3 --training.eval_every 20 --training.keep_best true"
    summary = train(
        schema.root, run_dir, *flags.split(), *"--optimizer.dense_lr 0.05 --optimizer.sparse_lr 0.3".split()
    )
    assert summary["best_valid_step"] < summary["steps"], summary  # the last weights are not the best ones
    assert summary["test_weights_step"] == summary["best_valid_step"]
    assert abs(summary["test"]["auc"] - summary["best_valid"]["auc"]) < 1e-6, summary
    assert abs(summary["test"]["logloss"] - summary["best_valid"]["logloss"]) < 1e-6

    for flag, step in (["--best"], summary["best_valid_step"]), ([], summary["steps"]):
        out = tmp_path / f"eval{len(flag)}"
        args = ["--checkpoint", str(run_dir), *flag, "--data", str(schema.root), "--out", str(out)]
        done = run_recsys("evaluate", *args)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads((out / "metrics.json").read_text())
        assert result["step"] == step
        same = abs(result["overall"]["auc"] - summary["test"]["auc"]) < 1e-5
        assert same == bool(flag), (result["overall"], summary["test"])  # one CPU process, as the 2 ranks scored
