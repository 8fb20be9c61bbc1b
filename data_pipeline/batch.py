"""Arrow columns -> `Batch(dense, sparse=KeyedJaggedTensor, labels, weights)`, without a per-row loop.

A multi-hot `list<int64>` column gives the KJT's values and lengths straight from the Arrow list's
flattened values and offsets; a scalar id column gives lengths of 1 (0 where the id is null, i.e.
missing). Dense nulls become 0.0 (preprocessing should already have imputed them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data_pipeline.schema import DatasetSchema


@dataclass
class Batch(Pipelineable):
    """One batch of rows. `Pipelineable` so torchrec's train pipelines can move it between streams."""

    dense: torch.Tensor  # [B, num_dense] float32
    sparse: KeyedJaggedTensor  # one key per sparse feature, stride B
    labels: torch.Tensor  # [B] float32 in [0, 1]
    weights: torch.Tensor  # [B] float32; 0 marks a padding row (eval) that counts nowhere

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
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

    def pin_memory(self) -> "Batch":
        return Batch(
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]


def _float_column(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.float32())
    return pc.fill_null(column, 0).to_numpy().astype(np.float32, copy=False)


def _ids_and_lengths(column: pa.ChunkedArray, multi_hot: bool) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    if multi_hot:
        lengths = pc.fill_null(pc.list_value_length(array), 0)
        values = pc.list_flatten(array)  # respects the slice's offsets; skips null lists
    else:
        lengths = pc.cast(array.is_valid(), pa.int32())
        values = array.drop_null()
    return (
        values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        lengths.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
    )


def table_to_batch(table: pa.Table, schema: DatasetSchema) -> Batch:
    """Convert an Arrow table (already checked with `check_row_group`) to a Batch."""
    n = table.num_rows
    dense = np.stack([_float_column(table.column(c)) for c in schema.dense], axis=1) if schema.dense else np.zeros((n, 0), np.float32)
    values, lengths = zip(*(_ids_and_lengths(table.column(f.name), f.multi_hot) for f in schema.sparse))
    weights = _float_column(table.column(schema.weight)) if schema.weight else np.ones(n, np.float32)
    return Batch(
        dense=torch.from_numpy(np.ascontiguousarray(dense)),
        sparse=KeyedJaggedTensor(
            keys=schema.sparse_names,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=n,
        ),
        labels=torch.from_numpy(_float_column(table.column(schema.label))),
        weights=torch.from_numpy(weights),
    )


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
            ),
            labels=zeros,
            weights=zeros.clone(),
        )
    # lengths are key-major: [key0 rows..., key1 rows...]; append `pad` zeros after each key's rows.
    lengths = batch.sparse.lengths().view(len(keys), n)
    lengths = torch.cat([lengths, lengths.new_zeros(len(keys), pad)], dim=1).reshape(-1)
    return Batch(
        dense=torch.cat([batch.dense, dense_pad]),
        sparse=KeyedJaggedTensor(keys=keys, values=batch.sparse.values(), lengths=lengths, stride=batch_size),
        labels=torch.cat([batch.labels, zeros]),
        weights=torch.cat([batch.weights, zeros]),
    )
