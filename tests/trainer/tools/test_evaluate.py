"""`recsys evaluate` against independent references: scikit-learn for AUC, log loss, NDCG, RMSE
and MAE, and a plain per-user loop for recall, precision, hit rate and MRR, overall and on every
segment's subset of rows. The model is a real (small, randomly initialised) DLRM, saved both as a
model file and as a checkpoint directory inside a run directory."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from sklearn.metrics import log_loss, mean_absolute_error, mean_squared_error, ndcg_score, roc_auc_score

from data_pipeline.schema import SparseFeature
from models import ModelConfig
from tests.helpers.data import write_dataset
from trainer.config import Config
from trainer.headline import headline
from trainer.tools.evaluate import ACTIVITY_LABELS, evaluate, main, parse_segment
from trainer.tools.export import MODEL_FORMAT, MODEL_VERSION, build_cpu_model

USERS, ITEMS, TRAIN_ITEMS = 40, 60, 50  # test rows also hold items 50-59, never seen in training
KS = [3, 10]


def _table(rng: np.random.Generator, rows: int, items: int, regression: bool, train: bool = False) -> pa.Table:
    """Test rows: every user the same number; train rows: from 100+ rows for user 0 to a few (activity buckets)."""
    user = (rng.random(rows) ** 2 * USERS).astype(np.int64) if train else np.repeat(np.arange(USERS), rows // USERS)
    item = np.minimum(rng.zipf(1.3, len(user)) - 1, items - 1)
    country = rng.choice(["DE", "FR", "US", "ZZ"], len(user)).astype(object)
    country[rng.random(len(user)) < 0.05] = None
    columns = {
        "user_id": pa.array(user),
        "item_id": pa.array(item),
        "d0": pa.array(rng.normal(size=len(user)), pa.float32()),
        "country": pa.array(country, pa.string()),
        "age": pa.array(np.round(rng.uniform(18, 80, len(user)), 1)),
        "tags": pa.array([[1, 2]] * len(user), pa.list_(pa.int64())),
    }
    if regression:
        columns["label"] = pa.array(rng.integers(1, 6, len(user)).astype(np.float32))
    else:
        label = (rng.random(len(user)) < 0.3) & (country != "ZZ")  # segment ZZ holds no positives: no AUC
        columns["label"] = pa.array(label.astype(np.float32))
        columns["weight"] = pa.array(
            rng.choice([0.0, 0.5, 1.0, 2.0], len(user), p=[0.1, 0.2, 0.5, 0.2]).astype(np.float32)
        )
    return pa.table(columns)


def _dataset(root: Path, regression: bool):
    rng = np.random.default_rng(1 if regression else 0)
    test = _table(rng, 640, ITEMS, regression)
    tables = {
        "train": [_table(rng, 800, TRAIN_ITEMS, regression, train=True)],
        "test": [test.slice(0, 300), test.slice(300)],
    }
    schema = write_dataset(
        root, tables, [SparseFeature("user_id", USERS), SparseFeature("item_id", ITEMS)], ["d0"], row_group_rows=128
    )
    if regression:
        schema.task, schema.label_range = "regression", [1.0, 5.0]
    else:
        schema.weight = "weight"
    schema.save()
    return schema, test


def _model(schema, scale: float) -> tuple[Config, dict]:
    cfg = Config(
        model=ModelConfig(name="dlrm", embedding_dim=4, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    )
    torch.manual_seed(0)
    model = build_cpu_model(cfg, schema)
    for p in model.parameters():
        torch.nn.init.uniform_(p.data, -scale, scale)
    return cfg, model.state_dict()


def _model_file(path: Path, schema, scale: float) -> Path:
    cfg, state = _model(schema, scale)
    torch.save(
        {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "state_dict": state,
            "config": cfg.to_toml(),
            "dataset": schema.to_json(),
            "step": 7,
            "checkpoint": "test",
            "valid": {},
        },
        path,
    )
    return path


def _checkpoint(run: Path, schema, scale: float) -> Path:
    """A committed checkpoint as the trainer lays it out: DCP files and checkpoint.json listing them."""
    cfg, state = _model(schema, scale)
    path = run / "checkpoints" / "step-00000007"
    dcp.save({f"model.{k}": v for k, v in state.items()}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in path.iterdir()
    }
    best = {"metric": headline(schema.task).name, "metrics": {}, "step": None, "evals_since_best": 0}
    meta = {
        "format": "recsys-trainer checkpoint",
        "version": 2,
        "step": 7,
        "config": cfg.to_toml(),
        "dataset": schema.to_json(),
        "state": {"best": best},
        "files": files,
    }
    (path / "checkpoint.json").write_text(json.dumps(meta))
    return path


# ---- references ----------------------------------------------------------------------------------


def _ranking_reference(user: np.ndarray, score: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Per-user loop: rank a user's rows by score, then average over users with a relevant row."""
    values: dict[str, list[float]] = {}
    for u in np.unique(user):
        s, r = score[user == u], relevant[user == u]
        if not r.any():
            continue
        ranked = r[np.argsort(-s)]
        for k in KS:
            values.setdefault(f"recall@{k}", []).append(ranked[:k].sum() / r.sum())
            values.setdefault(f"precision@{k}", []).append(ranked[:k].sum() / k)
            values.setdefault(f"hit_rate@{k}", []).append(float(ranked[:k].any()))
            values.setdefault(f"ndcg@{k}", []).append(ndcg_score([r.astype(float)], [s], k=k) if len(s) > 1 else 1.0)
        values.setdefault("mrr", []).append(1 / (1 + np.argmax(ranked)))
    return {"users": len(values.get("mrr", [])), **{name: float(np.mean(v)) for name, v in values.items()}}


def _binary_reference(rows: dict[str, np.ndarray]) -> dict[str, float]:
    keep = rows["weight"] > 0
    y, p, w, logit = rows["label"][keep], rows["prediction"][keep], rows["weight"][keep], rows["logit"][keep]
    ctr = np.average(y, weights=w)
    logloss = log_loss(y, p, sample_weight=w, labels=[0, 1])
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else math.nan
    out = {
        "count": int(keep.sum()),
        "positives": int((y > 0).sum()),
        "logloss": logloss,
        "ne": logloss / entropy,
        "calibration": np.average(p, weights=w) / ctr if ctr > 0 else math.nan,
        "ctr": ctr,
        "mean_prediction": np.average(p, weights=w),
    }
    out["auc"] = roc_auc_score(y, p) if 0 < out["positives"] < len(y) else math.nan
    return {**out, **_ranking_reference(rows["user_id"][keep], logit, y > 0)}


def _regression_reference(rows: dict[str, np.ndarray]) -> dict[str, float]:
    y, p = rows["label"], rows["prediction"]
    return {
        "count": len(y),
        "rmse": math.sqrt(mean_squared_error(y, p)),
        "mae": mean_absolute_error(y, p),
        "mean_label": y.mean(),
        "mean_prediction": p.mean(),
        **_ranking_reference(rows["user_id"], p, y >= 4),
    }


def _assert_matches(got: dict, want: dict, where: str) -> None:
    for name, value in want.items():
        if isinstance(value, float) and math.isnan(value):
            assert got[name] is None, f"{where} {name}"
        else:
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{where} {name}: {got[name]} != {value}"


def _members(label: str, values: np.ndarray) -> np.ndarray:
    """Rows of a segment labelled by a value range "[lo, hi]" or one value."""
    lo, hi = map(float, label.strip("[]").split(", ")) if label.startswith("[") else (float(label),) * 2
    return (values >= lo) & (values <= hi)


def _activity(count: int) -> str:
    if count == 0:
        return "0 (new)"
    return "1-4" if count < 5 else "5-19" if count < 20 else "20-99" if count < 100 else "100+"


# ---- tests ---------------------------------------------------------------------------------------


def test_binary_metrics_overall_and_per_segment_match_references(tmp_path, capsys):
    schema, test = _dataset(tmp_path / "data", regression=False)
    model = _model_file(tmp_path / "model.pt", schema, scale=1.0)
    specs = ["country", "age", "popularity:item_id", "activity:user_id", "new:item_id"]
    argv = ["--checkpoint", str(model), "--data", str(schema.root), "--k", "3,10", "--out", str(tmp_path / "eval")]
    for spec in specs:
        argv += ["--segment-by", spec]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "by popularity:item_id:" in printed and "recall@3" in printed

    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(result) == [
        "checkpoint", "step", "data", "split", "task", "headline", "ks", "user_column", "overall", "segments"
    ]  # fmt: skip
    assert (result["step"], result["split"], result["task"], result["ks"], result["user_column"]) == (
        7,
        "test",
        "binary",
        KS,
        "user_id",
    )
    assert list(result["segments"]) == specs

    preds = pq.read_table(tmp_path / "eval" / "predictions.parquet")
    assert preds.column_names == [
        *"row label weight prediction logit user_id country age item_id".split(),
    ]
    for column in ("label", "weight", "user_id", "country", "age", "item_id"):  # rows in file order, columns aligned
        assert preds.column(column).to_pylist() == test.column(column).to_pylist(), column
    rows = {name: preds.column(name).to_numpy(zero_copy_only=False) for name in preds.column_names}
    assert rows["logit"].std() > 0.05  # the scores depend on the rows
    _assert_matches(result["overall"], _binary_reference(rows), "overall")

    train = Counter(pq.read_table(schema.root / "train").column("item_id").to_pylist())
    users = Counter(pq.read_table(schema.root / "train").column("user_id").to_pylist())
    item_counts = np.array([train[i] for i in rows["item_id"]], dtype=float)
    country = np.array(["null" if c is None else c for c in rows["country"]])
    expected = {
        "country": lambda label: country == label,
        "age": lambda label: _members(label, rows["age"]),
        "popularity:item_id": lambda label: _members(label, item_counts),
        "activity:user_id": lambda label: np.array([_activity(users[u]) for u in rows["user_id"]]) == label,
        "new:item_id": lambda label: (item_counts > 0) == (label == "returning"),
    }
    for spec, segments in result["segments"].items():
        covered = np.zeros(len(country), dtype=int)
        for segment in segments:
            subset = expected[spec](segment["segment"])
            covered += subset
            _assert_matches(
                segment, _binary_reference({k: v[subset] for k, v in rows.items()}), f"{spec}={segment['segment']}"
            )
        assert (covered == 1).all(), spec  # the segments partition the rows
    assert [s["segment"] for s in result["segments"]["country"]] == ["DE", "FR", "US", "ZZ", "null"]
    assert result["segments"]["country"][3]["auc"] is None  # ZZ: one class
    assert len(result["segments"]["age"]) == 10
    assert [s["segment"] for s in result["segments"]["new:item_id"]] == ["new", "returning"]


def test_regression_from_a_run_directory_writes_into_the_run(tmp_path):
    schema, _ = _dataset(tmp_path / "data", regression=True)
    run = tmp_path / "run"
    _checkpoint(run, schema, scale=0.5)  # predictions inside [1, 5]: clipping ties nothing
    result, out = evaluate(run, schema.root, "test", [parse_segment("activity:user_id")], ks=KS)
    assert out == run / "eval" / "test" and (out / "metrics.json").is_file()
    assert result["checkpoint"] == str(run / "checkpoints" / "step-00000007") and result["task"] == "regression"
    preds = pq.read_table(out / "predictions.parquet")
    assert preds.column_names == ["row", "label", "prediction", "user_id"]
    rows = {name: preds.column(name).to_numpy() for name in preds.column_names}
    assert rows["prediction"].min() > 1 and rows["prediction"].max() < 5 and rows["prediction"].std() > 0.01
    _assert_matches(result["overall"], _regression_reference(rows), "overall")
    users = Counter(pq.read_table(schema.root / "train").column("user_id").to_pylist())
    activity = np.array([_activity(users[u]) for u in rows["user_id"]])
    segments = result["segments"]["activity:user_id"]
    assert [s["segment"] for s in segments] == [a for a in ACTIVITY_LABELS if a in activity] and len(segments) >= 3
    for segment in segments:
        subset = activity == segment["segment"]
        _assert_matches(segment, _regression_reference({k: v[subset] for k, v in rows.items()}), segment["segment"])


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    schema, _ = _dataset(tmp_path / "data", regression=True)
    model = str(_model_file(tmp_path / "model.pt", schema, scale=0.05))
    base = ["--checkpoint", model, "--data", str(schema.root), "--out", str(tmp_path / "eval")]
    cases = {
        ("--segment-by", "nope"): r"part-00000.parquet: no column 'nope'",
        ("--segment-by", "new:tags"): r"column 'tags' holds lists",
        ("--user-column", "who"): r"no column 'who' to rank by user",
        ("--split", "valid"): r"no split 'valid'",
    }
    for extra, message in cases.items():
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--data", str(schema.root)]) == 2
    assert "error: checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([*base, "--segment-by", "foo:user_id"])
    assert stop.value.code == 2 and "is not COL or one of" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
