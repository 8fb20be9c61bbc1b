import numpy as np
import pyarrow as pa
import torch

from data_pipeline.reader import ParquetBatches, RankLoader
from data_pipeline.schema import SparseFeature
from tests.conftest import TINY_SPARSE, write_dataset


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
    assert kjt["m"].to_dense()[4].tolist() == [5, 6, 7]


def test_slices_across_row_groups_keep_offsets(tmp_path, tiny_table):
    table = pa.concat_tables([tiny_table] * 3)  # 15 rows in row groups of 4: batches straddle them
    schema = write_dataset(tmp_path, {"train": [table]}, TINY_SPARSE, ["d0", "d1"], row_group_rows=4)
    batches = list(ParquetBatches(schema, "train", batch_size=3, shuffle=False))
    values = torch.cat([b.sparse["m"].values() for b in batches]).tolist()
    assert values == [1, 2, 4, 5, 6, 7] * 3


def _rows_table(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    return pa.table({
        "label": pa.array(ids % 2, pa.int8()),
        "row": pa.array(ids.astype(np.float32)),
        "a": pa.array(ids % 50, pa.int64()),
        "m": pa.array([[int(i % 50)] * int(i % 3) for i in ids], pa.list_(pa.int64())),
    })


def test_two_ranks_split_row_groups_without_loss_or_duplication(tmp_path):
    # 3 files of uneven size, row groups of 100: 23 row groups over 2 ranks
    tables = [_rows_table(0, 1000), _rows_table(1000, 750), _rows_table(1750, 550)]
    schema = write_dataset(tmp_path, {"valid": tables}, [SparseFeature("a", 50), SparseFeature("m", 50, True)], ["row"], row_group_rows=100)
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
    schema = write_dataset(tmp_path, {"train": tables}, [SparseFeature("a", 50), SparseFeature("m", 50, True)], ["row"], row_group_rows=100)
    seen = []
    for rank in range(2):
        dataset = ParquetBatches(schema, "train", batch_size=64, rank=rank, world_size=2, num_workers=2, shuffle=True, seed=3)
        loader = RankLoader(dataset)
        batches = list(loader)
        assert len(batches) == len(loader) == min(dataset.batches_of(r) for r in range(2))
        seen += [int(x) for b in batches for x in b.dense[:, 0]]
    assert len(seen) == len(set(seen))  # shuffled, but no row twice
    assert len(seen) > 2300 - 2 * 2 * 64  # at most one partial batch dropped per worker
