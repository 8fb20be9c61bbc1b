"""`Batch(dense, sparse=KeyedJaggedTensor, labels, weights)`: a flat buffer of rows
(`data_pipeline.rows`) seen as tensors, and the padding evaluation needs.

The KJT carries its per-key value counts, so no consumer has to sync a device to get them. Batches
are assembled in the training process: the loader workers send buffers (`data_pipeline.reader`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data_pipeline.rows import BatchLayout, PackedBatch, RowStore, Runs
from data_pipeline.schema import DatasetSchema


@dataclass
class Batch(Pipelineable):
    """One batch of rows. `Pipelineable` so torchrec's train pipelines can move it between streams."""

    dense: torch.Tensor  # [B, num_dense] float32
    sparse: KeyedJaggedTensor  # one key per sparse feature, stride B
    labels: torch.Tensor  # [B] float32
    weights: torch.Tensor  # [B] float32; 0 marks a padding row (eval) that counts nowhere

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            dense=self.dense.to(device=device, non_blocking=non_blocking),
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            weights=self.weights.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)
        self.weights.record_stream(stream)

    def pin_memory(self) -> Batch:
        """Page-locked copy (a no-op for tensors already pinned), so `to(cuda, non_blocking=True)`
        overlaps with compute. Called by the DataLoader's pin thread when `pin_memory=True`."""
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]


def assemble(layout: BatchLayout, buf: torch.Tensor, keys: list[str], length_per_key: list[int]) -> Batch:
    """The Batch whose tensors are views of `buf` (uint8, at least `layout.nbytes` long)."""
    labels, weights, lengths, values, end = layout.offsets
    rows = layout.rows
    return Batch(
        dense=buf[:labels].view(torch.float32).view(rows, layout.num_dense),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=buf[values:end].view(torch.int64),
            lengths=buf[lengths : lengths + 4 * rows * layout.num_keys].view(torch.int32),
            stride=rows,
            length_per_key=length_per_key,
            offset_per_key=[0, *np.cumsum(length_per_key).tolist()],
        ),
        labels=buf[labels:weights].view(torch.float32),
        weights=buf[weights:lengths].view(torch.float32),
    )


def batch_of(store: RowStore, runs: Runs) -> Batch:
    """The rows of `runs` as a Batch in a fresh buffer."""
    packed = PackedBatch.of(store, runs)
    return assemble(packed.layout, packed.buf, store.keys, packed.length_per_key)


def table_to_batch(table: pa.Table, schema: DatasetSchema) -> Batch:
    """Convert an Arrow table (already checked with `check_row_group`) to a Batch."""
    store = RowStore(schema, table.num_rows)
    store.append(table)
    return batch_of(store, [(0, table.num_rows)])


def pad_batch(batch: Batch | None, batch_size: int, schema: DatasetSchema) -> Batch:
    """Extend `batch` (or nothing) to `batch_size` rows with weight-0 rows that have no ids.

    Evaluation pads instead of dropping so that every row is scored and every rank runs the same
    number of equally sized batches (sharded lookups are collectives: an uneven count would hang).
    """
    n = 0 if batch is None else batch.batch_size
    pad = batch_size - n
    keys = schema.sparse_names
    if pad == 0:
        return batch  # type: ignore[return-value]
    dense_pad = torch.zeros(pad, len(schema.dense))
    zeros = torch.zeros(pad)
    if batch is None:
        return Batch(
            dense=dense_pad,
            sparse=KeyedJaggedTensor(
                keys=keys,
                values=torch.zeros(0, dtype=torch.int64),
                lengths=torch.zeros(pad * len(keys), dtype=torch.int32),
                stride=pad,
                length_per_key=[0] * len(keys),
                offset_per_key=[0] * (len(keys) + 1),
            ),
            labels=zeros,
            weights=zeros.clone(),
        )
    # lengths are key-major: [key0 rows..., key1 rows...]; append `pad` zeros after each key's rows.
    lengths = batch.sparse.lengths().view(len(keys), n)
    lengths = torch.cat([lengths, lengths.new_zeros(len(keys), pad)], dim=1).reshape(-1)
    return Batch(
        dense=torch.cat([batch.dense, dense_pad]),
        sparse=KeyedJaggedTensor(
            keys=keys,
            values=batch.sparse.values(),
            lengths=lengths,
            stride=batch_size,
            length_per_key=batch.sparse.length_per_key(),
            offset_per_key=batch.sparse.offset_per_key(),
        ),
        labels=torch.cat([batch.labels, zeros]),
        weights=torch.cat([batch.weights, zeros]),
    )
