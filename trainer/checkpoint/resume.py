"""Which checkpoint a run continues from (`checkpoint.resume`) or starts its weights from
(`checkpoint.init_from`), agreed by every rank before anything is loaded.

Rank 0 lists and reads the candidates and every rank gets its answer, so the ranks never disagree
on what to load; the ranks share the hashing of the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from data_pipeline.schema import DatasetSchema
from trainer.checkpoint.compat import IncompatibleCheckpoint, check_compatible
from trainer.checkpoint.store import META, CheckpointError, committed, locate, read_meta, verify_files
from trainer.config import Config, checkpoint_root
from trainer.distributed import DistEnv, from_main
from trainer.logs import get_logger

log = get_logger(__name__)


@dataclass
class Resume:
    path: Path
    meta: dict
    """checkpoint.json, read as the current format version."""
    changes: list[str]
    """The allowed config changes since the checkpoint, to print."""
    seconds: float = 0.0
    """Time spent finding and verifying it."""


def _verified(path: Path, meta: dict, env: DistEnv, hashes: bool) -> list[str]:
    """Every rank checks its share of the files; all ranks get every problem."""
    mine = verify_files(path, meta, env.rank, env.world_size, hashes)
    everyone: list[list[str]] = [None] * env.world_size  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    return sorted({p for part in everyone for p in part})


def _candidates(cfg: Config) -> list[Path] | CheckpointError:
    """The checkpoints `checkpoint.resume` allows, the one to try first first."""
    mode, root = cfg.checkpoint.resume, checkpoint_root(cfg)
    try:
        if mode == "never":
            found = committed(root)
            if found:
                return CheckpointError(
                    f"checkpoint.resume is 'never' but {root} holds checkpoints (latest {found[-1].name}); "
                    f"resume them (checkpoint.resume auto), or choose another run_dir or checkpoint.dir"
                )
            return []
        return list(reversed(committed(root))) if mode == "auto" else [locate(mode)]
    except CheckpointError as e:
        return e


def _compatible(path: Path, cfg: Config, schema: DatasetSchema) -> tuple[dict, list[str]] | CheckpointError:
    """(checkpoint.json, the allowed changes), or why this run cannot resume it."""
    try:
        meta = read_meta(path)
        return meta, check_compatible(meta, cfg, schema, path)
    except CheckpointError as e:
        return e
    except (KeyError, TypeError, ValueError) as e:
        return CheckpointError(f"{path / META}: malformed ({type(e).__name__}: {e})")


def find_resume(cfg: Config, env: DistEnv, schema: DatasetSchema) -> Resume | None:
    """The checkpoint this run continues from, agreed by all ranks (a collective), or None.

    auto: the latest committed checkpoint in checkpoint.dir that is intact; a corrupt one is
    reported and the one before it is tried. An explicit path must be intact and compatible."""
    auto = cfg.checkpoint.resume == "auto"
    start = time.perf_counter()
    paths = from_main(lambda: _candidates(cfg))
    if isinstance(paths, CheckpointError):
        raise paths
    for path in paths:
        result = from_main(lambda path=path: _compatible(path, cfg, schema))
        if isinstance(result, CheckpointError):
            if auto and not isinstance(result, IncompatibleCheckpoint):
                if env.is_main:
                    log.warning(f"skipping checkpoint {path}: {result}")
                continue
            raise result
        meta, changes = result
        problems = _verified(path, meta, env, cfg.checkpoint.verify)
        if not problems:
            return Resume(path, meta, changes, time.perf_counter() - start)
        message = f"checkpoint {path} is corrupt: " + "; ".join(problems)
        if not auto:
            raise CheckpointError(message)
        if env.is_main:
            log.warning(f"{message}; trying the one before it")
    if paths and auto:
        raise CheckpointError(
            f"no usable checkpoint in {checkpoint_root(cfg)}: every one is corrupt (see the warnings); "
            f"move them away to start afresh"
        )
    return None


def find_init(cfg: Config, env: DistEnv) -> Path:
    """The checkpoint named by checkpoint.init_from, checked to be intact (a collective)."""

    def where() -> tuple[Path, dict] | CheckpointError:
        try:
            path = locate(cfg.checkpoint.init_from)
            return path, read_meta(path)
        except CheckpointError as e:
            return e

    result = from_main(where)
    if isinstance(result, CheckpointError):
        raise result
    path, meta = result
    problems = _verified(path, meta, env, cfg.checkpoint.verify)
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    return path
