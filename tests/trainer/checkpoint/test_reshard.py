"""A checkpoint saved by 2 sharded ranks loads on 1 rank and on other sharding plans
(table_wise -> column_wise, table_column_wise, and column_wise -> table_wise) with every embedding
value, dense weight and Adam moment identical; rowwise Adagrad's per-row state is converted between
column splits (the same values when a table is split, the width-weighted mean when shards merge).

Real processes (tests.helpers.dist, gloo), the real Checkpointer on torchrec's DMP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema
from models import ModelConfig, build_model
from tests.helpers.dist import run_ranks
from trainer.checkpoint import Checkpointer, Resume, committed, read_meta
from trainer.config import Config, ShardingConfig
from trainer.distributed import DistEnv, plan_sharding, shard_model
from trainer.optim import TABLE_WEIGHT, apply_sparse_optimizer, build_optimizer

pytestmark = pytest.mark.slow

BATCH = 64
MODEL = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def _dump(model, optimizer) -> dict:
    """This rank's pieces: every table shard (with its offsets; a replicated table is one piece),
    its rowwise state, dense tensors, and which tables were replicated (data_parallel)."""
    out = {"tables": {}, "momentum": {}, "dense": {}, "adam": {}, "replicated": []}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            out["tables"][key] = [(list(s.metadata.shard_offsets), s.tensor.clone()) for s in value.local_shards()]
        elif TABLE_WEIGHT.search(key):
            out["tables"][key] = [([0, 0], value.clone())]
            out["replicated"].append(key)
        else:
            out["dense"][key] = value.clone()
    for param, states in optimizer.state_dict()["state"].items():
        for name, value in states.items():
            if isinstance(value, ShardedTensor):  # one per column shard, in the table's column order
                out["momentum"][param] = [(s.metadata.shard_offsets[0], s.tensor.clone()) for s in value.local_shards()]
            elif name.endswith(".momentum1"):  # a replicated table's, under the fused state's name
                out["momentum"][param] = [(0, value.clone())]
            else:
                out["adam"][f"{param}.{name}"] = value.clone()
    return out


class Note:
    """A Stateful part: the checkpointer saves its state_dict() and hands it back to load_state_dict()."""

    def __init__(self) -> None:
        self.text = ""

    def state_dict(self) -> dict:
        return {"text": self.text}

    def load_state_dict(self, state: dict) -> None:
        self.text = state["text"]


def _rank(env: DistEnv, data: str, jobs: list, out: str) -> None:
    """Run `jobs` in order: (checkpoint root to load or None, sharding type, steps to train, root to
    save in after training or None); dump the state after the load, and after the save."""
    rank, world_size = env.rank, env.world_size
    schema = DatasetSchema.load(data)
    dumps = []
    for load_from, sharding, train_steps, save_to in jobs:
        torch.manual_seed(0)
        cfg = Config(
            run_dir=str(save_to or load_from),
            model=MODEL,
            sharding=ShardingConfig(sharding_types=[sharding], min_partition=4),
        )
        model = build_model(cfg.model, schema, env.device, torch.device("meta"))
        tables = apply_sparse_optimizer(model, "rowwise_adagrad", 0.05, 1e-8)
        dmp = shard_model(model, env, plan_sharding(model, env, BATCH, cfg.sharding))
        optimizer = build_optimizer(dmp, "adam", 1e-3, 1e-8, tables=tables)
        note = Note()
        checkpointer = Checkpointer(cfg, env, dmp, optimizer, schema, parts={"note": note})
        if load_from:
            path = committed(Path(load_from) / "checkpoints")[-1]
            checkpointer.load(Resume(path, read_meta(path), []))
            assert note.text == f"saved by rank 0 after {read_meta(path)['step']} steps"  # the part got its state
        dumps.append(_dump(dmp, optimizer))
        if save_to:
            pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
            batches = iter(list(ParquetBatches(schema, "train", BATCH, rank=rank, world_size=world_size))[:train_steps])
            while True:
                try:
                    pipeline.progress(batches)
                except StopIteration:
                    break
            note.text = f"saved by rank {rank} after {train_steps} steps"  # rank 0 writes checkpoint.json
            checkpointer.save(train_steps)
            dumps.append(_dump(dmp, optimizer))
    torch.save(dumps, Path(out) / f"rank{rank}.pt")


def run(world_size, data, jobs, out) -> list[dict]:
    """Each job's dumps of every rank, merged: tables as full tensors, momentum per column shard."""
    out.mkdir(parents=True, exist_ok=True)
    run_ranks(_rank, world_size, data=str(data), jobs=jobs, out=str(out))
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    merged = []
    for i in range(len(per_rank[0])):
        tables, momentum = {}, {}
        for dump in (d[i] for d in per_rank):
            for key, shards in dump["tables"].items():
                for (row, col), tensor in shards:
                    full = tables.setdefault(key, {})
                    full[(row, col)] = tensor
            for key, shards in dump["momentum"].items():
                momentum.setdefault(key, {}).update(dict(shards))
        full_tables = {}
        for key, pieces in tables.items():
            rows = [
                torch.cat([pieces[k] for k in sorted(pieces) if k[0] == r], dim=1)
                for r in sorted({k[0] for k in pieces})
            ]
            full_tables[key] = torch.cat(rows, dim=0)
        merged.append(
            {
                "tables": full_tables,
                "momentum": {k: [v[o] for o in sorted(v)] for k, v in momentum.items()},
                "dense": per_rank[0][i]["dense"],
                "adam": per_rank[0][i]["adam"],
                "replicated": per_rank[0][i]["replicated"],
            }
        )
    return merged


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reshard") / "data"
    spec = SyntheticSpec(rows=8000, files=2, row_group_rows=500, max_vocab=2000)
    return prepare_synthetic(spec, root, log=lambda *_: None).root


def test_two_rank_checkpoint_loads_on_one_rank_and_on_other_plans(data, tmp_path):
    tw, cw = tmp_path / "tw", tmp_path / "cw"
    # 2 ranks: table-wise: train 4 steps, save; then column-wise (every table cut in two 4-column
    # shards): load it, train 3 steps, save; then table-column-wise: load the table-wise one
    initial, saved_tw, loaded_cw, saved_cw, loaded_twcw = run(
        2,
        data,
        [(None, "table_wise", 4, tw), (tw, "column_wise", 3, cw), (tw, "table_column_wise", 0, None)],
        tmp_path / "a",
    )
    # 1 rank (table-wise: every table whole on it): load both
    loaded_1, loaded_1_from_cw = run(
        1, data, [(tw, "table_wise", 0, None), (cw, "table_wise", 0, None)], tmp_path / "b"
    )

    assert saved_tw["momentum"] and all(len(v) == 1 for v in saved_tw["momentum"].values())
    for other in (loaded_cw, loaded_twcw):  # the other layouts did happen
        assert all(len(v) == 2 for v in other["momentum"].values())
    trained = [k for k in saved_tw["tables"] if not torch.equal(saved_tw["tables"][k], initial["tables"][k])]
    assert len(trained) == len(saved_tw["tables"])  # every table moved: equal after loading means loaded
    for loaded in (loaded_1, loaded_cw, loaded_twcw):
        assert_equal(saved_tw["tables"], loaded["tables"])
        assert_equal(saved_tw["dense"], loaded["dense"])
        assert_equal(saved_tw["adam"], loaded["adam"])
        for key, (momentum,) in saved_tw["momentum"].items():  # split: each column shard gets the row's value
            assert all(torch.equal(momentum, m) for m in loaded["momentum"][key]), key
    # column-wise -> one table-wise rank: weights exact; the row state is the mean of the two halves
    assert_equal(saved_cw["tables"], loaded_1_from_cw["tables"])
    assert_equal(saved_cw["dense"], loaded_1_from_cw["dense"])
    assert not torch.equal(
        saved_cw["tables"][next(iter(saved_cw["tables"]))], saved_tw["tables"][next(iter(saved_tw["tables"]))]
    )
    for key, halves in saved_cw["momentum"].items():
        # values ~1e-8: no absolute tolerance
        torch.testing.assert_close(loaded_1_from_cw["momentum"][key][0], (halves[0] + halves[1]) / 2, atol=0, rtol=1e-6)


def test_replicated_tables_load_on_sharded_plans_and_back(data, tmp_path):
    """data_parallel tables keep their optimizer state under the fused tables' names, so a
    checkpoint moves between a plan that replicates every table and ones that shard them."""
    dp, tw, cw = tmp_path / "dp", tmp_path / "tw", tmp_path / "cw"
    initial, saved_dp, loaded_tw, saved_tw, loaded_cw, saved_cw, dp_from_tw, dp_from_cw = run(
        2,
        data,
        [
            (None, "data_parallel", 4, dp),
            (dp, "table_wise", 3, tw),
            (dp, "column_wise", 2, cw),
            (tw, "data_parallel", 0, None),
            (cw, "data_parallel", 0, None),
        ],
        tmp_path / "a",
    )
    tables = sorted(saved_dp["tables"])
    assert sorted(saved_dp["replicated"]) == sorted(dp_from_cw["replicated"]) == tables and not saved_tw["replicated"]
    assert all(not torch.equal(saved_dp["tables"][k], initial["tables"][k]) for k in tables)  # every table trained
    assert sorted(saved_dp["momentum"]) == sorted(saved_tw["momentum"]) == tables  # the same names
    assert all(m.abs().sum() > 0 for (m,) in saved_dp["momentum"].values())
    for saved, loaded in ((saved_dp, loaded_tw), (saved_dp, loaded_cw), (saved_tw, dp_from_tw), (saved_cw, dp_from_cw)):
        assert_equal(saved["tables"], loaded["tables"])
        assert_equal(saved["dense"], loaded["dense"])
        assert_equal(saved["adam"], loaded["adam"])
    for saved, loaded in ((saved_dp, loaded_tw), (saved_dp, loaded_cw), (saved_tw, dp_from_tw)):
        for key, (momentum,) in saved["momentum"].items():  # one value per row, split or not
            assert loaded["momentum"][key] and all(torch.equal(momentum, m) for m in loaded["momentum"][key]), key
    assert all(len(v) == 2 for v in loaded_cw["momentum"].values())  # split into two column shards
    for key, halves in saved_cw["momentum"].items():  # merged back: the row's mean
        torch.testing.assert_close(dp_from_cw["momentum"][key][0], (halves[0] + halves[1]) / 2, atol=0, rtol=1e-6)
