"""Arrow row groups -> numpy rows -> one flat buffer per batch, in `BatchLayout`.

Each row group is converted once, column by column, into a `RowStore`: numpy arrays holding the rows
of a few row groups (the reader's shuffle buffer), optionally in a shuffled order. The sources are
zero-copy numpy views of the Arrow buffers; the one copy lands in the store. A batch is then a few
contiguous runs of the store's rows (one when reading in order), written into one flat buffer: one
allocation and one pass over its bytes, no per-row Python. `data_pipeline.batch` turns a buffer
into a `Batch` (its tensors are views of it).

- dense: float32 [B, D]; nulls become 0.0 (preprocessing should already have imputed them);
- sparse: one key per feature, lengths key-major. A multi-hot `list<int64>` column gives its
  values and lengths straight from the Arrow list's flattened values and offsets (null and empty
  lists have length 0); a scalar id column gives lengths of 1 (0 where the id is null, i.e. missing).

This runs in the loader workers, whose fork server must start fast (`data_pipeline.reader`): numpy,
pyarrow and torch (for `PackedBatch`'s buffer) only, no torchrec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data_pipeline.schema import DatasetSchema

# ---- the flat batch buffer ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchLayout:
    """Where each tensor of a batch lies in its flat byte buffer: [dense | labels | weights | lengths
    | values]. Values (variable count) come last, 8-byte aligned."""

    rows: int
    num_dense: int
    num_keys: int
    num_values: int

    @property
    def offsets(self) -> tuple[int, int, int, int, int]:
        labels = 4 * self.rows * self.num_dense
        weights = labels + 4 * self.rows
        lengths = weights + 4 * self.rows
        values = -(-(lengths + 4 * self.rows * self.num_keys) // 8) * 8
        return labels, weights, lengths, values, values + 8 * self.num_values

    @property
    def nbytes(self) -> int:
        return self.offsets[-1]

    def numpy_views(self, buf: np.ndarray) -> tuple[np.ndarray, ...]:
        """(dense [B, D], labels, weights, lengths [F, B], values) as writable views of `buf`."""
        labels, weights, lengths, values, end = self.offsets
        lengths_end = lengths + 4 * self.rows * self.num_keys
        return (
            buf[:labels].view(np.float32).reshape(self.rows, self.num_dense),
            buf[labels:weights].view(np.float32),
            buf[weights:lengths].view(np.float32),
            buf[lengths:lengths_end].view(np.int32).reshape(self.num_keys, self.rows),
            buf[values:end].view(np.int64),
        )


Runs = list[tuple[int, int]]
"""The rows of a batch in a RowStore: [start, stop) runs, in order (one run when reading in order)."""


def _gather(src: np.ndarray, runs: Runs, out: np.ndarray) -> None:
    """Copy the runs of `src` (along its first axis) one after another into `out`."""
    at = 0
    for start, stop in runs:
        np.copyto(out[at : at + stop - start], src[start:stop], casting="unsafe")
        at += stop - start


def _ragged_index(starts: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """Indices of the values of rows starting at `starts` with `lengths` values each, in row order."""
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(total)


# ---- Arrow -> numpy ------------------------------------------------------------------------------


def _array(table: pa.Table, name: str) -> pa.Array:
    """A column as one Arrow array (a row group read is one chunk; more are combined)."""
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _numbers(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as numpy (zero-copy when it has no nulls); nulls become 0."""
    column = _array(table, name)
    if column.null_count:
        column = pc.fill_null(column, False if pa.types.is_boolean(column.type) else 0)
    return column.to_numpy(zero_copy_only=False)


@dataclass
class _ListIds:
    """A multi-hot feature's ids in a RowStore, laid out like an Arrow list column: row r's ids are
    values[offsets[r]:offsets[r + 1]], so the ids of a run of rows are one contiguous slice."""

    offsets: np.ndarray  # int64 [capacity + 1]
    values: np.ndarray  # int64, grown as needed

    def reserve(self, total: int) -> None:
        if total > len(self.values):
            grown = np.empty(max(total, 2 * len(self.values)), np.int64)
            grown[: len(self.values)] = self.values
            self.values = grown


class RowStore:
    """Rows of a few row groups as numpy arrays of fixed capacity: the reader's shuffle buffer.

    `append` converts an Arrow table (already checked with `check_row_group`) column by column, in
    a given row order; `plan` + `fill` write runs of rows in Batch layout into a flat buffer; `keep`
    moves the rows that are left over to the front and drops the rest. Appending beyond `capacity`
    rows is an error, so the capacity is the memory bound (multi-hot values aside, which grow with
    their rows). The arrays are allocated once and reused: fresh pages cost a fault each.

    A missing scalar id is stored as -1 (valid ids are >= 0), so the 1-id features need no lengths.
    """

    def __init__(self, schema: DatasetSchema, capacity: int) -> None:
        self.schema = schema
        self.capacity = capacity
        self.rows = 0
        self.keys = schema.sparse_names
        self.dense = np.empty((capacity, len(schema.dense)), np.float32)
        self.labels = np.empty(capacity, np.float32)
        self.weights = np.empty(capacity, np.float32)
        scalar = [i for i, f in enumerate(schema.sparse) if not f.multi_hot]
        self.ids = np.empty((len(scalar), capacity), np.int64)
        self.nulls = np.zeros(len(scalar), bool)  # has this scalar feature ever had a missing id?
        # each feature's ids: a row of `self.ids` (one id per row) or a _ListIds (multi-hot)
        self.where: list[int | _ListIds] = [
            _ListIds(np.zeros(capacity + 1, np.int64), np.empty(0, np.int64)) if f.multi_hot else scalar.index(i)
            for i, f in enumerate(schema.sparse)
        ]
        self._dense_rows = np.empty((0, len(schema.dense)), np.float32)  # scratch for shuffled appends

    def append(self, table: pa.Table, order: np.ndarray | None = None) -> None:
        """Add a table's rows, in `order` (a permutation of its rows) if given. Shuffling while
        copying costs little: the gathers read one row group's column, which stays in cache."""
        n = table.num_rows
        if self.rows + n > self.capacity:
            raise ValueError(f"RowStore holds {self.rows} of {self.capacity} rows; cannot add {n}")
        at = slice(self.rows, self.rows + n)

        def put(src: np.ndarray, out: np.ndarray) -> None:
            if order is None:
                np.copyto(out, src, casting="unsafe")
            else:
                np.take(src.astype(out.dtype, copy=False), order, axis=0, out=out, mode="clip")

        schema = self.schema
        if order is None:
            for j, name in enumerate(schema.dense):
                np.copyto(self.dense[at, j], _numbers(table, name), casting="unsafe")
        else:  # stack, then move whole rows: one gather per row instead of one per column
            if len(self._dense_rows) < n:
                self._dense_rows = np.empty((n, len(schema.dense)), np.float32)
            for j, name in enumerate(schema.dense):
                np.copyto(self._dense_rows[:n, j], _numbers(table, name), casting="unsafe")
            put(self._dense_rows[:n], self.dense[at])
        put(_numbers(table, schema.label), self.labels[at])
        if schema.weight:
            put(_numbers(table, schema.weight), self.weights[at])
        else:
            self.weights[at] = 1.0
        for feature, where in zip(schema.sparse, self.where):
            column = _array(table, feature.name)
            if isinstance(where, _ListIds):
                self._append_lists(where, column, at, order)
                continue
            if column.null_count:
                self.nulls[where] = True
                column = pc.fill_null(column.cast(pa.int64()), -1)
            put(column.to_numpy(), self.ids[where, at])
        self.rows += n

    @staticmethod
    def _append_lists(ids: _ListIds, column: pa.Array, at: slice, order: np.ndarray | None) -> None:
        offsets = column.offsets.to_numpy()  # zero-copy; absolute positions in column.values
        values = column.values
        if values.null_count:  # only inside null lists (check_row_group rejects the rest)
            values = pc.fill_null(values, 0)
        values = values.to_numpy()
        lengths = np.diff(offsets)
        if column.null_count:  # a null list may own a (meaningless) stretch of values: length 0
            lengths *= column.is_valid().to_numpy(zero_copy_only=False)
        starts = offsets[:-1]
        if order is not None:
            starts, lengths = starts[order], lengths[order]
        begin = int(ids.offsets[at.start])
        np.cumsum(lengths, out=ids.offsets[at.start + 1 : at.stop + 1])
        ids.offsets[at.start + 1 : at.stop + 1] += begin
        total = int(ids.offsets[at.stop]) - begin
        ids.reserve(begin + total)
        out = ids.values[begin : begin + total]
        if order is None and not column.null_count:  # already contiguous, in row order
            np.copyto(out, values[offsets[0] : offsets[-1]], casting="unsafe")
        else:
            index = _ragged_index(starts, lengths, total)
            np.take(values.astype(np.int64, copy=False), index, out=out, mode="clip")

    def plan(self, runs: Runs) -> tuple[BatchLayout, list[int]]:
        """The layout of a batch of `runs`, and its per-key value counts."""
        rows = sum(stop - start for start, stop in runs)
        counts = []
        for where in self.where:
            if isinstance(where, _ListIds):
                counts.append(sum(int(where.offsets[b] - where.offsets[a]) for a, b in runs))
            elif self.nulls[where]:
                counts.append(sum(int(np.count_nonzero(self.ids[where, a:b] >= 0)) for a, b in runs))
            else:
                counts.append(rows)
        return BatchLayout(rows, self.dense.shape[1], len(self.keys), sum(counts)), counts

    def fill(self, runs: Runs, layout: BatchLayout, counts: list[int], buf: np.ndarray) -> None:
        """Write the rows of `runs` into `buf` (uint8, at least `layout.nbytes`)."""
        dense, labels, weights, lengths, values = layout.numpy_views(buf)
        _gather(self.dense, runs, dense)
        _gather(self.labels, runs, labels)
        _gather(self.weights, runs, weights)
        rows, end, k = layout.rows, 0, 0
        while k < len(self.where):
            where, out_lengths, count = self.where[k], lengths[k], counts[k]
            if isinstance(where, _ListIds):
                out = values[end : end + count]
                row = value = 0
                for a, b in runs:
                    offsets, first, last = where.offsets, where.offsets[a], where.offsets[b]
                    lengths_out = out_lengths[row : row + b - a]
                    np.subtract(offsets[a + 1 : b + 1], offsets[a:b], out=lengths_out, casting="unsafe")
                    out[value : value + last - first] = where.values[first:last]
                    row, value = row + b - a, value + last - first
                k, end = k + 1, end + count
            elif count == rows:  # no id missing: it and the next such features (rows of self.ids) in one gather
                g = 1
                while k + g < len(self.where) and self.where[k + g] == where + g and counts[k + g] == rows:
                    g += 1
                lengths[k : k + g] = 1
                out = values[end : end + g * rows].reshape(g, rows)
                _gather(self.ids[where : where + g].T, runs, out.T)  # one strided copy per run, not per feature
                k, end = k + g, end + g * rows
            else:
                ids = np.concatenate([self.ids[where, a:b] for a, b in runs])
                np.greater_equal(ids, 0, out=out_lengths)
                np.compress(out_lengths, ids, out=values[end : end + count])
                k, end = k + 1, end + count

    def keep(self, rows: np.ndarray | slice) -> None:
        """Keep only `rows` (moved to the front, in this order); drop every other row."""
        n = len(rows) if isinstance(rows, np.ndarray) else rows.stop - rows.start
        self.dense[:n] = self.dense[rows]
        self.labels[:n] = self.labels[rows]
        self.weights[:n] = self.weights[rows]
        self.ids[:, :n] = self.ids[:, rows]
        for where in self.where:
            if not isinstance(where, _ListIds):
                continue
            if isinstance(rows, slice):
                first, last = where.offsets[rows.start], where.offsets[rows.stop]
                kept = where.values[first:last]
                where.offsets[1 : n + 1] = where.offsets[rows.start + 1 : rows.stop + 1] - first
            else:
                starts, lengths = where.offsets[rows], where.offsets[rows + 1] - where.offsets[rows]
                kept = where.values[_ragged_index(starts, lengths, int(lengths.sum()))]
                np.cumsum(lengths, out=where.offsets[1 : n + 1])
            where.values[: len(kept)] = kept
        self.rows = n


@dataclass
class PackedBatch:
    """A batch in its own flat buffer (`buf`, in shared memory on its way from a worker): when no
    ring slot was free, it did not fit one, or it is a worker's last, partial batch."""

    layout: BatchLayout
    length_per_key: list[int]
    buf: torch.Tensor  # uint8 [layout.nbytes]

    @classmethod
    def of(cls, store: RowStore, runs: Runs) -> PackedBatch:
        layout, counts = store.plan(runs)
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        store.fill(runs, layout, counts, buf.numpy())
        return cls(layout, counts, buf)

    def pin_memory(self) -> PackedBatch:
        """Called by the DataLoader's pin thread: the buffer, page-locked."""
        return PackedBatch(self.layout, self.length_per_key, self.buf.pin_memory())
