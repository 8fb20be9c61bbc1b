"""benchmarks/plan_at_scale.py: the trainer's planner places MLPerf's 105 GB of tables on a
cluster of H100s without a GPU here, inside each GPU's memory, and the traffic arithmetic counts
what each sharding type sends."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_at_scale as pas  # noqa: E402


@pytest.fixture(scope="module")
def net():
    return pas.model()


def test_the_mlperf_tables_are_planned_on_two_hosts_of_h100s(net):
    plan = pas.plan_world(net, gpus=16, batch_per_rank=4096)
    assert sum(plan.kinds.values()) == len(pas.TABLE_ROWS) == 26
    assert len(plan.hbm_gb) == 16
    # 105 GB of weights (plus optimizer state and buffers) need several GPUs, and each stays under its cap
    assert sum(plan.hbm_gb) > sum(pas.TABLE_ROWS) * pas.EMBEDDING_DIM * 4 / 1e9
    assert max(plan.hbm_gb) < pas.HBM_GB * (1 - pas.sharding_config().storage_reserve)
    assert plan.step_ms > 0 and plan.compute_ms > 0 and plan.comms_ms > 0
    assert plan.bytes_per_rank["pooled"] > 0 and plan.bytes_per_rank["pooled"] == plan.bytes_per_rank["gradients"]
    assert pas.samples_per_s(plan) > 0


def _option(name: str, sharding_type: str, columns: list[int], rows: int = 1000, table_rows: int = 1000):
    """A ShardingOption's fields that `traffic` reads: shards of `rows` x each of `columns`, of a
    table of `table_rows` x 128."""
    shards = [SimpleNamespace(size=[rows, c]) for c in columns]
    tensor = SimpleNamespace(numel=lambda: table_rows * 128)
    return SimpleNamespace(name=name, sharding_type=sharding_type, shards=shards, num_shards=len(shards), tensor=tensor)


def test_traffic_counts_each_sharding_type():
    gpus, batch = 4, 10
    away = (gpus - 1) / gpus
    pooling = pas.MULTI_HOT[20]  # the 100-hot table
    sent = pas.traffic([_option("t_cat_20", "table_wise", [128])], gpus, batch)
    assert sent["ids"] == pytest.approx(batch * gpus * pooling * 8 * away / gpus)
    assert sent["pooled"] == pytest.approx(batch * gpus * 128 * 4 * away / gpus)
    # two column shards: each needs every id, each returns its half of the columns
    cw = pas.traffic([_option("t_cat_20", "column_wise", [64, 64])], gpus, batch)
    assert cw["ids"] == pytest.approx(2 * sent["ids"]) and cw["pooled"] == pytest.approx(sent["pooled"])
    # four row shards: each id goes to one of them, each sends partial sums of the full width
    rw = pas.traffic([_option("t_cat_20", "row_wise", [128] * 4, rows=250)], gpus, batch)
    assert rw["ids"] == pytest.approx(sent["ids"]) and rw["pooled"] == pytest.approx(4 * sent["pooled"])
    # a replica a rank: each rank's ring all-reduce sends 2 (N-1)/N of the table's gradient
    dp = pas.traffic([_option("t_cat_5", "data_parallel", [128] * 4, rows=3, table_rows=3)], gpus, batch)
    assert dp["ids"] == 0 and dp["pooled"] == 0
    assert dp["allreduce"] == pytest.approx(3 * 128 * 4 * 2 * away)
