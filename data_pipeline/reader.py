"""Parquet -> Batch stream for one rank, split by row group across ranks and DataLoader workers.

How work is split (the same on every rank, computed from Parquet footers, no collective needed):
  - the split's row groups are listed in file order and, when shuffling, permuted by (seed, epoch);
  - rank r of W takes every W-th row group, and DataLoader worker w of K every K-th of those;
  - each worker streams its row groups into batches of exactly `batch_size` rows.
Every rank yields the same number of batches, because sharded embedding lookups are collectives
and one rank with an extra batch would hang the others:
  - training (`drop_last=True`) drops each worker's final partial batch and stops every rank at the
    smallest per-rank count, so up to about (batch_size x workers) rows per rank are skipped per epoch;
  - evaluation (`drop_last=False`) pads the final partial batch, and ranks with fewer batches
    add all-padding batches, with weight-0 rows, so every row is scored exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batch import Batch, pad_batch, table_to_batch
from data_pipeline.schema import DataError, DatasetSchema, check_files, check_row_group


@dataclass(frozen=True)
class RowGroup:
    file: Path
    index: int
    rows: int

    def __str__(self) -> str:
        return f"{self.file} row group {self.index}"


def list_row_groups(files: list[Path]) -> list[RowGroup]:
    groups = []
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        groups += [RowGroup(path, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
    return groups


class ParquetBatches(IterableDataset):
    """The batches of one rank's (and, inside a DataLoader worker, one worker's) row groups."""

    def __init__(
        self,
        schema: DatasetSchema,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = False,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.schema = schema
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shares = max(num_workers, 1)  # in-process loading (0 workers) is one share
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.row_groups = list_row_groups(check_files(schema, split))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating; same value on every rank)."""
        self.epoch = epoch

    def assignment(self, rank: int, worker: int) -> list[int]:
        """Indices into `self.row_groups` read by this rank's worker, in reading order."""
        order = np.arange(len(self.row_groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return order[rank :: self.world_size][worker :: self.shares].tolist()

    def batches_of(self, rank: int) -> int:
        """How many batches `rank` produces this epoch, before equalisation across ranks."""
        count = 0
        for worker in range(self.shares):
            rows = sum(self.row_groups[i].rows for i in self.assignment(rank, worker))
            count += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return count

    def __len__(self) -> int:
        """Batches per rank this epoch: the same on every rank (see module docstring)."""
        counts = [self.batches_of(r) for r in range(self.world_size)]
        return min(counts) if self.drop_last else max(counts)

    def _read(self, index: int, files: dict[Path, pq.ParquetFile]) -> pa.Table:
        group = self.row_groups[index]
        if group.file not in files:
            files[group.file] = pq.ParquetFile(group.file)
        try:
            table = files[group.file].read_row_group(group.index, columns=self.schema.columns())
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{group}: cannot be read ({e})") from None
        check_row_group(self.schema, table, str(group))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            table = table.take(rng.permutation(table.num_rows))
        return table

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if (0 if info is None else info.num_workers) != self.num_workers:
            raise RuntimeError(f"built for {self.num_workers} loader workers, run with {info and info.num_workers}")
        files: dict[Path, pq.ParquetFile] = {}
        pending: list[pa.Table] = []
        pending_rows = 0
        for index in self.assignment(self.rank, worker):
            pending.append(self._read(index, files))
            pending_rows += self.row_groups[index].rows
            if pending_rows < self.batch_size:
                continue
            table = pa.concat_tables(pending)
            start = 0
            while table.num_rows - start >= self.batch_size:
                yield table_to_batch(table.slice(start, self.batch_size), self.schema)
                start += self.batch_size
            pending = [table.slice(start)]
            pending_rows = table.num_rows - start
        if pending_rows and not self.drop_last:
            last = table_to_batch(pa.concat_tables(pending), self.schema)
            yield pad_batch(last, self.batch_size, self.schema)


class RankLoader:
    """A DataLoader over `ParquetBatches` that yields exactly `len(self)` batches on every rank."""

    def __init__(self, dataset: ParquetBatches, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=dataset.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        for _ in range(len(self)):
            batch = next(batches, None)
            # Only evaluation can run short here (training stops at the smallest count).
            yield batch if batch is not None else pad_batch(None, self.dataset.batch_size, self.dataset.schema)
