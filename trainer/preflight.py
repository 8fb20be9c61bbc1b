"""What is checked before any process group exists: by `recsys train` before it starts torchrun,
and by every rank again. Light on purpose (no torch, no torchrec: see models/__init__.py), so a bad
dataset, directory or flag is one `error:` line in about two seconds."""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from pathlib import Path

from data_pipeline.schema import SPLITS, DataError, DatasetSchema, check_files
from data_pipeline.storage import is_local, is_url
from trainer.config import Config, ConfigError, checkpoint_root
from trainer.tracking import missing_packages


def message(error: DataError) -> str:
    """The error's own message, without the worker traceback a DataLoader wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("DataError: ", 1)[-1]
    return text


def preflight(cfg: Config) -> DatasetSchema:
    """Everything checkable before any process group exists: dataset, files, columns, types, and
    that the run can write where it will (found now, not at the first save after the compute)."""
    schema = DatasetSchema.load(cfg.data.path)
    for split in SPLITS:
        check_files(schema, split)
    if is_url(cfg.run_dir):  # Path() would quietly make it the local folder "s3:/bucket/..."
        raise ConfigError(
            f"run_dir {cfg.run_dir}: a run directory is local (metrics.jsonl, TensorBoard, the lock); "
            "put the checkpoints in the bucket with --checkpoint.dir URL"
        )
    missing = missing_packages(cfg.logging)
    if missing == ["tensorboard"] and "logging.backends" not in cfg.explicit:  # the default, not asked for
        cfg.logging.backends.remove("tensorboard")
        missing = []
        if os.environ.get("RANK", "0") == "0":
            print(
                "note: TensorBoard is not installed: curves go to metrics.jsonl only "
                "(pip install 'recsys-trainer[tensorboard]')"
            )
    run_dir = Path(cfg.run_dir)
    checked = [("run directory", run_dir)]
    checked += [("TensorBoard directory", run_dir / "tb")] if "tensorboard" in cfg.logging.backends else []
    for what, path in checked:
        check_writable(path, what)
    if missing:
        raise ConfigError(
            f"logging.backends {' '.join(missing)}: not installed here (pip install 'recsys-trainer[tracking]', "
            "or pick other backends)"
        )
    if cfg.checkpoint.enabled:
        check_writable(checkpoint_root(cfg), "checkpoint.dir")
    return schema


def check_writable(path: Path, what: str) -> None:
    """Raise ConfigError unless `path` is a directory this process can create entries in, or can
    be created: a probe directory is made (and removed) in its nearest existing ancestor, so
    nothing is left behind, even in a run directory another run holds. On an object store, an
    empty probe object is written and deleted (credentials, bucket and permissions, all at once)."""
    if not is_local(path):
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as e:  # botocore's and the other stores' errors share no base class
            raise ConfigError(f"{what} {path} cannot be written: {type(e).__name__}: {e}") from None
        return
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file" if existing == path else f"{existing} is a file")
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-probe-"))
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written: {e.strerror or type(e).__name__}") from None
