"""The planner's inputs (topology, per-table constraints) and a table that only fits when split:
2 gloo ranks whose memory budget is smaller than the table train with it cut across both ranks,
and a budget too small for any plan is one clear error."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.schema import SparseFeature
from models import ModelConfig, build_model
from tests.helpers.data import write_dataset
from tests.helpers.runs import run_trainer
from trainer.config import ShardingConfig
from trainer.distributed import DistEnv, table_constraints, topology

BIG = 400_000  # ids: 400k x 16 floats = 25.6 MB of weights


@pytest.fixture(scope="module")
def big_table_data(tmp_path_factory):
    rng = np.random.default_rng(0)

    def rows(n):
        return pa.table(
            {
                "label": pa.array(rng.integers(0, 2, n), pa.int8()),
                "d0": rng.random(n).astype(np.float32),
                "big": rng.integers(0, BIG, n),
                "small": rng.integers(0, 50, n),
            }
        )

    root = tmp_path_factory.mktemp("big_table")
    return write_dataset(
        root,
        {"train": [rows(4000)], "valid": [rows(1000)], "test": [rows(1000)]},
        [SparseFeature("big", BIG), SparseFeature("small", 50)],
        ["d0"],
    )


def test_topology_takes_the_configured_memory_and_bandwidths():
    env = DistEnv(0, 4, 0, 2, torch.device("cpu"), "gloo")
    topo = topology(env, ShardingConfig(ddr_cap_gb=0.5, intra_host_bw_gbps=100, inter_host_bw_gbps=25))
    assert topo.world_size == 4 and topo.local_world_size == 2
    assert all(d.storage.ddr == 512 * 1024**2 for d in topo.devices)
    assert topo.intra_host_bw == 100 * 1024**3 / 1000 and topo.inter_host_bw == 25 * 1024**3 / 1000  # bytes/ms
    detected = topology(env, ShardingConfig())  # 0: the host's memory shared by its 2 ranks
    import os

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert detected.devices[0].storage.ddr == host // 2


def test_table_constraints_apply_per_table_entries_over_the_global_lists(big_table_data):
    model = build_model(ModelConfig(), big_table_data, torch.device("cpu"), torch.device("meta"))
    sharding = ShardingConfig(
        sharding_types=["table_wise", "column_wise"],
        compute_kernels=["fused"],
        min_partition=8,
        table_sharding_types=["t_big=column_wise"],
        table_compute_kernels=["t_small=dense"],
    )
    constraints = table_constraints(model, sharding, "cpu")
    assert constraints["t_big"].sharding_types == ["column_wise"] and constraints["t_big"].compute_kernels == ["fused"]
    assert constraints["t_small"].sharding_types == ["table_wise", "column_wise"] and constraints[
        "t_small"
    ].compute_kernels == ["dense"]
    assert constraints["t_big"].min_partition == 8
    with pytest.raises(ValueError, match="no table named t_nope; the model's tables: t_big, t_small"):
        table_constraints(model, ShardingConfig(table_sharding_types=["t_nope=table_wise"]), "cpu")
    with pytest.raises(ValueError, match="UVM kernels need a GPU"):
        table_constraints(model, ShardingConfig(table_compute_kernels=["t_big=fused_uvm_caching"]), "cpu")
    with pytest.raises(ValueError, match="look like 't_cat_25=table_wise'"):
        ShardingConfig(table_sharding_types=["t_big"])
    with pytest.raises(ValueError, match="unknown \\['diagonal'\\]"):
        ShardingConfig(table_sharding_types=["t_big=diagonal"])


def test_unpooled_tables_are_never_data_parallel_off_cuda():
    """data_parallel is a default sharding type; torchrec's replicated EmbeddingCollection fails on
    CPU (FBGEMM #4586), so an unpooled table loses it there and keeps it on CUDA."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    model = torch.nn.ModuleDict(
        {
            "pooled": EmbeddingBagCollection(
                [EmbeddingBagConfig(num_embeddings=10, embedding_dim=4, name="t_bag", feature_names=["a"])],
                device="meta",
            ),
            "seq": EmbeddingCollection(
                [EmbeddingConfig(num_embeddings=10, embedding_dim=4, name="t_seq", feature_names=["b"])], device="meta"
            ),
        }
    )
    cpu = table_constraints(model, ShardingConfig(), "cpu")
    assert "data_parallel" in ShardingConfig().sharding_types and "data_parallel" in cpu["t_bag"].sharding_types
    assert "data_parallel" not in cpu["t_seq"].sharding_types and "table_wise" in cpu["t_seq"].sharding_types
    assert "data_parallel" in table_constraints(model, ShardingConfig(), "cuda")["t_seq"].sharding_types
    with pytest.raises(ValueError, match="t_seq is an unpooled table, which cannot be data_parallel on CPU"):
        table_constraints(model, ShardingConfig(table_sharding_types=["t_seq=data_parallel"]), "cpu")


def _train(data, run_dir, *flags):
    return run_trainer(
        [
            "--data",
            str(data.root),
            "--model",
            "dlrm",
            "--run-dir",
            str(run_dir),
            *"--data.batch_size 128 --training.progress_bar false --sharding.ddr_cap_gb".split(),
            str(24 / 1024),
            *flags,
        ],
        nproc=2,
    )


@pytest.mark.slow
def test_a_table_bigger_than_a_ranks_budget_is_split_across_ranks_and_trains(big_table_data, tmp_path):
    # 24 MB per rank (85% of it for tables) cannot hold t_big's 25.6 MB; half its columns fit.
    result = _train(big_table_data, tmp_path / "split", "--sharding.min_partition", "8")
    assert result.returncode == 0, result.stderr[-4000:]
    plan = {row.split()[0]: row.split() for row in (tmp_path / "split" / "plan.txt").read_text().splitlines()[1:]}
    assert plan["t_big"][1].endswith("column_wise") and plan["t_big"][2] == "0,1", plan  # its columns cut in two
    assert (tmp_path / "split" / "summary.json").exists()

    # Without narrower column shards nothing fits: one error, from rank 0, saying what to change.
    result = _train(big_table_data, tmp_path / "nofit")
    assert result.returncode != 0
    assert result.stderr.count("error: no sharding plan fits the 2 tables") == 1, result.stderr[-3000:]
    assert "t_big 400,000 x 16" in result.stderr and "sharding.ddr_cap_gb" in result.stderr
