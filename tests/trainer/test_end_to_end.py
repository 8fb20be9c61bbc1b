"""The real `train()` on 2 gloo ranks (torchrun) on synthetic data with a known answer."""

import json
import tomllib

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from tests.helpers.runs import run_trainer


def test_two_ranks_reach_the_oracle_auc(tmp_path):
    data = prepare_synthetic(SyntheticSpec(rows=500_000), tmp_path / "data", log=lambda *_: None)
    run_dir = tmp_path / "run"
    flags = "--config configs/demo.toml --training.progress_bar false --training.profile_steps 50 52".split()
    result = run_trainer(["--data", str(data.root), "--run-dir", str(run_dir), *flags], nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] > 0 and summary["samples_per_s"] > 0
    assert summary["oracle_auc"] == data.splits["test"].oracle_auc
    assert summary["test"]["auc"] > summary["oracle_auc"] - 0.03, summary
    assert summary["valid"]["auc"] > summary["valid_oracle_auc"] - 0.03, summary
    assert 0 < summary["test"]["logloss"] < 0.5
    # the run directory holds what a user needs to repeat and inspect the run
    resolved = tomllib.loads((run_dir / "config.toml").read_text())
    assert resolved["data"]["path"] == str(data.root)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"train", "memory", "valid", "tables", "test"}
    tables = [r for r in records if r["phase"] == "tables"]  # one per validation
    assert [r["step"] for r in tables] == [r["step"] for r in records if r["phase"] == "valid"]
    assert summary["table_coverage"].keys() == {f.name for f in data.sparse}
    assert all(0 < c <= 1 for c in summary["table_coverage"].values())
    assert all(tables[0][f"{f.name}_reuse"] <= tables[-1][f"{f.name}_reuse"] <= 1 for f in data.sparse)  # rows recur
    memory = [r for r in records if r["phase"] == "memory"]
    assert memory and all(0.1 < r["peak_rss_gb_min"] <= r["peak_rss_gb_max"] < 8 for r in memory)
    assert len(summary["peak_rss_gb_per_rank"]) == 2 and min(summary["peak_rss_gb_per_rank"]) > 0.1
    estimate = summary["planner_estimate_per_rank"]  # CPU: all host memory; the tables are 324k x 16 floats
    assert len(estimate) == 2 and all(e["hbm_gb"] == 0 for e in estimate)
    assert 0.015 < sum(e["ddr_gb"] for e in estimate) < max(summary["peak_rss_gb_per_rank"]) * 2
    assert 0.8 < summary["test"]["calibration"] < 1.25  # mean predicted CTR near the observed one
    # the profiler's trace of steps 50-52, one per rank, in Chrome trace format
    traces = sorted((run_dir / "profile").glob("*.pt.trace.json"))
    assert [t.name.split(".")[0] for t in traces] == ["rank0", "rank1"]
    assert all(json.loads(t.read_text())["traceEvents"] for t in traces)
    assert "profile of steps 50-52 written" in result.stdout
    # rank 0 says it all, each line marked; rank 1 (at WARNING) and the known third-party noise say nothing
    assert all(line.startswith("[rank0] ") for line in result.stdout.splitlines()), result.stdout[:3000]
    assert "broadcast_buffers" not in result.stderr and "is_fx_tracing" not in result.stderr, result.stderr[-3000:]
    plan = [line.split() for line in (run_dir / "plan.txt").read_text().splitlines()[1:]]
    assert sorted(row[0] for row in plan) == sorted(f"t_{f.name}" for f in data.sparse)
    assert {rank for row in plan for rank in row[2].split(",")} == {"0", "1"}  # both ranks hold tables
