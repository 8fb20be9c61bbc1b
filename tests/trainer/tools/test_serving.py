"""The torch.export serving artifact: every registered model exports with a dynamic batch size and
scores like the model it came from; a real sharded run's program, loaded by the example script in
a clean interpreter outside the repository, gives `recsys predict`'s scores."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.reader import ParquetBatches
from models import MODELS
from tests.helpers.data import synthetic
from tests.helpers.models import small_config
from tests.helpers.runs import ROOT, one_error, run_recsys, train
from trainer.tools.export import build_cpu_model, to_prediction
from trainer.tools.serving import export_program, load_program

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("serving") / "data", rows=3000)


def _inputs(batch, keys):
    """A Batch as the program's inputs (what the contract describes), copied out of its buffer."""
    columns = batch.sparse.to_dict()
    ids = {key: columns[key].values().clone() for key in keys}
    lengths = {key: columns[key].lengths().clone() for key in keys}
    return batch.dense.clone(), ids, lengths


@pytest.mark.parametrize("name, task", [(name, "binary") for name in MODELS] + [("dlrm", "regression")])
def test_every_model_exports_and_scores_like_itself_at_any_batch_size(tmp_path, data, name, task):
    schema = data if task == "binary" else replace(data, task="regression", label_range=[1.0, 5.0])
    torch.manual_seed(0)
    model = build_cpu_model(small_config(name, tmp_path), schema).eval()
    export_program(model, schema, tmp_path / "m.pt2", {"model": name})
    program, contract = load_program(tmp_path / "m.pt2")
    assert contract["dense"] == schema.dense and [f["name"] for f in contract["sparse"]] == schema.sparse_names
    keys = schema.sparse_names
    for rows in (1, 7, 300):  # none of them the traced batch size
        batch = next(iter(ParquetBatches(schema, "test", rows, shuffle=False)))
        with torch.no_grad():
            want = model.scores(batch.dense, batch.sparse)
        got = program(*_inputs(batch, keys))
        assert got["prediction"].shape == (rows,)
        torch.testing.assert_close(got["prediction"], to_prediction(schema, want), rtol=1e-5, atol=1e-6)
        if task == "binary":
            torch.testing.assert_close(got["logit"], want, rtol=1e-5, atol=1e-5)
        else:
            assert set(got) == {"prediction"} and got["prediction"].min() >= 1 and got["prediction"].max() <= 5
    dense, ids, lengths = _inputs(batch, keys)
    lengths[keys[0]] = lengths[keys[0]] + 1  # one id more per row than `ids` holds
    with pytest.raises(RuntimeError, match="each feature's lengths must sum to the number of its ids"):
        program(dense, ids, lengths)


def test_a_sharded_runs_program_scores_like_predict_in_a_clean_interpreter_outside_the_repo(tmp_path, data):
    run = tmp_path / "run"
    train(data.root, run, "--training.max_steps", "20", derive=True)
    pt2, model_file = tmp_path / "serve" / "model.pt2", tmp_path / "model.pt"
    exported = run_recsys("export", str(run), "--format", "torch-export", "--out", str(pt2))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "as a torch.export program" in exported.stdout
    assert run_recsys("export", str(run), "--out", str(model_file)).returncode == 0
    preds = str(tmp_path / "p.parquet")
    predicted = run_recsys("predict", "--model", str(model_file), "--data", str(data.root), "--out", preds)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "is_fx_tracing" not in exported.stderr + predicted.stderr  # the known noise is hidden (trainer/logs.py)

    # the serving side: only the .pt2 and the example script, no repository on the path
    outside = tmp_path / "serve"
    shutil.copy(ROOT / "examples" / "score_with_torch_export.py", outside)
    check = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    check += "print('torchrec' in sys.modules)"
    script_args = ["score_with_torch_export.py", "model.pt2", str(data.root / "test"), "scores.parquet"]
    served = subprocess.run(
        [sys.executable, "-I", "-c", check, *script_args], cwd=outside, capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip().endswith("False")  # torchrec was never imported
    scores, want = pq.read_table(outside / "scores.parquet"), pq.read_table(tmp_path / "p.parquet")
    assert len(scores) == len(want) == data.splits["test"].rows
    for column in ("prediction", "logit"):
        np.testing.assert_allclose(scores[column].to_numpy(), want[column].to_numpy(), rtol=1e-5, atol=1e-6)


def test_predict_given_a_program_says_what_it_is(tmp_path, data):
    torch.manual_seed(0)
    model = build_cpu_model(small_config("dlrm", tmp_path), data).eval()
    export_program(model, data, tmp_path / "m.pt2", {"model": "dlrm"})
    result = run_recsys("predict", "--model", str(tmp_path / "m.pt2"), "--data", str(data.root), "--out", "x.parquet")
    assert "is a torch.export program (for serving" in one_error(result)
