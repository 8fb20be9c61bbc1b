"""The checkpoint directory on disk: step directories, the commit, retention, checksums.

    <checkpoint.dir>/
        step-00000400/          a committed checkpoint: only complete ones ever carry this name
            .metadata           DCP's index: every tensor's global shape and where its chunks lie
            __0_0.distcp ...    what each rank wrote (table shards and their optimizer state; the
                                dense weights and dense optimizer state are written once)
            rank-00000.pt       each rank's RNG states (plain tensors, read with weights_only=True)
            checkpoint.json     written last: the step, the run's Stateful parts (`state`), the
                                resolved config, the dataset schema, the table shapes, and every
                                file's size and sha256
        .tmp-step-00000600/     a save in progress, or one a crash interrupted: never read, removed
        .trash-step-.../        a checkpoint being deleted: not a committed name any more

On an object store (checkpoint.dir = s3://..., any fsspec URL) there is no rename: a save writes
straight into `step-N/` and checkpoint.json, the last object written, is the commit; a `step-N/`
without it is an interrupted save, never read, and removed at start-up. A delete removes
checkpoint.json first, so a half-deleted checkpoint is not a committed one either.

No collectives and no torch here: only paths and files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from data_pipeline.storage import is_local, location, refresh, remove_tree

FORMAT = "recsys-trainer checkpoint"
VERSION = 2
"""Version 2 stores the run's parts by name (`state`: train, lr, best, run_log); version 1 kept
them in one `train_state` dict, which `read_meta` still reads."""
META = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model or config."""


class OutOfSpace(CheckpointError):
    """A save the file system refused for lack of space (raised on each rank that saw it)."""


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_WORDS = ("No space left on device", "Disk quota exceeded", "unexpected pos")
"""How a full file system shows in an error: an errno, or words in a message with none (torch's
zip writer reports a short write as "unexpected pos N vs M", DCP wraps ranks' errors in text)."""


def _errors(error: BaseException) -> list[BaseException]:
    """`error`, its causes and contexts, and the ranks' errors a DCP CheckpointException carries."""
    found, todo = [], [error]
    while todo:
        e = todo.pop()
        if e is None or e in found:
            continue
        found.append(e)
        todo += [e.__cause__, e.__context__]
        todo += [wrapped[0] for wrapped in (getattr(e, "failures", None) or {}).values()]
    return found


def check_space(error: BaseException, directory: Path) -> None:
    """Raise OutOfSpace if `error`, raised while writing into `directory`, is a full file system."""
    errors = _errors(error)
    full = any(getattr(e, "errno", None) in FULL_ERRNOS or any(w in str(e) for w in FULL_WORDS) for e in errors)
    if not full or not is_local(directory):
        return
    try:
        free = f"{shutil.disk_usage(directory).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    raise OutOfSpace(
        f"no space left on device writing checkpoint {directory} ({free}); the committed checkpoints are "
        "intact: free some space (or set checkpoint.dir elsewhere) and run the same command to resume"
    ) from None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name)[1])


def committed(root: Path) -> list[Path]:
    """The committed checkpoints under `root`, oldest first."""
    refresh(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / META).is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def locate(path: str | Path) -> Path:
    """A checkpoint directory; or the latest committed checkpoint of a checkpoints directory or of
    a run directory (its `checkpoints/`)."""
    try:
        path = location(path)
    except ValueError as e:  # storage.StorageError: a URL this machine cannot open
        raise CheckpointError(str(e)) from None
    if (path / META).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = committed(root)
        if found:
            return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if STEP_DIR.match(path.name) or path.name.startswith(".tmp-"):
        raise CheckpointError(f"{path} is not a committed checkpoint (no {META}): a save that did not finish")
    raise CheckpointError(
        f"{path} holds no checkpoint: no {META} in it, and no committed step-* directory in it "
        f"or in {path / 'checkpoints'}"
    )


def _upgrade_v1(meta: dict) -> dict:
    """Version 1's one `train_state` dict as version 2's named parts."""
    train = dict(meta.pop("train_state"))
    run_log = {"metrics_bytes": train.pop("metrics_bytes"), "step": train["step"]}
    meta["state"] = {"train": train, "lr": train.pop("lr"), "best": train.pop("best"), "run_log": run_log}
    meta["version"] = VERSION
    return meta


def read_meta(path: Path) -> dict:
    """checkpoint.json of a committed checkpoint, checked to be ours (version 1 read as 2)."""
    file = path / META
    if not file.is_file():
        raise CheckpointError(f"{path} is not a committed checkpoint: {META} is missing")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a recsys-trainer checkpoint record")
    if meta.get("version") == 1 and isinstance(meta.get("train_state"), dict):
        try:
            return _upgrade_v1(meta)
        except KeyError as e:
            raise CheckpointError(f"{file}: malformed version-1 record (no {e} in train_state)") from None
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')}, this trainer reads versions 1 and {VERSION}"
        )
    if not isinstance(meta.get("state"), dict):
        raise CheckpointError(f"{file}: malformed: no `state` of the run's parts")
    return meta


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(directory: Path, rank: int) -> dict[str, dict]:
    """name -> {bytes, sha256} of the files `rank` wrote into a checkpoint directory (its DCP
    files and RNG file; rank 0 also DCP's .metadata)."""
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(directory.iterdir())
        if p.name.startswith(f"__{rank}_") or p.name == f"rank-{rank:05d}.pt" or (rank == 0 and p.name == ".metadata")
    }


def verify_files(path: Path, meta: dict, rank: int = 0, world_size: int = 1, hashes: bool = True) -> list[str]:
    """What is wrong with the checkpoint's files: missing, another size, other contents. Every
    file's size is checked; rank r of W hashes every W-th file (all ranks together hash them all)."""
    problems = []
    files = meta.get("files") or {}
    if ".metadata" not in files:
        return [f"{META} lists no .metadata"]
    for i, name in enumerate(sorted(files)):
        file, want = path / name, files[name]
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {want['bytes']} were written")
        elif hashes and i % world_size == rank and sha256(file) != want["sha256"]:
            problems.append(f"{name} does not hold what was written (sha256 differs)")
    return problems


def remove_interrupted(root: Path) -> None:
    """Delete saves a crash interrupted (.tmp-*; on object stores, step-* without checkpoint.json)
    and deletions it cut short (.trash-*)."""
    refresh(root)
    if root.is_dir():
        for path in root.iterdir():
            local_leftover = path.name.startswith((".tmp-", ".trash-"))
            remote_leftover = not is_local(root) and STEP_DIR.match(path.name) and not (path / META).is_file()
            if (local_leftover or remote_leftover) and path.is_dir():
                remove_tree(path)


def staging(root: Path, name: str) -> Path:
    """Where the files of checkpoint `name` are written before the commit."""
    return root / f".tmp-{name}" if is_local(root) else root / name


def begin(root: Path, name: str) -> Path:
    """Make an empty staging directory for checkpoint `name` (rank 0, before any rank writes)."""
    tmp = staging(root, name)
    root.mkdir(parents=True, exist_ok=True)
    if is_local(root):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    elif tmp.exists():  # an earlier attempt's files of this step, committed or not
        _delete(root, tmp)
    return tmp


def _delete(root: Path, path: Path, tag: str = "") -> None:
    if not is_local(root):
        (path / META).unlink(missing_ok=True)  # not committed any more, even if the delete stops halfway
        remove_tree(path)
        return
    trash = root / f".trash-{path.name}{tag}"
    os.rename(path, trash)  # not a committed name any more, even if the delete stops halfway
    shutil.rmtree(trash, ignore_errors=True)


def commit(root: Path, tmp: Path, final: Path, meta: dict) -> None:
    """Write checkpoint.json into `tmp` (synced), then rename `tmp` to `final`: the commit. A
    checkpoint of the same step from an earlier attempt is replaced. On an object store `tmp` is
    `final` and writing checkpoint.json (one object, whole or absent) is the commit."""
    text = json.dumps(meta, indent=1) + "\n"
    if not is_local(root):
        (final / META).write_text(text)
        return
    _write_synced(tmp / META, text)
    _fsync_dir(tmp)
    if final.exists():
        _delete(root, final, f"-{os.getpid()}")
    os.rename(tmp, final)
    _fsync_dir(root)


def retain(root: Path, keep_last: int, keep: set[int]) -> None:
    """Delete committed checkpoints beyond the last `keep_last` (0: keep all), except the steps
    in `keep` (the best validation's)."""
    if not keep_last:
        return
    for path in committed(root)[:-keep_last]:
        if step_of(path) not in keep:
            _delete(root, path)


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
