"""Table coverage statistics on 2 real gloo ranks against a direct computation: the union of
the rows both ranks looked up, and the share of each rank's lookups that hit a row it had seen."""

import json

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline.batch import Batch
from data_pipeline.schema import DatasetSchema, SparseFeature
from tests.helpers.dist import run_ranks
from trainer.distributed import DistEnv
from trainer.observe import TableCoverage

FEATURES = [SparseFeature("a", 50), SparseFeature("m", 30, multi_hot=True), SparseFeature("huge", 1000)]
MAX_ROWS = 100  # "huge" is not tracked


def _batches(rank: int, count: int = 6, size: int = 8) -> list[tuple[list[int], list[list[int]], list[int]]]:
    """Per batch: ids of a (one per row, some missing), lists of m, ids of huge; different per rank."""
    rng = np.random.default_rng(rank)
    out = []
    for _ in range(count):
        a = [int(x) for x in rng.integers(0, 20 + 20 * rank, size) if rng.random() > 0.2]
        m = [[int(x) for x in rng.integers(0, 30, rng.integers(0, 4))] for _ in range(size)]
        out.append((a, m, [int(x) for x in rng.integers(0, 1000, size)]))
    return out


def _to_batch(a: list[int], m: list[list[int]], huge: list[int], size: int = 8) -> Batch:
    lengths = [1] * len(a) + [0] * (size - len(a)) + [len(x) for x in m] + [1] * size
    values = a + [x for row in m for x in row] + huge
    sparse = KeyedJaggedTensor.from_lengths_sync(
        ["a", "m", "huge"], torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.int32)
    )
    return Batch(torch.zeros(size, 1), sparse, torch.zeros(size), torch.ones(size))


def _direct(ranks: int, upto: int) -> dict[str, float]:
    """Coverage after `upto` batches per rank; reuse of the batches in [upto-3, upto) (one window)."""
    out = {}
    for j, (name, rows) in enumerate((("a", 50), ("m", 30))):
        union, lookups, reused = set(), 0, 0
        for rank in range(ranks):
            seen = set()
            for i, batch in enumerate(_batches(rank)[:upto]):
                ids = batch[0] if j == 0 else [x for row in batch[1] for x in row]
                for x in ids:
                    if i >= upto - 3:
                        lookups += 1
                        reused += x in seen
                    seen.add(x)
            union |= seen
        out[f"{name}_coverage"] = len(union) / rows
        out[f"{name}_reuse"] = reused / lookups
    return out


def _coverage(env: DistEnv, out: str) -> None:
    rank = env.rank
    schema = DatasetSchema(root=".", label="label", dense=["d"], sparse=FEATURES, splits={})
    coverage = TableCoverage(schema, MAX_ROWS, env.device)
    batches = [_to_batch(*b) for b in _batches(rank)]
    reports = []
    for window in (batches[:3], batches[3:]):
        assert list(coverage.observe(iter(window))) == window  # the batches pass through unchanged
        reports.append(coverage.report())
    with open(f"{out}.{rank}", "w") as f:
        json.dump(reports, f)


@pytest.mark.parametrize("world", [1, 2])
def test_coverage_and_reuse_match_a_direct_count(world, tmp_path):
    out = str(tmp_path / "reports")
    run_ranks(_coverage, world, out=out)
    for rank in range(world):
        first, second = json.loads((tmp_path / f"reports.{rank}").read_text())
        assert first.keys() == {"a_coverage", "a_reuse", "m_coverage", "m_reuse"}  # "huge" is over MAX_ROWS
        assert first == pytest.approx(_direct(world, 3))
        assert second == pytest.approx(_direct(world, 6))
    assert second["a_coverage"] > first["a_coverage"] and second["a_reuse"] > first["a_reuse"]


def test_off_when_no_table_is_small_enough():
    schema = DatasetSchema(root=".", label="label", dense=["d"], sparse=FEATURES, splits={})
    coverage = TableCoverage(schema, 0, torch.device("cpu"))
    assert not coverage and coverage.report() == {}
