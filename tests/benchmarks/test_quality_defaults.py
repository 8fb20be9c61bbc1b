"""The click-log generators (benchmarks/click_logs.py) are deterministic, shaped like Criteo and
Avazu and learnable, and the `quality.py defaults` baselines run on tiny prepared splits they re-derive
exactly (no training here: the benchmark itself is run by hand)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import click_logs  # noqa: E402
import quality  # noqa: E402
import quality_defaults as qd  # noqa: E402

pytest.importorskip("sklearn")


def _quiet(*_):
    pass


@pytest.fixture(autouse=True)
def _small_and_single_threaded(monkeypatch):
    """Two regularisations a fit, one thread (OpenMP's spinning on a busy 2-core machine makes a
    3,000-row GBDT take 20 s instead of 1 s)."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setattr(qd, "LR_C", (0.1, 1.0))
    monkeypatch.setattr(qd, "SGD_ALPHA", (1e-4, 1e-3))
    with threadpool_limits(1):
        yield


def test_criteo_lines_are_deterministic_and_shaped_like_criteo(tmp_path):
    table, prob = click_logs.criteo(4000, seed=0)
    again, prob_again = click_logs.criteo(4000, seed=0)
    assert table.equals(again) and np.array_equal(prob, prob_again)
    assert not click_logs.criteo(4000, seed=1)[0].equals(table)
    assert table.column_names == ["label", *(f"int_{j}" for j in range(13)), *(f"cat_{j}" for j in range(26))]
    labels = table["label"].to_numpy()
    assert set(np.unique(labels)) == {0, 1} and 0.2 < labels.mean() < 0.3
    cats = [table[f"cat_{j}"] for j in range(26)]
    assert 0.03 < sum(c.null_count for c in cats) / (26 * 4000) < 0.08  # ~5% of the fields empty
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in cats[0].drop_null().to_pylist()[:50])
    assert sum(table[f"int_{j}"].null_count > 0 for j in range(13)) >= 10
    counts = table["int_4"].drop_null().to_numpy()
    assert counts.max() > 50 * np.median(counts)  # heavy tail
    distinct = [len(c.unique()) for c in cats]
    assert min(distinct) <= 10 and max(distinct) > 3000  # a few levels to near-unique
    bigger = click_logs.criteo(16_000, seed=0)[0]
    assert len(bigger["cat_2"].unique()) > 3 * len(table["cat_2"].unique())  # vocabularies grow with rows

    out = tmp_path / "c.tsv"
    truth = click_logs.write("criteo", 500, 0, out)
    lines = out.read_text().splitlines()
    assert len(lines) == 500 and all(line.count("\t") == 39 for line in lines)
    assert truth["rows"] == 500 and 0.5 < truth["oracle_auc"] < 1


def test_avazu_rows_are_deterministic_and_shaped_like_avazu(tmp_path):
    table, prob = click_logs.avazu(4000, seed=0)
    assert table.equals(click_logs.avazu(4000, seed=0)[0]) and len(prob) == 4000
    assert table.column_names == list(click_logs.AVAZU_COLUMNS)
    assert len(table["id"].unique()) == 4000
    hour = table["hour"].to_numpy()
    assert hour.min() >= 14102100 and hour.max() <= 14103023 and np.all(np.diff(hour) >= 0)
    assert 0.12 < table["click"].to_numpy().mean() < 0.22
    assert 1000 < len(table["C14"].unique()) < 3000 and len(table["C15"].unique()) <= 8
    assert len(table["site_id"].unique()) > 200 and len(table["device_type"].unique()) <= 5
    out = tmp_path / "a.csv"
    click_logs.write("avazu", 300, 0, out)
    assert out.read_text().splitlines()[0] == ",".join(click_logs.AVAZU_COLUMNS)


def test_a_hashed_logistic_regression_learns_the_click_models():
    from data_pipeline.prepare.tabular import assign_splits

    for kind in ("criteo", "avazu"):
        table, _ = getattr(click_logs, kind)(5000, seed=0)
        label = "label" if kind == "criteo" else "click"
        labels = table[label].to_numpy()
        split = assign_splits(labels, [0.8, 0.1, 0.1], seed=0)
        names = [n for n in table.column_names if n not in (label, "id") and not n.startswith("int_")]

        def values(lo, hi, table=table, names=names):
            return np.stack([qd._as_strings(table[n].slice(lo, hi - lo)) for n in names], 1)

        result = qd.hashed_lr(names, values, None, labels, split)
        assert result.value > 0.6, (kind, result)


def test_criteo_baseline_sees_the_preparers_split(tmp_path):
    from data_pipeline.prepare import criteo

    tsv = tmp_path / "criteo-3000.tsv"
    click_logs.write("criteo", 3000, 0, tsv)
    opts, out, _ = criteo.parse(["--input", str(tsv), "--out", str(tmp_path / "data")])
    criteo.prepare(dataclasses.replace(opts, workers=1), out, log=_quiet)
    hashed, oracle = qd.criteo_baselines(tsv, tmp_path / "data")  # exits if the split sizes differ
    assert hashed.name == "hashed LR" and 0.55 < hashed.value < 1 and oracle.name == "oracle"
    lines = qd.criteo_lines(tsv)
    assert len(lines["label"]) == 3000 and lines["dense"].shape == (3000, 13)


def test_tabular_baselines_on_the_preparers_split(tmp_path):
    import census_like

    from data_pipeline.prepare import tabular

    csv = tmp_path / "census.csv"
    table, prob = census_like.generate(3000, seed=0)
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, csv)
    np.savez(tmp_path / "census.csv.truth.npz", prob=prob)
    opts, out, _ = tabular.parse(
        ["--input", str(csv), "--label", "income", "--positive", ">50K", "--out", str(tmp_path / "d")]
    )
    tabular.prepare(opts, out, log=_quiet)
    found = {b.name: b.value for b in qd.tabular_baselines(csv, tmp_path / "d", "income", (">50K",), with_gbdt=True)}
    assert set(found) == {"GBDT", "LR", "oracle"} and all(0.7 < v < 1 for v in found.values()), found
    _, labels, split = quality.tabular_split(csv)
    assert labels.sum() == (np.array(table["income"].to_pylist()) == ">50K").sum() and set(np.unique(split)) == {
        0,
        1,
        2,
    }


def test_the_plan_and_the_report_read_summaries(capsys):
    opts = type("Opts", (), {"sizes": [10_000], "only": ["census"], "rerun": False})()
    assert [(d.name, rows, models) for d, rows, models in qd.plan(opts)] == [
        ("census", 10_000, ["wide_deep", "dlrm", "deepfm"])
    ]
    opts.only = None
    assert [f"{d.name}-{rows}" for d, rows, _ in qd.plan(opts)] == [
        "census-10000", "criteo-10000", "avazu-10000", "movielens-100000", "synthetic-500000"
    ]  # fmt: skip
    census, synthetic = qd.DATASETS[0], qd.DATASETS[-1]
    summary = {"test": {"auc": 0.9}, "steps": 300, "train_time_s": 12.0, "derived": {"data.batch_size": {"value": 32}}}
    r = qd.Result("census-10000", census, 10_000, [qd.Baseline("GBDT", 0.903, "x"), qd.Baseline("LR", 0.89)])
    r.runs = {"wide_deep": summary}
    s = qd.Result("synthetic-500000", synthetic, 500_000)
    s.runs = {"dlrm": {**summary, "oracle_auc": 0.91}}
    qd.report([r, s])
    text = capsys.readouterr().out
    assert (
        "| census-10000 | 10,000 | wide_deep | AUC 0.9000 | GBDT 0.9030 · LR 0.8900 | -0.0030 vs GBDT | 300 | 12 |"
        in text
    )
    assert "census-10000: wide_deep test AUC within 0.005 of GBDT: met" in text
    assert "synthetic-500000: gap to the oracle AUC <= 0.015: met (dlrm 0.9000, oracle 0.9100, gap 0.0100)" in text
    assert "- census-10000/wide_deep: batch_size 32" in text
