"""The `[data]` section of the config tree."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal


def check_choices(section: Any, name: str) -> None:
    """Every `Literal[...]` knob of a config section (or list of them) holds one of its choices:
    the rule for a section built in Python; TOML and the flags are checked against the same types."""
    for f in dataclasses.fields(section):
        kind, value = typing.get_type_hints(type(section))[f.name], getattr(section, f.name)
        values = value if typing.get_origin(kind) is list else [value]
        kind = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        bad = [v for v in values if typing.get_origin(kind) is Literal and v not in typing.get_args(kind)]
        if bad:
            choices = ", ".join(typing.get_args(kind))
            raise ValueError(f"{name}.{f.name}: {bad[0]!r} is not one of {choices}")


@dataclass
class DataConfig:
    path: str = "data/synthetic"
    """Dataset directory: Parquet files per split plus dataset.json (docs/data.md, "Your own data")."""
    batch_size: int = 2048
    """Training rows per rank per step (the global batch is batch_size x world_size)."""
    eval_batch_size: int = 8192
    """Evaluation rows per rank per step."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle: bool = True
    """Shuffle training row groups and mix their rows (see shuffle_buffer_rows), anew every epoch."""
    shuffle_buffer_rows: int = 131_072
    """Training rows each loader worker mixes at a time (rows of several row groups): the batches of
    a random permutation of at least this many rows. Memory per worker is about this many rows plus
    one row group (~350 bytes a row for Criteo-shaped data). At least one batch is always mixed."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.shuffle_buffer_rows < 0:
            raise ValueError("data.shuffle_buffer_rows must be >= 0")
