"""Where datasets and checkpoints live: a local path, or a URL that fsspec opens.

    location("data/criteo")            -> Path("data/criteo")
    location("file:///mnt/data")       -> Path("/mnt/data")
    location("s3://bucket/criteo")     -> UPath over s3fs; endpoint and credentials from the standard
                                          AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
    location("gs://...", "hdfs://...") -> the same through gcsfs / pyarrow's HDFS, when installed

Both kinds answer pathlib's API (`/`, `iterdir`, `rglob`, `open`, `read_text`, `stat`), so the code
that reads datasets and checkpoints is written once; what an object store lacks (rename, fsync,
free-space queries) is asked with `is_local` where it matters (trainer.checkpoint.store).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.parquet as pq


class StorageError(ValueError):
    """A URL whose file system cannot be opened here (unknown scheme, package missing)."""


PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs"}
"""The fsspec package each common scheme needs (pip install recsys-trainer[s3] brings s3fs)."""


def is_url(text: str | os.PathLike) -> bool:
    return "://" in os.fspath(text)


def location(text: str | os.PathLike) -> Path:
    """A local Path for a plain path or a file:// URL; a universal_pathlib UPath otherwise."""
    if hasattr(text, "fs") and hasattr(text, "protocol"):  # a UPath already
        return text
    if isinstance(text, Path) or not is_url(text):
        return Path(text)
    text = os.fspath(text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    try:
        from upath import UPath

        path = UPath(text)
        path.fs  # noqa: B018 (opens the file system: a missing package shows here, not at first read)
    except ImportError as e:
        package = PACKAGES.get(parsed.scheme, e.name or "the fsspec implementation")
        raise StorageError(
            f"{text}: reading {parsed.scheme}:// needs the {package} package (pip install {package})"
        ) from None
    except ValueError as e:
        raise StorageError(f"{text}: no file system for {parsed.scheme}:// ({e})") from None
    return path


def is_local(path: Path) -> bool:
    """True for paths on this machine's file systems (pathlib's), False for fsspec's others."""
    return isinstance(path, Path)


def refresh(path: Path) -> None:
    """Forget cached listings of `path`'s file system: other processes write there too (the
    ranks' checkpoint files), and a stale listing would hide them."""
    if not is_local(path):
        path.fs.invalidate_cache()


def remove_tree(path: Path) -> None:
    """Delete a directory and everything under it (missing: nothing to do)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def parquet_file(path: Path, **options) -> pq.ParquetFile:
    """A Parquet file opened through pyarrow, on its own file system (fsspec's for URLs)."""
    if is_local(path):
        return pq.ParquetFile(path, **options)
    return pq.ParquetFile(path.path, filesystem=path.fs, **options)


def read_table(path: Path, **options):
    """A whole Parquet file (or folder) as one pyarrow Table, on its own file system."""
    if is_local(path):
        return pq.read_table(path, **options)
    return pq.read_table(path.path, filesystem=path.fs, **options)
