import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.batch import table_to_batch
from data_pipeline.loader import RankLoader
from data_pipeline.reader import ParquetBatches
from data_pipeline.rows import RowStore
from data_pipeline.schema import SparseFeature, check_files
from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.runs import ROOT


def test_batch_tensors_are_exact(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5, shuffle=False))
    assert batch.dense.dtype == torch.float32
    torch.testing.assert_close(batch.dense, torch.tensor([[0.5, 1], [0, 2], [2, 3], [3, 4], [4, 5]]))
    torch.testing.assert_close(batch.labels, torch.tensor([1.0, 0, 1, 0, 1]))
    torch.testing.assert_close(batch.weights, torch.ones(5))
    kjt = batch.sparse
    assert kjt.keys() == ["a", "m"]
    assert kjt.stride() == 5
    # key-major: a's lengths (null id -> 0), then m's (empty and null lists -> 0)
    assert kjt.lengths().tolist() == [1, 0, 1, 1, 1, 2, 0, 0, 1, 3]
    assert kjt.values().tolist() == [3, 0, 9, 1, 1, 2, 4, 5, 6, 7]
    assert kjt.length_per_key() == [4, 6]  # given by the reader, so no device sync computes it
    assert kjt["m"].to_dense()[4].tolist() == [5, 6, 7]


def test_slices_across_row_groups_keep_offsets(tmp_path, tiny_table):
    table = pa.concat_tables([tiny_table] * 3)  # 15 rows in row groups of 4: batches straddle them
    schema = write_dataset(tmp_path, {"train": [table]}, TINY_SPARSE, ["d0", "d1"], row_group_rows=4)
    batches = list(ParquetBatches(schema, "train", batch_size=3, shuffle=False))
    values = torch.cat([b.sparse["m"].values() for b in batches]).tolist()
    assert values == [1, 2, 4, 5, 6, 7] * 3


def _rows_table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table(
        {
            "label": pa.array(ids % 2, pa.int8()),
            "row": pa.array(ids.astype(np.float32)),
            "a": pa.array(ids % 50, pa.int64()),
            "m": pa.array([[int(i % 50)] * int(i % 3) for i in ids], pa.list_(pa.int64())),
        }
    )


def test_two_ranks_split_row_groups_without_loss_or_duplication(tmp_path):
    # 3 files of uneven size, row groups of 100: 23 row groups over 2 ranks
    tables = [_rows_table(0, 1000), _rows_table(1000, 750), _rows_table(1750, 550)]
    schema = write_dataset(
        tmp_path, {"valid": tables}, [SparseFeature("a", 50), SparseFeature("m", 50, True)], ["row"], row_group_rows=100
    )
    seen, counts = [], []
    for rank in range(2):
        loader = RankLoader(ParquetBatches(schema, "valid", batch_size=128, rank=rank, world_size=2, drop_last=False))
        batches = list(loader)
        counts.append(len(batches))
        for b in batches:
            assert b.batch_size == 128
            real = b.weights > 0
            seen += b.dense[real, 0].long().tolist()
            # ids of padding rows are empty, real rows keep theirs
            assert (b.sparse["a"].lengths()[~real] == 0).all()
            assert (b.sparse["a"].values() == b.dense[real, 0].long() % 50).all()
    assert counts[0] == counts[1]
    assert sorted(seen) == list(range(2300))


def test_training_batches_equal_across_ranks_and_workers(tmp_path):
    tables = [_rows_table(0, 1000), _rows_table(1000, 750), _rows_table(1750, 550)]
    schema = write_dataset(
        tmp_path, {"train": tables}, [SparseFeature("a", 50), SparseFeature("m", 50, True)], ["row"], row_group_rows=100
    )
    seen = []
    for rank in range(2):
        dataset = ParquetBatches(
            schema, "train", batch_size=64, rank=rank, world_size=2, num_workers=2, shuffle=True, seed=3
        )
        loader = RankLoader(dataset)
        batches = list(loader)
        assert len(batches) == len(loader) == min(dataset.batches_of(r) for r in range(2))
        seen += [int(x) for b in batches for x in b.dense[:, 0]]
    assert len(seen) == len(set(seen))  # shuffled, but no row twice
    assert len(seen) > 2300 - 2 * 2 * 64  # at most one partial batch dropped per worker


# ---- exactness through the worker transport ----------------------------------------------------


def _nulls_table(start: int, n: int) -> pa.Table:
    """Rows numbered by `row`, with null and empty lists, null ids and null dense values."""
    ids = np.arange(start, start + n)
    return pa.table(
        {
            "label": pa.array(ids % 2, pa.int8()),
            "row": pa.array(ids.astype(np.float32)),
            "d": pa.array([None if i % 7 == 0 else float(i % 5) for i in ids], pa.float32()),
            "a": pa.array([None if i % 4 == 0 else int(i % 50) for i in ids], pa.int64()),
            "m": pa.array([None if i % 5 == 0 else [int(i % 50)] * int(i % 3) for i in ids], pa.list_(pa.int64())),
        }
    )


def test_hive_partitioned_split_reads_its_files_in_path_order_and_skips_bookkeeping(tmp_path):
    # Spark/Hive write a split as dt=.../part-*.parquet, plus _SUCCESS, _temporary/ and .hive-staging/
    schema = _rows_dataset(tmp_path)  # train/part-00000 (rows 0-999), -00001 (1000-1749), -00002 (1750-2299)
    train = tmp_path / "train"
    moves = {"part-00000": "dt=2024-01-01", "part-00001": "dt=2024-01-02", "part-00002": "dt=2024-01-01"}
    for name, folder in moves.items():
        (train / folder).mkdir(exist_ok=True)
        (train / f"{name}.parquet").rename(train / folder / f"{name}.parquet")
    (train / "_SUCCESS").write_text("")
    for junk in ("_temporary/0/part-00009.parquet", ".hive-staging/part-00000.parquet"):
        (train / junk).parent.mkdir(parents=True)
        (train / junk).write_bytes(b"not parquet: a writer's leftovers")
    assert [str(f.relative_to(train)) for f in schema.split_files("train")] == [
        "dt=2024-01-01/part-00000.parquet",
        "dt=2024-01-01/part-00002.parquet",
        "dt=2024-01-02/part-00001.parquet",
    ]
    check_files(schema, "train")  # row counts and column types of the partition files
    batches = ParquetBatches(schema, "train", batch_size=128, drop_last=False)
    rows = [int(x) for b in batches for x in b.dense[b.weights > 0, 0]]
    assert rows == list(range(1000)) + list(range(1750, 2300)) + list(range(1000, 1750))


NULLS_SPARSE = [SparseFeature("a", 50), SparseFeature("m", 50, True)]


def _rows(batches) -> dict[int, tuple]:
    """row number -> (label, dense, ids per key) of every real (weight > 0) row."""
    out = {}
    for b in batches:
        features = b.sparse.to_dict()
        offsets = {
            k: torch.cat([torch.zeros(1, dtype=torch.long), jt.lengths().cumsum(0)]) for k, jt in features.items()
        }
        # the KJT carries its per-key counts (so a device needs no sync); they must match the lengths
        assert b.sparse.length_per_key() == [int(jt.lengths().sum()) for jt in features.values()]
        for i in torch.nonzero(b.weights > 0).flatten().tolist():
            ids = tuple(tuple(features[k].values()[offsets[k][i] : offsets[k][i + 1]].tolist()) for k in features)
            row = int(b.dense[i, 0])
            assert row not in out, f"row {row} twice"
            out[row] = (float(b.labels[i]), tuple(b.dense[i].tolist()), ids)
    return out


def _expected_row(i: int) -> tuple:
    a = () if i % 4 == 0 else (i % 50,)
    m = () if i % 5 == 0 else (i % 50,) * (i % 3)
    return float(i % 2), (float(i), 0.0 if i % 7 == 0 else float(i % 5)), (a, m)


def _nulls_dataset(tmp_path, split="valid"):
    tables = [_nulls_table(0, 1000), _nulls_table(1000, 750), _nulls_table(1750, 550)]
    return write_dataset(tmp_path, {split: tables}, NULLS_SPARSE, ["row", "d"], row_group_rows=100)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_row_exact_through_worker_rings(tmp_path, monkeypatch, shuffle):
    schema = _nulls_dataset(tmp_path)
    received = []  # ring batches are copied out here, in this process
    original = RankLoader._copy_out
    monkeypatch.setattr(RankLoader, "_copy_out", lambda self, *a: received.append(1) or original(self, *a))
    dataset = ParquetBatches(
        schema, "valid", batch_size=96, num_workers=2, shuffle=shuffle, drop_last=False, shuffle_buffer_rows=300
    )
    rows = _rows(RankLoader(dataset))
    assert rows == {i: _expected_row(i) for i in range(2300)}
    assert len(received) >= len(dataset) - 2  # all but each worker's padded last batch came by ring


MIXED_KEYS = [
    *"s0 s1 m s2 n3 s4 s5".split(),
]  # runs of complete scalar ids, split by a list and a null-able id


def _mixed_table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    columns = {"label": pa.array(ids % 2, pa.int8()), "row": pa.array(ids.astype(np.float32))}
    for k, key in enumerate(MIXED_KEYS):
        if key == "m":
            columns[key] = pa.array([[int(i % 40)] * int(i % 3) for i in ids], pa.list_(pa.int64()))
        elif key == "n3":
            columns[key] = pa.array([None if i % 6 == 0 else int((i + k) % 40) for i in ids], pa.int64())
        else:
            columns[key] = pa.array((ids * 7 + k) % 40)
    return pa.table(columns)


def _mixed_ids(i: int, k: int, key: str) -> tuple:
    if key == "m":
        return (i % 40,) * (i % 3)
    if key == "n3":
        return () if i % 6 == 0 else ((i + k) % 40,)
    return ((i * 7 + k) % 40,)


def _mixed_row(i: int) -> tuple:
    return float(i % 2), (float(i),), tuple(_mixed_ids(i, k, key) for k, key in enumerate(MIXED_KEYS))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("workers", [0, 1])
def test_runs_of_scalar_features_are_copied_exactly(tmp_path, shuffle, workers):
    """Consecutive scalar features without missing ids are copied together (one strided copy per
    run of rows); each must still land in its own place, around list and null-able features."""
    sparse = [SparseFeature(key, 40, key == "m") for key in MIXED_KEYS]
    schema = write_dataset(
        tmp_path, {"train": [_mixed_table(0, 900), _mixed_table(900, 700)]}, sparse, ["row"], row_group_rows=100
    )
    dataset = ParquetBatches(
        schema, "train", batch_size=64, num_workers=workers, shuffle=shuffle, drop_last=False, shuffle_buffer_rows=250
    )
    assert _rows(RankLoader(dataset)) == {i: _mixed_row(i) for i in range(1600)}


def test_batches_go_the_normal_way_when_no_ring_slot_is_free(tmp_path, monkeypatch):
    schema = _nulls_dataset(tmp_path)
    received = []
    original = RankLoader._copy_out
    monkeypatch.setattr(RankLoader, "_copy_out", lambda self, *a: received.append(1) or original(self, *a))
    loader = RankLoader(ParquetBatches(schema, "valid", batch_size=96, num_workers=2, drop_last=False))
    loader.ring_slots = 0  # sent to the workers with the dataset
    rows = _rows(loader)
    assert rows == {i: _expected_row(i) for i in range(2300)}
    assert not received


def test_the_workers_module_needs_no_torchrec():
    """The fork server preloads data_pipeline.reader and every worker is a fork of it: workers
    send buffers and never build a KJT, so a rank's loader starts without torchrec's seconds of
    imports. Any torchrec (or fbgemm) import creeping into the reader's modules fails this."""
    heavy = "('torchrec', 'fbgemm_gpu')"
    code = f"import sys, data_pipeline.reader; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout[-2000:], done.stderr[-2000:])


KILLED_OWNER = """
import sys
from data_pipeline.loader import RankLoader
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema

if __name__ == "__main__":
    dataset = ParquetBatches(DatasetSchema.load(sys.argv[1]), "valid", batch_size=8, num_workers=2, drop_last=False)
    batches = iter(RankLoader(dataset))
    next(batches)
    print("reading", flush=True)
    sys.stdin.read()  # until killed
"""


def test_workers_end_with_a_killed_rank(tmp_path):
    """Workers come from a fork server, so their parent outlives a SIGKILLed rank: they must notice
    on their own, or they (and the server) would hold the launcher's pipes open forever."""
    schema = _nulls_dataset(tmp_path)
    script = tmp_path / "owner.py"
    script.write_text(KILLED_OWNER)
    owner = subprocess.Popen(
        [sys.executable, str(script), str(schema.root)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert owner.stdout.readline() == "reading\n"
    owner.kill()
    # EOF on the pipe: every process that inherited it (workers, fork server) has exited
    out, _ = owner.communicate(timeout=30)
    assert owner.returncode == -signal.SIGKILL


def test_table_to_batch_matches_the_reader(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    (read,) = list(ParquetBatches(schema, "train", batch_size=5, shuffle=False))
    direct = table_to_batch(tiny_table, schema)
    for name in ("dense", "labels", "weights"):
        torch.testing.assert_close(getattr(direct, name), getattr(read, name))
    assert direct.sparse.lengths().tolist() == read.sparse.lengths().tolist()
    assert direct.sparse.values().tolist() == read.sparse.values().tolist()
    assert direct.sparse.length_per_key() == [4, 6]


# ---- the shuffle buffer --------------------------------------------------------------------------


def _row_order(schema, split="train", **kwargs) -> list[list[int]]:
    dataset = ParquetBatches(schema, split, batch_size=64, shuffle=True, **kwargs)
    return [[int(x) for x in b.dense[b.weights > 0, 0]] for b in dataset]


def _rows_dataset(tmp_path):
    tables = [_rows_table(0, 1000), _rows_table(1000, 750), _rows_table(1750, 550)]
    return write_dataset(
        tmp_path, {"train": tables}, [SparseFeature("a", 50), SparseFeature("m", 50, True)], ["row"], row_group_rows=100
    )


def test_shuffle_buffer_mixes_rows_of_several_row_groups(tmp_path):
    schema = _rows_dataset(tmp_path)
    mixed = _row_order(schema, shuffle_buffer_rows=400)
    groups = [len({row // 100 for row in batch}) for batch in mixed]
    assert min(groups) >= 3  # 64 rows drawn from 4-5 row groups of 100
    # a batch is a random sample of its window, not runs of neighbouring rows
    assert all(sorted(batch) != list(range(min(batch), min(batch) + 64)) for batch in mixed)


def test_a_window_is_shuffled_uniformly(tmp_path):
    schema = _rows_dataset(tmp_path)
    batches = _row_order(schema, shuffle_buffer_rows=10_000)  # one window: every row
    assert len({row // 100 for row in batches[0]}) >= 15  # of 23 row groups (about 22 expected)
    means = [np.mean(batch) for batch in batches]  # no drift from early rows to late ones
    assert abs(np.mean(means[:10]) - np.mean(means[-10:])) < 300 and np.std(means) < 200


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    schema = _rows_dataset(tmp_path)
    first = _row_order(schema, shuffle_buffer_rows=400, seed=1)
    assert _row_order(schema, shuffle_buffer_rows=400, seed=1) == first
    assert _row_order(schema, shuffle_buffer_rows=400, seed=2) != first
    dataset = ParquetBatches(schema, "train", batch_size=64, shuffle=True, shuffle_buffer_rows=400, seed=1)
    dataset.set_epoch(1)
    second = [[int(x) for x in b.dense[:, 0]] for b in dataset]
    assert second != first
    assert sorted(sum(second, [])) != sorted(sum(first, []))  # even the rows dropped differ


@pytest.mark.parametrize("buffer_rows", [0, 150, 400, 10_000])
def test_shuffle_keeps_every_row_exactly_once(tmp_path, buffer_rows):
    schema = _rows_dataset(tmp_path)
    seen, counts = [], []
    for rank in range(2):
        dataset = ParquetBatches(
            schema,
            "train",
            batch_size=64,
            rank=rank,
            world_size=2,
            num_workers=2,
            shuffle=True,
            drop_last=False,
            shuffle_buffer_rows=buffer_rows,
            seed=5,
        )
        batches = list(RankLoader(dataset))
        counts.append(len(batches))
        seen += [int(x) for b in batches for x in b.dense[b.weights > 0, 0]]
    assert counts[0] == counts[1]
    assert sorted(seen) == list(range(2300))


def test_shuffle_buffer_holds_at_most_its_size_plus_one_row_group(tmp_path, monkeypatch):
    schema = _rows_dataset(tmp_path)  # row groups of at most 100 rows
    held = []
    original = RowStore.append
    monkeypatch.setattr(
        RowStore, "append", lambda self, *a: (original(self, *a), held.append((self.rows, self.capacity)))
    )
    rows = sum(len(batch) for batch in _row_order(schema, shuffle_buffer_rows=250))
    assert rows == 2300 // 64 * 64
    assert max(r for r, _ in held) > 250  # it did fill up...
    assert all(r <= 250 + 100 and capacity <= 250 + 100 for r, capacity in held)  # ...and no further


def test_row_store_refuses_rows_beyond_its_capacity(tmp_path):
    schema = _rows_dataset(tmp_path)
    store = RowStore(schema, capacity=150)
    store.append(_rows_table(0, 100))
    with pytest.raises(ValueError, match="cannot add 100"):
        store.append(_rows_table(100, 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_from_workers(tmp_path):
    schema = _nulls_dataset(tmp_path)
    batches = list(
        RankLoader(ParquetBatches(schema, "valid", batch_size=96, num_workers=2, drop_last=False), pin_memory=True)
    )
    for b in batches:
        assert b.dense.is_pinned() and b.labels.is_pinned() and b.weights.is_pinned()
        assert b.sparse.values().is_pinned() and b.sparse.lengths().is_pinned()
    moved = batches[0].to(torch.device("cuda"), non_blocking=True)
    assert moved.sparse.values().is_cuda
    assert _rows(batches) == {i: _expected_row(i) for i in range(2300)}
