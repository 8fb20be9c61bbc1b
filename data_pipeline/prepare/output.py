"""Writing a dataset directory safely: refuse to clobber, resume what was interrupted, atomic files.

Every preparer (`recsys prepare criteo | tabular | movielens`) writes through `DatasetOutput`:
  - an output directory that holds a *different* dataset (or anything else) is refused unless
    `overwrite=True`; one that holds the *same* dataset (same provenance) is reported up to date;
  - while a dataset is being written, `.prepare.json` records its provenance, so a run that was
    interrupted can be resumed: files that were finished are kept, the rest are redone;
  - every file is written under a temporary name and renamed into place when complete, so a file
    with its final name is always whole; `dataset.json` is written last, so a directory with a
    `dataset.json` is always a complete dataset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.atomic import write_atomic, write_text_atomic
from data_pipeline.dirlock import LOCK_FILE, DirLock
from data_pipeline.schema import SCHEMA_FILE, DataError, DatasetSchema

IN_PROGRESS_FILE = ".prepare.json"

MISSING_ID, RARE_ID, FIRST_ID = 0, 1, 2
"""The id layout of every vocabulary the preparers build: 0 = missing (null or empty), 1 = a value
seen too rarely on train or not at all, 2.. = the vocabulary's values in order."""


def vocabulary_size(values: int) -> int:
    """The id space of a feature whose vocabulary holds `values` values (missing and rare included)."""
    return FIRST_ID + values


MIN_ROW_GROUPS = 64


def row_group_size(rows: int, limit: int) -> int:
    """Rows per row group for a file of `rows`: at most `limit`, and small enough for the file to
    have about MIN_ROW_GROUPS of them. Row groups are the unit shared out to ranks and loader
    workers, so a small split cut into few big groups leaves ranks with unequal shares (and, in
    training, every rank stops at the smallest share)."""
    return min(limit, max(256, -(-rows // MIN_ROW_GROUPS)))


def write_parquet(table: pa.Table, path: Path, row_group_rows: int) -> None:
    """Write `table` as one Parquet file, atomically."""
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_rows))


def write_json(data, path: Path) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def input_identity(paths: list[Path]) -> list[dict]:
    """Names, sizes and modification times of the inputs: a changed input means a different dataset."""
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime": int(p.stat().st_mtime)} for p in paths]


class DatasetOutput:
    """The output directory of one preparer run; see the module docstring for the rules."""

    def __init__(self, out: str | Path, provenance: dict, overwrite: bool = False) -> None:
        self.root = Path(out)
        self.provenance = json.loads(json.dumps(provenance))  # plain JSON types, comparable with a loaded copy
        self.overwrite = overwrite
        self._lock: DirLock | None = None

    def up_to_date(self) -> DatasetSchema | None:
        """The existing dataset if `out` already holds this exact dataset, else None."""
        if (self.root / SCHEMA_FILE).is_file():
            try:
                existing = DatasetSchema.load(self.root)
            except DataError:
                return None
            if existing.extra.get("provenance") == self.provenance:
                return existing
        return None

    def start(self) -> bool:
        """Claim the directory: lock it for this process's life (DirInUse if another preparer holds
        it; on one replica only, under torchrun). Returns True when resuming an interrupted run of
        the same dataset."""
        self._lock = DirLock(self.root, "output directory").acquire()
        if self._lock.note:
            print(f"note: {self._lock.note}", flush=True)
        marker = self.root / IN_PROGRESS_FILE
        if marker.is_file() and not (self.root / SCHEMA_FILE).exists():
            try:
                same = json.loads(marker.read_text()) == self.provenance
            except json.JSONDecodeError:
                same = False
            if same:
                return True
        held = self.root / LOCK_FILE  # the preparer's own lock (data_pipeline.dirlock): not content
        if self.root.exists() and any(p != held for p in self.root.iterdir()):
            if not self.overwrite:
                what = (
                    "a different dataset"
                    if (self.root / SCHEMA_FILE).exists()
                    else "an unfinished dataset made from other inputs or options"
                    if marker.exists()
                    else "other files"
                )
                raise FileExistsError(f"{self.root} already holds {what}; pass --overwrite to replace it")
            for path in self.root.iterdir():
                if path != held:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.provenance, marker)
        return False

    def split_dir(self, split: str) -> Path:
        path = self.root / split
        path.mkdir(exist_ok=True)
        return path

    def finish(self, schema: DatasetSchema) -> DatasetSchema:
        """Write `dataset.json` (with the provenance) last, and drop the in-progress marker."""
        schema.root = self.root
        schema.extra = {**schema.extra, "provenance": self.provenance}
        schema.save()
        (self.root / IN_PROGRESS_FILE).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
        return DatasetSchema.load(self.root)
