"""`RankLoader`: the training process's side of a rank's loader. Its workers send buffers
(`data_pipeline.reader`); Batches are assembled here, where torchrec is loaded."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.batch import Batch, assemble, pad_batch
from data_pipeline.reader import ParquetBatches, SharedBatch, Transport, start_worker, worker_context
from data_pipeline.rows import PackedBatch


class RankLoader:
    """A DataLoader over `ParquetBatches` that yields exactly `len(self)` batches on every rank.

    With workers, batches arrive through per-worker shared-memory rings (see `reader._Ring`): each
    is copied out into private memory, or straight into pinned memory when `pin_memory` (the copy
    the pin thread would otherwise make), and its slot is handed back at once. A batch that came
    without a slot (`PackedBatch`) is used in place; a worker's last, partial batch is padded here.
    """

    def __init__(
        self, dataset: ParquetBatches, pin_memory: bool = False, log_levels: dict[str, int] | None = None
    ) -> None:
        """`log_levels`: {logger name: level} set in each worker (the rank's quiet third-party loggers)."""
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.context = worker_context() if dataset.num_workers else None
        self.loader = DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=dataset.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            multiprocessing_context=self.context,
            worker_init_fn=functools.partial(start_worker, os.getpid(), dict(log_levels or {}))
            if dataset.num_workers
            else None,
        )
        # Ring slots per worker: every batch a worker can have in flight (prefetched, being
        # received, being written). 0: no ring, every batch goes the normal way.
        self.ring_slots = self.loader.prefetch_factor + 2 if dataset.num_workers else 0

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        free = [self.context.SimpleQueue() for _ in range(self.dataset.num_workers)]
        if free:
            # Set before the workers start: the dataset, queues included, is sent to each as it starts.
            self.dataset.transport = Transport(free, slots=self.ring_slots)
        batches = iter(self.loader)
        self.dataset.transport = None  # the workers have their copy; in-process iteration needs none
        rings: dict[int, torch.Tensor] = {}
        keys, size, schema = self.dataset.schema.sparse_names, self.dataset.batch_size, self.dataset.schema
        for _ in range(len(self)):
            item = next(batches, None)
            if isinstance(item, SharedBatch):
                item = self._copy_out(item, rings, free[item.worker], keys)
            elif isinstance(item, PackedBatch):
                item = assemble(item.layout, item.buf, keys, item.length_per_key)
            if item is None or item.batch_size < size:  # evaluation: padded, see reader's docstring
                item = pad_batch(item, size, schema)
                item = item.pin_memory() if self.pin_memory else item
            yield item

    def _copy_out(self, item: SharedBatch, rings: dict[int, torch.Tensor], free, keys: list[str]) -> Batch:
        """The batch in a ring slot, copied into a buffer of its own; the slot is handed back."""
        if item.ring is not None:
            rings[item.worker] = item.ring
        buf = torch.empty(item.layout.nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        # numpy: one thread (torch's copy_ would wake its OpenMP pool, which then spins)
        np.copyto(buf.numpy(), rings[item.worker][item.slot, : item.layout.nbytes].numpy())
        free.put(item.slot)
        return assemble(item.layout, buf, keys, item.length_per_key)
