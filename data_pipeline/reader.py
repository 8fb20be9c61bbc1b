"""Parquet -> Batch stream for one rank, split by rows across ranks and DataLoader workers.

How work is split (`plan_shares`: the same on every rank, from Parquet footers, no collective):
  - the split's row groups are listed in file order and, when shuffling, permuted by (seed, epoch);
    concatenated in that order they are one sequence of N rows;
  - rank r of W takes the contiguous rows [r*N//W, (r+1)*N//W) of it (equal shares, +-1 row), as
    pieces: whole row groups, except that its first and last piece may be part of one;
  - a rank's pieces are dealt, in order, each to its least-loaded worker (by rows; a piece is never
    split, so with fewer pieces than workers some workers are idle); each worker streams its pieces
    into batches of exactly `batch_size` rows.
Decoding: a whole row group is read with `read_row_group`; a piece that ends before its row group's
end stops decoding there (`iter_batches`); a piece that starts inside a row group decodes it from its
first row and drops the rows before. Only a rank's first piece can start inside a row group, so a
rank decodes at most its share plus one row group per epoch (`Piece.decoded`).
Shuffling also mixes rows across pieces, in a bounded buffer: a worker reads pieces until it holds
at least `shuffle_buffer_rows` rows (never more than that plus one row group), emits all the full
batches of a random permutation of those rows, and carries the rest (less than a batch) into the
next window. Inside a batch, rows come grouped by the piece they were drawn from (a batch's loss is
a mean: only which rows share a batch matters). Everything is seeded by (seed, epoch, rank,
worker), so a run can be repeated exactly with the same number of ranks and workers.

Every rank yields the same number of batches, because sharded embedding lookups are collectives
and one rank with an extra batch would hang the others:
  - training (`drop_last=True`) drops each worker's final partial batch and stops every rank at the
    smallest per-rank count: fewer than W x (batch_size x workers + 1) rows are skipped per epoch;
  - evaluation (`drop_last=False`) pads each worker's final partial batch, and ranks with fewer
    batches add all-padding batches, with weight-0 rows, so every row is scored exactly once.
`SPLIT_RULE` numbers this rule; checkpoints record it (`trainer.state.DataOrder`).

Workers hand batches to the training process through a small ring of shared-memory slots per
worker instead of a fresh shared-memory segment per batch (see `data_pipeline.loader.RankLoader`). They are started by
a fork server, never forked from the training process itself: by the time a loader starts, that
process runs gloo/NCCL, OpenMP and TensorBoard threads, and a fork taken while one of them holds a
lock can leave the child hung (seen here: an evaluation worker stuck right after fork).
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
import torch.multiprocessing as mp
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.rows import BatchLayout, PackedBatch, RowStore, Runs
from data_pipeline.schema import DataError, DatasetSchema, check_files, check_row_group
from data_pipeline.storage import parquet_file

if TYPE_CHECKING:  # only the training process builds Batches (see ParquetBatches.__iter__)
    from data_pipeline.batch import Batch

DEFAULT_SHUFFLE_BUFFER_ROWS = DataConfig.shuffle_buffer_rows

SPLIT_RULE = 2
"""The rule splitting a split's rows across ranks and workers, recorded in checkpoints: 1 (before)
gave rank r every W-th row group; 2 (`plan_shares`) gives it a contiguous range of rows."""


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
        metadata = parquet_file(path).metadata
        groups += [RowGroup(path, i, metadata.row_group(i).num_rows) for i in range(metadata.num_row_groups)]
    return groups


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of row group `group` (an index into the split's list of row groups)."""

    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def decoded(self) -> int:
        """Rows decoded to read it: decoding starts at the row group's first row and stops at `stop`."""
        return self.stop


@dataclass(frozen=True)
class Plan:
    """One epoch's split (see `plan_shares`)."""

    shares: list[list[list[Piece]]]
    """[rank][worker] -> the pieces that worker reads, in reading order."""
    batches: list[int]
    """Batches each rank produces, before equalisation."""
    length: int
    """Batches every rank yields: the smallest count when training, the largest when evaluating."""


def plan_shares(
    group_rows: list[int], order: list[int], world_size: int, workers: int, batch_size: int, drop_last: bool
) -> Plan:
    """Split the rows of row groups `order` (indices into `group_rows`, the reading order) into
    `world_size` contiguous, equal (+-1 row) ranges, one per rank, and deal each rank's pieces to
    its `workers` (each to the least-loaded worker by rows, ties to the lowest). A rank's batches:
    the sum over its workers of rows // batch_size (`drop_last`) or of ceil(rows / batch_size)."""
    if world_size < 1 or workers < 1 or batch_size < 1:
        raise ValueError(f"need world_size, workers and batch_size >= 1, got {world_size}, {workers}, {batch_size}")
    total = sum(group_rows[g] for g in order)
    shares, batches = [], []
    k, before = 0, 0  # the row group order[k] being cut, and the rows of the groups before it
    for rank in range(world_size):
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        pieces = []
        while lo < hi:
            while before + group_rows[order[k]] <= lo:  # (also steps over empty row groups)
                before += group_rows[order[k]]
                k += 1
            group = order[k]
            stop = min(hi - before, group_rows[group])
            pieces.append(Piece(group, lo - before, stop))
            lo = before + stop
        dealt: list[list[Piece]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for piece in pieces:
            w = loads.index(min(loads))
            dealt[w].append(piece)
            loads[w] += piece.rows
        shares.append(dealt)
        batches.append(sum(r // batch_size if drop_last else -(-r // batch_size) for r in loads))
    return Plan(shares, batches, min(batches) if drop_last else max(batches))


class ParquetBatches(IterableDataset):
    """The batches of one rank's (and, inside a DataLoader worker, one worker's) share of a split."""

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
        shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle_buffer_rows < 0:
            raise ValueError(f"shuffle_buffer_rows must be >= 0, got {shuffle_buffer_rows}")
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
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.epoch = 0
        self.row_groups = list_row_groups(check_files(schema, split))
        self.transport: Transport | None = None  # set by RankLoader for the workers it starts
        self._plan: tuple[tuple, Plan] | None = None  # (what it was planned for, the plan)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating; same value on every rank)."""
        self.epoch = epoch

    def plan(self) -> Plan:
        """This epoch's split across ranks and workers (computed once per epoch)."""
        key = (self.epoch, self.shuffle, self.seed, self.world_size, self.shares, self.batch_size, self.drop_last)
        if self._plan is None or self._plan[0] != key:
            order = np.arange(len(self.row_groups))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
            rows = [group.rows for group in self.row_groups]
            plan = plan_shares(rows, order.tolist(), self.world_size, self.shares, self.batch_size, self.drop_last)
            self._plan = (key, plan)
        return self._plan[1]

    def assignment(self, rank: int, worker: int) -> list[Piece]:
        """The pieces of `self.row_groups` read by this rank's worker, in reading order."""
        return self.plan().shares[rank][worker]

    def batches_of(self, rank: int) -> int:
        """How many batches `rank` produces this epoch, before equalisation across ranks."""
        return self.plan().batches[rank]

    def __len__(self) -> int:
        """Batches per rank this epoch: the same on every rank (see module docstring)."""
        return self.plan().length

    def window_rows(self) -> int:
        """Rows a worker gathers before it emits batches: the shuffle buffer, at least one batch."""
        return max(self.shuffle_buffer_rows, self.batch_size) if self.shuffle else self.batch_size

    def _read(self, piece: Piece) -> pa.Table:
        group = self.row_groups[piece.group]
        columns = self.schema.columns()
        try:
            # Opened per piece: a kept-open file holds on to its last pre-buffered row group, so
            # memory would grow with the number of files. pre_buffer: one coalesced read per row
            # group (also pyarrow.parquet.read_table's default). use_threads=False: one core per
            # worker; parallelism comes from the workers, not Arrow's thread pool.
            with parquet_file(group.file, pre_buffer=True) as file:
                if piece.stop == group.rows:
                    table = file.read_row_group(group.index, columns=columns, use_threads=False)
                else:  # decode no further than the piece's last row
                    parts, rows = [], 0
                    for part in file.iter_batches(
                        batch_size=piece.stop, row_groups=[group.index], columns=columns, use_threads=False
                    ):
                        parts.append(part)
                        rows += part.num_rows
                        if rows >= piece.stop:
                            break
                    table = pa.Table.from_batches(parts) if parts else None
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{group}: cannot be read ({e})") from None
        if table is None or table.num_rows < piece.stop:
            raise DataError(f"{group}: holds fewer rows than the {group.rows} its footer lists")
        check_row_group(self.schema, table, str(group))  # before slicing: rows counted from the group's start
        return table.slice(piece.start, piece.rows) if piece.rows < table.num_rows else table

    def row_batches(self, worker: int) -> Iterator[tuple[RowStore, Runs]]:
        """(store, rows) for each batch of this rank's `worker`: full batches, then, if `drop_last`
        is off, the last partial one. The rows are valid until the next item is asked for."""
        pieces = self.assignment(self.rank, worker)
        target = self.window_rows()
        largest = max((piece.rows for piece in pieces), default=0)
        store = RowStore(self.schema, capacity=target - 1 + largest)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        blocks: list[list[int]] = []  # [next, end) of each piece in the store
        for n, piece in enumerate(pieces):
            table = self._read(piece)
            blocks.append([store.rows, store.rows + table.num_rows])
            store.append(table, rng.permutation(table.num_rows) if self.shuffle else None)
            if store.rows >= target or n == len(pieces) - 1:
                yield from self._drain(store, blocks, rng)
        if store.rows and not self.drop_last:
            yield store, [(0, store.rows)]

    def _drain(
        self, store: RowStore, blocks: list[list[int]], rng: np.random.Generator
    ) -> Iterator[tuple[RowStore, Runs]]:
        """Emit every full batch the store holds; keep the rest (less than a batch) for later.

        Shuffled, each block (piece) was stored in random order, so drawing a batch's count
        from each block by sampling rows without replacement (multivariate hypergeometric) and
        taking that many rows from the block's front gives batches distributed exactly as those of
        a random permutation of all the rows, while reading contiguous runs of memory.
        """
        b, full = self.batch_size, store.rows // self.batch_size
        if not self.shuffle:
            for i in range(full):
                yield store, [(i * b, (i + 1) * b)]
            store.keep(slice(full * b, store.rows))
        else:
            for _ in range(full):
                counts = rng.multivariate_hypergeometric([end - next for next, end in blocks], b)
                yield store, [(block[0], block[0] + c) for block, c in zip(blocks, counts) if c]
                for block, c in zip(blocks, counts):
                    block[0] += c
            store.keep(rng.permutation(_runs(blocks)))  # the rest, as one block in random order
        blocks[:] = [[0, store.rows]]

    def __iter__(self) -> Iterator[Batch | SharedBatch | PackedBatch]:
        """Batches, in this process; in a DataLoader worker, their buffers (a ring slot when one is
        free, else a `PackedBatch`), which `RankLoader` turns into Batches: a worker never builds
        one, so its process needs no torchrec (see `worker_context`)."""
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if (0 if info is None else info.num_workers) != self.num_workers:
            raise RuntimeError(f"built for {self.num_workers} loader workers, run with {info and info.num_workers}")
        if info is None:
            yield from self._batches()
            return
        ring = _Ring(worker, self.transport.free[worker], self.transport.slots) if self.transport else None
        for store, runs in self.row_batches(worker):
            full = sum(stop - start for start, stop in runs) == self.batch_size
            item = ring.put(store, runs) if ring is not None and full else None
            yield PackedBatch.of(store, runs) if item is None else item

    def _batches(self) -> Iterator[Batch]:
        from data_pipeline.batch import batch_of, pad_batch  # the training process: torchrec is loaded

        for store, runs in self.row_batches(0):
            yield pad_batch(batch_of(store, runs), self.batch_size, self.schema)


def _runs(ranges: list[list[int]]) -> np.ndarray:
    """The row indices of [start, stop) ranges, in order."""
    return np.concatenate([np.arange(start, stop) for start, stop in ranges] or [np.arange(0)])


# ---- worker -> training process transport -----------------------------------------------------


@dataclass
class Transport:
    free: list[SimpleQueue]  # per worker: slots the training process has copied out
    slots: int  # ring slots per worker


@dataclass
class SharedBatch:
    """A batch waiting in slot `slot` of worker `worker`'s ring; `ring` is sent once per worker."""

    worker: int
    slot: int
    layout: BatchLayout
    length_per_key: list[int]
    ring: torch.Tensor | None

    def pin_memory(self) -> SharedBatch:
        return self  # the DataLoader's pin thread must not copy the ring; RankLoader pins the copy


class _Ring:
    """Worker side of a ring of shared-memory batch slots.

    Handing a tensor to the training process normally moves it into a fresh shared-memory segment:
    the worker allocates, zero-fills and copies it, and the other side maps it and takes a page
    fault per page, which costs about as much as decoding the batch. A ring is allocated once per
    worker (with slots for every batch that can be in flight) and then only slot numbers travel;
    the training process copies each batch out and hands its slot back through `free`. If no slot
    is free or a batch does not fit, the batch goes the normal way.
    """

    def __init__(self, worker: int, free: SimpleQueue, slots: int) -> None:
        self.worker, self.free, self.slots = worker, free, slots
        self.buffer: torch.Tensor | None = None
        self.idle: list[int] = []
        self.sent = False

    def put(self, store: RowStore, runs: Runs) -> SharedBatch | None:
        layout, counts = store.plan(runs)
        if self.buffer is None:
            # Size slots from the first batch, with room for 50% more ids; 64-byte aligned.
            roomy = BatchLayout(layout.rows, layout.num_dense, layout.num_keys, layout.num_values * 3 // 2)
            slot_bytes = -(-roomy.nbytes // 64) * 64
            self.buffer = torch.empty(self.slots, slot_bytes, dtype=torch.uint8).share_memory_()
            self.idle = list(range(self.slots))
        while not self.free.empty():
            self.idle.append(self.free.get())
        if not self.idle or layout.nbytes > self.buffer.shape[1]:
            return None
        slot = self.idle.pop()
        store.fill(runs, layout, counts, self.buffer[slot].numpy())
        ring, self.sent = (None if self.sent else self.buffer), True
        return SharedBatch(self.worker, slot, layout, counts, ring)


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What schedulers preempt with (trainer/preempt.py); a rank's loader processes ignore them."""


def start_worker(owner: int, log_levels: dict[str, int], worker_id: int) -> None:
    """Worker init: the rank's levels for the loggers it names (a worker is a fresh process from
    the fork server, which has none of the rank's logging setup), then `_exit_with(owner)`."""
    for name, level in log_levels.items():
        logging.getLogger(name).setLevel(level)
    _exit_with(owner, worker_id)


def _exit_with(owner: int, worker_id: int) -> None:
    """Worker init: end this worker as soon as process `owner` (the one iterating the loader) is gone.

    A worker's parent is the fork server, not `owner`, so the DataLoader's own check (has the
    parent pid changed?) never fires: after a SIGKILLed rank its workers, and the fork server they
    keep alive, would linger forever (and hold a launcher's output pipes open). A pidfd becomes
    readable when the process exits, with no pid-reuse race.

    The signals a scheduler preempts with are ignored here: torchrun and terminals signal the
    whole process group, and a worker that died of it would crash the rank before it could save
    (trainer/preempt.py); the rank decides when to stop, and its workers end with it (or are
    killed by `_kill_workers_at_exit`)."""
    for sig in PREEMPTION_SIGNALS:  # already ignored (inherited from the fork server); kept for other contexts
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        try:
            pidfd = os.pidfd_open(owner)
        except ProcessLookupError:
            os._exit(1)
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def _kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the workers still running (a rank that raised mid-epoch).

    multiprocessing's own exit hook ends daemonic children with SIGTERM and then joins them, and
    these workers ignore SIGTERM (`_exit_with`): without this the rank would wait forever. atexit
    runs hooks last-registered first, so this one runs before multiprocessing's."""
    for child in mp.active_children():
        if child.daemon:
            child.kill()


def worker_context() -> mp.context.BaseContext:
    """The "forkserver" context, its server preloaded with this module (torch, numpy, pyarrow; no
    torchrec: workers send buffers, `data_pipeline.loader` builds the Batches), so that starting a
    worker is a fork of a small single-threaded process, not a fresh interpreter. The server is
    started now (one per process, about 2 s of imports, done in the background while the model is
    built; 3.5 s while it also loaded torchrec), not when the first batch is wanted."""
    atexit.unregister(_kill_workers_at_exit)  # registered once, after multiprocessing's hook
    atexit.register(_kill_workers_at_exit)
    mp.set_forkserver_preload([__name__])
    # The fork server starts with the preemption signals ignored (an ignored disposition survives
    # fork and exec; a handler does not), and so does every worker from its first instruction:
    # torchrun signals each rank's whole process group, and a server or a worker still starting
    # when SIGTERM came would die of it and crash its rank before the rank could checkpoint.
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in PREEMPTION_SIGNALS} if main else {}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return mp.get_context("forkserver")
