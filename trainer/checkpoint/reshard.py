"""Loading a checkpoint into a model or plan it was not saved with: DCP reshards tensors whose
global shape is unchanged; what remains is checked or converted here.

- `check_shapes`: every model tensor must be in the checkpoint with its shape (or the load fails
  with a list of what differs, before any rank enters the collective load);
- `convertible_states`: rowwise Adagrad's one value per row is laid out per column shard, so a
  table cut into another number of column shards has another optimizer-state shape; such states
  are loaded whole and `set_rowwise_state` converts them (exact when shards merge);
- `init_from`: fine-tuning: load the weights that fit, copy the saved rows of tables that grew,
  and report what was loaded, resized and initialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from trainer.checkpoint.safe_reader import read_metadata, safe_reader
from trainer.checkpoint.store import CheckpointError
from trainer.optim import TABLE_WEIGHT


def tensor_size(value: Any) -> tuple[int, ...] | None:
    return tuple(value.size()) if isinstance(value, torch.Tensor) else None


def column_widths(chunks) -> list[int]:
    """Widths of a 2-D table's column shards, left to right (one width for an unsplit table)."""
    widths = {}
    for chunk in chunks:
        widths[int(chunk.offsets[1])] = int(chunk.sizes[1])
    return [widths[k] for k in sorted(widths)]


def grown_view(value: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A tensor of `rows` rows whose storage is the first `rows` rows of `value` (a table that has
    grown since the checkpoint): loading into it fills the old rows in place. For a ShardedTensor,
    each local shard is cut to the rows below `rows`; shards entirely above hold nothing."""
    if not isinstance(value, ShardedTensor):
        return value[:rows]
    metadata = value.metadata()

    def cut(meta: ShardMetadata) -> ShardMetadata | None:
        start, height = meta.shard_offsets[0], meta.shard_sizes[0]
        if start >= rows:
            return None
        return ShardMetadata(
            shard_offsets=list(meta.shard_offsets),
            shard_sizes=[min(height, rows - start), *meta.shard_sizes[1:]],
            placement=meta.placement,
        )

    shards_metadata = [m for m in (cut(m) for m in metadata.shards_metadata) if m is not None]
    local = []
    for shard in value.local_shards():
        meta = cut(shard.metadata)
        if meta is not None:
            local.append(Shard(shard.tensor[: meta.shard_sizes[0]], meta))
    global_metadata = ShardedTensorMetadata(
        shards_metadata=shards_metadata,
        size=torch.Size([rows, *value.size()[1:]]),
        tensor_properties=metadata.tensor_properties,
    )
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, global_metadata, process_group=value._process_group
    )


def check_shapes(state: dict, metadata: Metadata, path: Path) -> None:
    """Every model tensor of this run must be in the checkpoint with its shape."""
    saved = metadata.state_dict_metadata
    missing, shapes = [], []
    for key, value in state["model"].items():
        entry = saved.get(f"model.{key}")
        if not isinstance(entry, TensorStorageMetadata):
            missing.append(key)
        elif tuple(entry.size) != tensor_size(value):
            shapes.append(f"{key}: {list(entry.size)} in the checkpoint, {list(tensor_size(value))} now")
    ours = {f"model.{k}" for k in state["model"]}
    extra = sorted(k[len("model.") :] for k in saved if k.startswith("model.") and k not in ours)
    if missing or shapes or extra:
        lines = [f"shape differs: {s}" for s in shapes] + [f"not in the checkpoint: {k}" for k in missing]
        lines += [f"in the checkpoint, not in this model: {k}" for k in extra]
        raise CheckpointError(
            f"checkpoint {path} does not fit this model:\n  "
            + "\n  ".join(lines[:20])
            + (f"\n  ... {len(lines) - 20} more" if len(lines) > 20 else "")
        )


def convertible_states(state: dict, metadata: Metadata) -> dict:
    """Optimizer states whose global shape changed with the plan: torchrec lays a row-wise state
    (rowwise Adagrad's one value per row) of a table cut into C column shards out as C x rows
    values. Such entries are swapped for a full tensor of the saved shape, converted after the
    load; any other mismatch is an error."""
    saved = metadata.state_dict_metadata
    converted, problems = {}, []
    for param, states in state["optim"].items():
        for key, value in states.items():
            entry = saved.get(f"optim.{param}.{key}")
            if not isinstance(entry, TensorStorageMetadata):
                problems.append(f"optimizer state {param} {key}: not in the checkpoint")
                continue
            size, saved_size = tensor_size(value), tuple(entry.size)
            if saved_size == size:
                continue
            weight = saved.get(f"model.{param}")
            rows = int(weight.size[0]) if isinstance(weight, TensorStorageMetadata) else 0
            if rows and size and len(size) == len(saved_size) == 1 and size[0] % rows == saved_size[0] % rows == 0:
                full = torch.empty(entry.size, dtype=entry.properties.dtype)
                converted[(param, key)] = (full, column_widths(weight.chunks), value)
                states[key] = full
            else:
                problems.append(
                    f"optimizer state {param} {key}: {list(saved_size)} in the checkpoint, {list(size)} now"
                )
    if problems:
        raise CheckpointError(
            "the checkpoint's optimizer state does not fit this run:\n  " + "\n  ".join(problems[:20])
        )
    return converted


def set_rowwise_state(target: torch.Tensor, full: torch.Tensor, widths: list[int]) -> None:
    if len(widths) == 1:
        per_row = full
    else:  # the whole row's mean (each shard's value is the mean over its columns)
        w = torch.tensor(widths, dtype=full.dtype)
        per_row = (full.view(len(widths), -1) * w[:, None]).sum(0) / w.sum()
    if not isinstance(target, ShardedTensor):  # a replicated (data_parallel) table's: one value per row
        target.copy_(per_row.view_as(target))
        return
    rows = per_row.numel()
    for shard in target.local_shards():
        start = shard.metadata.shard_offsets[0] % rows
        shard.tensor.copy_(per_row[start : start + shard.tensor.numel()])


def init_from(model: nn.Module, path: Path) -> str:
    """Load the model weights of checkpoint `path` that fit: same shape, or a table that grew
    (its saved rows are copied). Returns a report of what was loaded, resized and initialised."""
    metadata = read_metadata(path)
    saved = {
        k[len("model.") :]: v
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    current = model.state_dict()
    targets, loaded, resized, fresh, changed, errors = {}, [], [], [], [], []
    for key, value in current.items():
        size = tensor_size(value)
        if key not in saved:
            fresh.append(key)
            continue
        before = tuple(saved[key].size)
        if before == size:
            targets[key] = value
            loaded.append(key)
        elif table_name(key) != key and len(before) == 2 and len(size) == 2:  # a table, sharded or replicated
            if before[1] == size[1] and before[0] < size[0]:
                targets[key] = grown_view(value, before[0])
                resized.append(
                    f"{table_name(key)}: {before[0]:,} -> {size[0]:,} rows ({before[0]:,} copied, "
                    f"{size[0] - before[0]:,} keep their initialisation)"
                )
            else:
                errors.append(
                    f"{key}: table {list(before)} in the checkpoint, {list(size)} now (a table may only grow rows)"
                )
        else:
            changed.append(f"{table_name(key)} ({list(before)} in the checkpoint, {list(size)} now)")
    unused = sorted(set(saved) - set(current))
    if errors:
        raise CheckpointError(f"init_from {path}:\n  " + "\n  ".join(errors))
    if not loaded and not resized:
        raise CheckpointError(f"init_from {path}: no tensor of the checkpoint fits this model (another model?)")
    dcp.load({"model": targets}, storage_reader=safe_reader(path))
    lines = [
        f"init_from {path}: {len(loaded)} tensors loaded as saved, {len(resized)} tables resized, "
        f"{len(fresh)} new, {len(changed)} re-initialised (shape changed); optimizer fresh, step 0"
    ]
    lines += [f"  resized {r}" for r in resized]
    lines += [f"  new (initialised): {table_name(k)} {list(tensor_size(current[k]))}" for k in fresh]
    lines += [f"  re-initialised: {c}" for c in changed]
    lines += [f"  in the checkpoint, not used: {table_name(k)}" for k in unused]
    return "\n".join(lines)


def table_name(key: str) -> str:
    """A table's name for a table's weight key, the key otherwise."""
    match = TABLE_WEIGHT.search(key)
    return match[1] if match else key
