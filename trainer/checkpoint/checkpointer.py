"""Checkpoints: sharded with torch.distributed.checkpoint (DCP), committed atomically, resumed
exactly, loadable on another number of ranks or another sharding plan.

    python -m trainer --config configs/demo.toml --checkpoint.every_steps 200   # save
    python -m trainer --config configs/demo.toml                                # run again: resumes
    python -m trainer --config configs/demo.toml --checkpoint.resume runs/demo/checkpoints/step-00000400
    python -m trainer --config configs/ft.toml --checkpoint.init_from runs/demo  # fine-tune

Layout of `<run_dir>/checkpoints` (`checkpoint.dir`):

    step-00000400/          a committed checkpoint: only complete ones ever carry this name
        .metadata           DCP's index: every tensor's global shape and where its chunks lie
        __0_0.distcp ...    what each rank wrote: its table shards, the fused optimizer's state of
                            those shards, the dense weights and dense optimizer state (written once)
        rank-00000.pt       each rank's RNG states (plain tensors, read with weights_only=True)
        checkpoint.json     written last: step, epoch and batches read in it, LR-schedule and
                            best-validation state, the resolved config, the dataset schema, the
                            table shapes, and every file's size and sha256
    .tmp-step-00000600/     a save in progress, or one a crash interrupted: never read, removed

A save writes everything into `.tmp-step-N`; when every rank has written its files (DCP's own
collectives, then a gather of the files' checksums), rank 0 writes checkpoint.json, syncs it and
renames the directory to `step-N`. A crash at any point before the rename leaves only a `.tmp-`
directory, which nothing loads; the previous checkpoint is untouched (old ones are deleted only
after a newer one is committed). Before loading, checkpoint.json is compared with the run's config
and dataset (what differs is named) and every file is checked against its recorded size and
sha256, so a corrupt or foreign checkpoint fails with a clear error instead of loading partly.

Only tensors go through DCP (its loader unpickles non-tensor entries); everything else is JSON.

Test hook: `RECSYS_FAULT=kill@STEP:RANK` makes RANK SIGKILL itself after training step STEP, and
`RECSYS_FAULT=save@STEP:RANK` makes it fail inside the save of step STEP after writing its files;
both only on a job's first attempt (torchrun's TORCHELASTIC_RESTART_COUNT = 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from data_pipeline.schema import DatasetSchema
from trainer.config import Config
from trainer.distributed import DistEnv

# torchrec's sharded tables are ShardedTensors; torch warns about them on every size() and save.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

FORMAT = "recsys-trainer checkpoint"
VERSION = 1
META = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model or config."""


class IncompatibleCheckpoint(CheckpointError):
    """An intact checkpoint of another model, optimizer or dataset."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run_dir) / "checkpoints"


def committed(root: Path) -> list[Path]:
    """The committed checkpoints under `root`, oldest first."""
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
    path = Path(path)
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


def read_meta(path: Path) -> dict:
    """checkpoint.json of a committed checkpoint, checked to be ours."""
    file = path / META
    if not file.is_file():
        raise CheckpointError(f"{path} is not a committed checkpoint: {META} is missing")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable ({e}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a recsys-trainer checkpoint record")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')}, this trainer reads version {VERSION}"
        )
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
        elif hashes and i % world_size == rank and _sha256(file) != want["sha256"]:
            problems.append(f"{name} does not hold what was written (sha256 differs)")
    return problems


# ---- what must match to resume ------------------------------------------------------------------

# Keys that may change between a checkpoint and its resumption without a word: where things go,
# how they are shown, and how tables are placed (DCP reshards on load).
_FREE = (
    "config",
    "run_dir",
    "data.path",
    "data.eval_batch_size",
    "training.progress_bar",
    "training.stop_at_step",
    "training.log_every",
    "checkpoint.",
    "sharding.",
)
# Keys that change what the saved state means: the model and its optimizers' kinds.
_FATAL = ("model.", "optimizer.dense", "optimizer.sparse")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def schema_fingerprint(schema: DatasetSchema | dict) -> dict:
    """The parts of a dataset the model's shape and inputs depend on."""
    raw = schema.to_json() if isinstance(schema, DatasetSchema) else schema
    return {key: raw.get(key) for key in ("label", "weight", "task", "label_range", "dense", "sparse")}


def schema_differences(saved: dict, current: dict) -> list[str]:
    saved, current = schema_fingerprint(saved), schema_fingerprint(current)
    out = []
    for key in ("label", "weight", "task", "label_range", "dense"):
        if saved[key] != current[key]:
            out.append(f"dataset {key}: {saved[key]} in the checkpoint, {current[key]} now")
    before = {f["name"]: f for f in saved["sparse"] or []}
    now = {f["name"]: f for f in current["sparse"] or []}
    for name in sorted(before.keys() - now.keys()):
        out.append(f"sparse feature {name}: in the checkpoint's dataset, not in this one")
    for name in sorted(now.keys() - before.keys()):
        out.append(f"sparse feature {name}: new in this dataset")
    for name in sorted(before.keys() & now.keys()):
        if before[name] != now[name]:
            out.append(
                f"sparse feature {name}: {before[name]['num_embeddings']} ids"
                f"{' multi-hot' if before[name].get('multi_hot') else ''} in the checkpoint's dataset, "
                f"{now[name]['num_embeddings']}{' multi-hot' if now[name].get('multi_hot') else ''} now"
            )
    if not out and [f["name"] for f in saved["sparse"]] != [f["name"] for f in current["sparse"]]:
        out.append("sparse features: the same, in another order")
    return out


def config_differences(saved_toml: str, cfg: Config) -> tuple[list[str], list[str]]:
    """(fatal, allowed) differences between a checkpoint's resolved config and this run's."""
    saved = _flat(tomllib.loads(saved_toml))
    current = _flat(tomllib.loads(cfg.to_toml()))
    fatal, allowed = [], []
    for key in sorted(saved.keys() | current.keys()):
        before, now = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if before == now or _matches(key, _FREE):
            continue
        line = f"{key}: {before!r} in the checkpoint, {now!r} now"
        (fatal if _matches(key, _FATAL) else allowed).append(line)
    return fatal, allowed


def check_compatible(meta: dict, cfg: Config, schema: DatasetSchema, path: Path) -> list[str]:
    """Raise CheckpointError if `meta` cannot be resumed by this run; return the allowed changes."""
    fatal, allowed = config_differences(meta["config"], cfg)
    fatal += schema_differences(meta["dataset"], schema)
    if fatal:
        raise IncompatibleCheckpoint(
            f"checkpoint {path} was made by another model or dataset; it differs in:\n  "
            + "\n  ".join(fatal)
            + f"\n(resume needs the same model, optimizers and dataset schema. To start a changed model from these "
            f"weights use --checkpoint.init_from {path}; to start afresh, use another --run-dir or checkpoint.dir)"
        )
    return allowed


# ---- state that is not a tensor of the model or optimizer ---------------------------------------


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": None, "numpy": None}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached": cached,
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )


def lr_state(lr) -> dict:
    """trainer.optim.LearningRates as JSON: the schedulers' state and every group's current rate."""
    per_step = {k: v for k, v in lr.per_step.state_dict().items() if k != "lr_lambdas"}
    plateau = None
    if lr.on_plateau is not None:
        plateau = {k: v for k, v in lr.on_plateau.state_dict().items() if k != "optimizer"}
    groups = [{"lr": g["lr"], "initial_lr": g.get("initial_lr")} for g in lr.optimizer.param_groups]
    return {"steps": lr.steps, "per_step": per_step, "plateau": plateau, "groups": groups}


def set_lr_state(lr, state: dict) -> None:
    lr.steps = state["steps"]
    lr.per_step.load_state_dict({**state["per_step"], "lr_lambdas": [None] * len(lr.per_step.lr_lambdas)})
    if lr.on_plateau is not None and state["plateau"] is not None:
        lr.on_plateau.load_state_dict(state["plateau"])
    groups = list(lr.optimizer.param_groups)
    if len(groups) == len(state["groups"]):
        for group, saved in zip(groups, state["groups"]):
            group["lr"] = saved["lr"]
            if saved.get("initial_lr") is not None:
                group["initial_lr"] = saved["initial_lr"]
    else:  # another plan groups the fused tables differently: every group follows the schedule
        factor = state["groups"][-1]["lr"] / (state["groups"][-1].get("initial_lr") or state["groups"][-1]["lr"] or 1.0)
        for group in groups:
            group["lr"] = group.get("initial_lr", group["lr"]) * factor


def fault(point: str, step: int, rank: int) -> None:
    """The RECSYS_FAULT test hook (see the module docstring)."""
    spec = os.environ.get("RECSYS_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kind, _, where = spec.partition("@")
    at, _, who = where.partition(":")
    if kind == point and int(at) == step and int(who or 0) == rank:
        if point == "kill":
            print(f"RECSYS_FAULT: rank {rank} kills itself (SIGKILL) after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"RECSYS_FAULT: rank {rank} fails inside the save of step {step}")


# ---- tensors ------------------------------------------------------------------------------------


def _size(value: Any) -> tuple[int, ...] | None:
    return tuple(value.size()) if isinstance(value, torch.Tensor) else None


def _column_widths(chunks) -> list[int]:
    """Widths of a 2-D table's column shards, left to right (one width for an unsplit table)."""
    widths = {}
    for chunk in chunks:
        widths[int(chunk.offsets[1])] = int(chunk.sizes[1])
    return [widths[k] for k in sorted(widths)]


def _grown_view(value: torch.Tensor, rows: int) -> torch.Tensor | None:
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


@dataclass
class Resume:
    path: Path
    meta: dict
    changes: list[str]
    seconds: float = 0.0
    """Time spent finding and verifying it."""


class Checkpointer:
    """Saves and loads one run's model and optimizer state (plus what the trainer hands over)."""

    def __init__(self, cfg: Config, env: DistEnv, model: nn.Module, optimizer, schema: DatasetSchema) -> None:
        self.cfg, self.env, self.model, self.optimizer, self.schema = cfg, env, model, optimizer, schema
        self.root = checkpoint_root(cfg)
        self.saves, self.save_seconds, self.save_seconds_last, self.last_bytes = 0, 0.0, 0.0, 0
        self.stall_seconds = 0.0  # how long training waited for saves (all of a save when synchronous)
        # checkpoint.async_save: the files are written and committed by one background thread, whose
        # collectives go through a process group of their own (gloo: DCP's async save stages to host
        # memory), so that they never interleave with the training step's.
        self._group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if cfg.checkpoint.async_save else None
        self._pending: Future | None = None

    def state(self) -> dict:
        """What DCP saves and loads: the model's state_dict (tables as ShardedTensors) and the
        combined optimizer's state (fused per-table state as ShardedTensors, dense state)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()["state"]}

    # ---- save -----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove saves that a crash interrupted (call when no save is running: at start-up)."""
        if self.env.is_main and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, train_state: dict, keep: set[int] = frozenset()) -> Path:
        """Write checkpoint `step` (a collective: every rank calls it). `train_state` (JSON) is
        stored in checkpoint.json; `keep` are steps that retention must not delete (the best).
        With checkpoint.async_save it returns once the state is copied to host memory; the commit
        follows in the background (`wait` for it)."""
        self.wait()  # one save in flight at most; its error, if any, surfaces here
        start = time.perf_counter()
        rank, name = self.env.rank, step_dir_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        torch.save(rng_state(), tmp / f"rank-{rank:05d}.pt")
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        if self._executor is None:
            dcp.save(self.state(), storage_writer=writer)
            self._commit(None, step, train_state, keep, tmp, final, start)
            self.stall_seconds += time.perf_counter() - start
        else:
            written = dcp.async_save(self.state(), storage_writer=writer, process_group=self._group)
            self.stall_seconds += time.perf_counter() - start
            self._pending = self._executor.submit(self._commit, written, step, train_state, keep, tmp, final, start)
        return final

    def wait(self) -> None:
        """Block until the save in flight (async_save) is committed; re-raise its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _commit(
        self, written: Future | None, step: int, train_state: dict, keep: set[int], tmp: Path, final: Path, start: float
    ) -> None:
        """Once this rank's files are written (`written`, for an async save), gather every rank's
        checksums; rank 0 writes checkpoint.json and renames `tmp` to `final`."""
        if written is not None:
            written.result()
        rank = self.env.rank
        fault("save", step, rank)
        mine = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.name.startswith(f"__{rank}_")
            or p.name == f"rank-{rank:05d}.pt"
            or (rank == 0 and p.name == ".metadata")
        }
        everyone: list[dict] = [None] * self.env.world_size  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine, group=self._group)
        files = {k: v for part in everyone for k, v in part.items()}
        if self.env.is_main:
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "time": time.time(),
                "world_size": self.env.world_size,
                "model": self.cfg.model.name,
                "config": self.cfg.to_toml(),
                "dataset": self.schema.to_json(),
                "tables": self._tables(),
                "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                "torch": torch.__version__,
                "train_state": train_state,
                "files": files,
            }
            _write_synced(tmp / META, json.dumps(meta, indent=1) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
                trash = self.root / f".trash-{final.name}-{os.getpid()}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)  # the commit
            _fsync_dir(self.root)
            self._retain(keep | {step})
        dist.barrier(group=self._group)
        self.saves += 1
        self.save_seconds_last = time.perf_counter() - start
        self.save_seconds += self.save_seconds_last
        self.last_bytes = sum(f["bytes"] for f in files.values())
        if self.env.is_main:
            how = " in the background" if written is not None else ""
            print(
                f"checkpoint {final} ({self.last_bytes / 1e6:.1f} MB) saved{how} in {self.save_seconds_last:.2f} s",
                flush=True,
            )

    def _tables(self) -> dict[str, list[int]]:
        """table name -> [rows, dim] of every embedding table of the model."""
        return {_short(k): list(_size(v)) for k, v in self.model.state_dict().items() if _short(k) != k}

    def _retain(self, keep: set[int]) -> None:
        """Delete committed checkpoints beyond the last `keep_last`, except the steps in `keep`."""
        found = committed(self.root)
        last = self.cfg.checkpoint.keep_last
        if not last:
            return
        for path in found[:-last]:
            if int(STEP_DIR.match(path.name)[1]) in keep:
                continue
            trash = self.root / f".trash-{path.name}"
            os.rename(path, trash)  # not a committed name any more, even if the delete stops halfway
            shutil.rmtree(trash, ignore_errors=True)

    # ---- load -----------------------------------------------------------------------------------
    def load(self, resume: Resume) -> tuple[dict, list[str]]:
        """Load model, optimizer and this rank's RNG state (a collective); returns the trainer's
        train_state and notes on what was converted (another plan or world size)."""
        path = resume.path
        metadata = dcp.FileSystemReader(path).read_metadata()
        self._init_dense_state()
        state = self.state()
        notes: list[str] = []
        converted = _agree(
            lambda: (self._check_shapes(state, metadata, path), self._convertible_states(state, metadata))[1]
        )
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))
        for (param, key), (full, widths, original) in converted.items():
            self._set_rowwise_state(original, full, widths)
            state["optim"][param][key] = original
        if converted:
            notes.append(
                f"the row-wise optimizer state of {len(converted)} tables was converted to the new column split "
                f"(exact when shards merge, the row's mean otherwise)"
            )
        self.optimizer.load_state_dict({"state": state["optim"]})  # in place already; this copies anything that was not
        rng = path / f"rank-{self.env.rank:05d}.pt"
        if resume.meta["world_size"] == self.env.world_size and rng.is_file():
            resume.meta["train_state"]["rng"] = torch.load(rng, weights_only=True)
        else:
            notes.append(
                f"saved on {resume.meta['world_size']} ranks, resumed on {self.env.world_size}: RNG states not restored"
            )
        return resume.meta["train_state"], notes

    def load_model(self, path: Path) -> None:
        """Only the model's weights (e.g. the best checkpoint's, to score the test split)."""
        state = {"model": self.model.state_dict()}
        _agree(lambda: self._check_shapes(state, dcp.FileSystemReader(path).read_metadata(), path))
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))

    def _init_dense_state(self) -> None:
        """Create the dense optimizer's lazily made state (Adam's moments), so that DCP can load
        into it in place (torchrec's KeyedOptimizer.init_state: one step with zero gradients; the
        weights it may move are overwritten by the load)."""
        fused = getattr(self.model, "fused_optimizer", None)
        for _, opt in self.optimizer.optimizers:
            if opt is not fused and len(opt.state) < len(opt.params):
                opt.init_state()
                opt.zero_grad(set_to_none=True)

    @staticmethod
    def _check_shapes(state: dict, metadata: Metadata, path: Path) -> list[str]:
        """Every model tensor of this run must be in the checkpoint with its shape."""
        saved = metadata.state_dict_metadata
        missing, shapes = [], []
        for key, value in state["model"].items():
            entry = saved.get(f"model.{key}")
            if not isinstance(entry, TensorStorageMetadata):
                missing.append(key)
            elif tuple(entry.size) != _size(value):
                shapes.append(f"{key}: {list(entry.size)} in the checkpoint, {list(_size(value))} now")
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
        return []

    def _convertible_states(self, state: dict, metadata: Metadata) -> dict:
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
                if tuple(entry.size) == _size(value):
                    continue
                weight = saved.get(f"model.{param}")
                rows = int(weight.size[0]) if isinstance(weight, TensorStorageMetadata) else 0
                if (
                    len(entry.size) == 1
                    and _size(value)
                    and len(_size(value)) == 1
                    and rows
                    and entry.size[0] % rows == 0
                    and _size(value)[0] % rows == 0
                ):
                    full = torch.empty(entry.size, dtype=entry.properties.dtype)
                    converted[(param, key)] = (full, _column_widths(weight.chunks), value)
                    states[key] = full
                else:
                    problems.append(
                        f"optimizer state {param} {key}: {list(entry.size)} in the checkpoint, {list(_size(value))} now"
                    )
        if problems:
            raise CheckpointError(
                "the checkpoint's optimizer state does not fit this run:\n  " + "\n  ".join(problems[:20])
            )
        return converted

    @staticmethod
    def _set_rowwise_state(target: torch.Tensor, full: torch.Tensor, widths: list[int]) -> None:
        if len(widths) == 1:
            per_row = full
        else:  # the whole row's mean (each shard's value is the mean over its columns)
            w = torch.tensor(widths, dtype=full.dtype)
            per_row = (full.view(len(widths), -1) * w[:, None]).sum(0) / w.sum()
        rows = per_row.numel()
        shards = target.local_shards() if isinstance(target, ShardedTensor) else []
        for shard in shards:
            start = shard.metadata.shard_offsets[0] % rows
            shard.tensor.copy_(per_row[start : start + shard.tensor.numel()])

    # ---- fine-tuning ----------------------------------------------------------------------------
    def init_from(self, path: Path) -> str:
        """Load the model weights of checkpoint `path` that fit: same shape, or a table that grew
        (its saved rows are copied). Returns a report of what was loaded, resized and initialised."""
        metadata = dcp.FileSystemReader(path).read_metadata()
        saved = {
            k[len("model.") :]: v
            for k, v in metadata.state_dict_metadata.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
        }
        current = self.model.state_dict()
        targets, loaded, resized, fresh, changed, errors = {}, [], [], [], [], []
        for key, value in current.items():
            size = _size(value)
            if key not in saved:
                fresh.append(key)
                continue
            before = tuple(saved[key].size)
            if before == size:
                targets[key] = value
                loaded.append(key)
            elif isinstance(value, ShardedTensor) and len(before) == 2 and len(size) == 2:
                if before[1] == size[1] and before[0] < size[0]:
                    targets[key] = _grown_view(value, before[0])
                    resized.append(
                        f"{_short(key)}: {before[0]:,} -> {size[0]:,} rows ({before[0]:,} copied, "
                        f"{size[0] - before[0]:,} keep their initialisation)"
                    )
                else:
                    errors.append(
                        f"{key}: table {list(before)} in the checkpoint, {list(size)} now (a table may only grow rows)"
                    )
            else:
                changed.append(f"{_short(key)} ({list(before)} in the checkpoint, {list(size)} now)")
        unused = sorted(set(saved) - set(current))
        if errors:
            raise CheckpointError(f"init_from {path}:\n  " + "\n  ".join(errors))
        if not loaded and not resized:
            raise CheckpointError(f"init_from {path}: no tensor of the checkpoint fits this model (another model?)")
        dcp.load({"model": targets}, storage_reader=dcp.FileSystemReader(path))
        lines = [
            f"init_from {path}: {len(loaded)} tensors loaded as saved, {len(resized)} tables resized, "
            f"{len(fresh)} new, {len(changed)} re-initialised (shape changed); optimizer fresh, step 0"
        ]
        lines += [f"  resized {r}" for r in resized]
        lines += [f"  new (initialised): {_short(k)} {list(_size(current[k]))}" for k in fresh]
        lines += [f"  re-initialised: {c}" for c in changed]
        lines += [f"  in the checkpoint, not used: {_short(k)}" for k in unused]
        return "\n".join(lines)


def _short(key: str) -> str:
    """A table's name for a table's weight key, the key otherwise."""
    match = re.search(r"embedding_bags\.([^.]+)\.weight$", key)
    return match[1] if match else key


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


def _agree(check):
    """Run `check` on every rank; if it raises CheckpointError on any, raise it on all (before a
    collective load that the others would otherwise enter alone)."""
    result, error = None, None
    try:
        result = check()
    except CheckpointError as e:
        error = str(e)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [e for e in errors if e]
    if found:
        raise CheckpointError(found[0])
    return result


# ---- choosing what to load ----------------------------------------------------------------------


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _verified(path: Path, meta: dict, env: DistEnv, hashes: bool) -> list[str]:
    """Every rank checks its share of the files; all ranks get every problem."""
    mine = verify_files(path, meta, env.rank, env.world_size, hashes)
    everyone: list[list[str]] = [None] * env.world_size  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    return sorted({p for part in everyone for p in part})


def find_resume(cfg: Config, env: DistEnv, schema: DatasetSchema) -> Resume | None:
    """The checkpoint this run continues from, agreed by all ranks (a collective), or None.

    auto: the latest committed checkpoint in checkpoint.dir that is intact; a corrupt one is
    reported and the one before it is tried. An explicit path must be intact and compatible."""
    mode = cfg.checkpoint.resume
    start = time.perf_counter()

    def candidates() -> list[Path] | CheckpointError:
        try:
            root = checkpoint_root(cfg)
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

    paths = _broadcast(candidates() if env.is_main else None)
    if isinstance(paths, CheckpointError):
        raise paths
    for path in paths:

        def metadata(path: Path = path) -> tuple[dict, list[str]] | CheckpointError:
            try:
                meta = read_meta(path)
                return meta, check_compatible(meta, cfg, schema, path)
            except CheckpointError as e:
                return e
            except (KeyError, TypeError, ValueError) as e:
                return CheckpointError(f"{path / META}: malformed ({type(e).__name__}: {e})")

        result = _broadcast(metadata() if env.is_main else None)
        if isinstance(result, CheckpointError):
            if mode == "auto" and not isinstance(result, IncompatibleCheckpoint):
                if env.is_main:
                    print(f"warning: skipping checkpoint {path}: {result}", flush=True)
                continue
            raise result
        meta, changes = result
        problems = _verified(path, meta, env, cfg.checkpoint.verify)
        if not problems:
            return Resume(path, meta, changes, time.perf_counter() - start)
        message = f"checkpoint {path} is corrupt: " + "; ".join(problems)
        if mode != "auto":
            raise CheckpointError(message)
        if env.is_main:
            print(f"warning: {message}; trying the one before it", flush=True)
    if paths and mode == "auto":
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

    result = _broadcast(where() if env.is_main else None)
    if isinstance(result, CheckpointError):
        raise result
    path, meta = result
    problems = _verified(path, meta, env, cfg.checkpoint.verify)
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    return path


def truncate_records(metrics: Path, size: int) -> int:
    """Cut metrics.jsonl back to `size` bytes (its size when the checkpoint was taken): records
    written after it, by the attempt that failed, are dropped. Returns how many were dropped."""
    if not metrics.is_file() or metrics.stat().st_size <= size:
        return 0
    with metrics.open("rb+") as f:
        f.seek(size)
        dropped = f.read().count(b"\n")
        f.truncate(size)
    return dropped


__all__ = [
    "CheckpointError",
    "Checkpointer",
    "IncompatibleCheckpoint",
    "Resume",
    "committed",
    "find_init",
    "find_resume",
    "locate",
    "read_meta",
    "verify_files",
]
