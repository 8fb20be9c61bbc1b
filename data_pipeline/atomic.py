"""Atomic file writes: a reader (or a crash) never sees half a file.

Shared by `dataset.json`, the preparers' Parquet/JSON/npz files and the trainer's run directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from data_pipeline.storage import is_local


def write_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename the result to `path` (same directory, so the rename is
    atomic); the temporary file is removed if `write` fails. On an object store (no rename) the
    file is written locally and uploaded as one object: a PUT is all or nothing there."""
    if not is_local(path):
        with tempfile.TemporaryDirectory(prefix="recsys-upload-") as folder:
            tmp = Path(folder) / path.name
            write(tmp)
            path.fs.put_file(str(tmp), path.path)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
