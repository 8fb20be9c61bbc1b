"""Checkpoints: sharded with torch.distributed.checkpoint (DCP), committed atomically, resumed
exactly, loadable on another number of ranks or another sharding plan.

    python -m trainer --config configs/demo.toml --checkpoint.every_steps 200   # save
    python -m trainer --config configs/demo.toml                                # run again: resumes
    python -m trainer --config configs/demo.toml --checkpoint.resume runs/demo/checkpoints/step-00000400
    python -m trainer --config configs/ft.toml --checkpoint.init_from runs/demo  # fine-tune

A save writes everything into `.tmp-step-N` (see `trainer.checkpoint.store` for the layout); when
every rank has written its files (DCP's own collectives, then a gather of the files' checksums),
rank 0 writes checkpoint.json, syncs it and renames the directory to `step-N`. A crash at any point
before the rename leaves only a `.tmp-` directory, which nothing loads; the previous checkpoint is
untouched (old ones are deleted only after a newer one is committed). Before loading,
checkpoint.json is compared with the run's config and dataset (`trainer.checkpoint.compat`) and
every file is checked against its recorded size and sha256 (`trainer.checkpoint.resume`).

What is saved: the model's and optimizer's tensors through DCP; the run's Stateful parts (train
state, learning rates, best validation, run log) as the JSON their `state_dict()` returns; each
rank's RNG states in its own file. Only tensors go through DCP, and every load reads DCP's
pickled `.metadata` through `trainer.checkpoint.safe_reader`, which admits nothing else.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # not re-exported by the package

from data_pipeline.schema import DatasetSchema, split_digest
from data_pipeline.storage import is_local
from trainer.checkpoint import reshard, store
from trainer.checkpoint.resume import Resume, checkpoint_root
from trainer.checkpoint.safe_reader import read_metadata, safe_reader
from trainer.checkpoint.store import CheckpointError, step_dir_name
from trainer.config import Config
from trainer.distributed import DistEnv, raise_on_every_rank
from trainer.faults import fault
from trainer.logs import get_logger
from trainer.state import RngState

log = get_logger(__name__)

# torchrec's sharded tables are ShardedTensors; torch warns about them on every size() and save.
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)


def dcp_writer(directory: Path) -> dcp.StorageWriter:
    """DCP's writer for a local directory (files synced before the commit) or an fsspec URL."""
    if is_local(directory):
        return dcp.FileSystemWriter(directory, sync_files=True)
    return FsspecWriter(str(directory), sync_files=False)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Saves and loads one run: the model and optimizer tensors, and the named Stateful parts it
    is given (stored as what their state_dict() returns; it never reads their fields). Decides
    its own cadence: `should_save`, `steps_to_next_save`."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        model: nn.Module,
        optimizer,
        schema: DatasetSchema,
        parts: dict[str, Stateful],
        data_files: dict[str, str] | None = None,
    ) -> None:
        self.cfg, self.env, self.model, self.optimizer, self.schema = cfg, env, model, optimizer, schema
        self.parts = parts
        self.settings = cfg.checkpoint
        self.root = checkpoint_root(cfg)
        self.saved_step = -1
        """The step of the last checkpoint this run saved or loaded."""
        self.saves, self.save_seconds, self.save_seconds_last, self.last_bytes = 0, 0.0, 0.0, 0
        self.stall_seconds = 0.0  # how long training waited for saves (all of a save when synchronous)
        # checkpoint.async_save: the files are written and committed by one background thread, whose
        # collectives go through a process group of their own (gloo: DCP's async save stages to host
        # memory), so that they never interleave with the training step's.
        self._group = dist.new_group(backend="gloo") if self.settings.async_save else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if self.settings.async_save else None
        self._pending: Future | None = None
        self.data_files = data_files or {split: split_digest(schema, split) for split in schema.splits}
        """split -> digest of its files, written into checkpoint.json (a resumed run compares them,
        compat.py); pass the run's own to read no footer twice."""

    def tensors(self) -> dict:
        """What DCP saves and loads: the model's state_dict (tables as ShardedTensors) and the
        combined optimizer's state (fused per-table state as ShardedTensors, dense state)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()["state"]}

    # ---- cadence --------------------------------------------------------------------------------
    def steps_to_next_save(self, step: int) -> int | None:
        """Steps from `step` to the next periodic save (None: no periodic saves)."""
        every = self.settings.every_steps
        return every - step % every if self.settings.enabled and every else None

    def should_save(self, step: int, improved: bool, stopping: bool) -> bool:
        """Save now: a periodic step, a better validation (keep_best), or a stop."""
        every = self.settings.every_steps
        due = (every and step % every == 0) or (improved and self.settings.keep_best) or stopping
        return bool(self.settings.enabled and due)

    # ---- save -----------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Remove saves that a crash interrupted (call when no save is running: at start-up)."""
        if self.env.is_main:
            store.remove_interrupted(self.root)
        dist.barrier()

    def save(self, step: int, keep: set[int] = frozenset()) -> None:
        """Write checkpoint `step` (a collective: every rank calls it) unless checkpoints are off or
        this step is saved already; `keep` are steps that retention must not delete (the best).
        The parts' state is taken now. With checkpoint.async_save it returns once the tensors are
        copied to host memory; the commit follows in the background (`wait` for it)."""
        if not self.settings.enabled or self.saved_step == step:
            return
        self.saved_step = step
        parts = {name: part.state_dict() for name, part in self.parts.items()}
        self.wait()  # one save in flight at most; its error, if any, surfaces here
        start = time.perf_counter()
        name = step_dir_name(step)
        tmp, final = store.staging(self.root, name), self.root / name
        if self.env.is_main:
            store.begin(self.root, name)
        dist.barrier()
        try:
            with (tmp / f"rank-{self.env.rank:05d}.pt").open("wb") as f:
                torch.save(RngState.state_dict(), f)
            writer = dcp_writer(tmp)
            if self._executor is None:
                dcp.save(self.tensors(), storage_writer=writer)
                self._commit(None, step, parts, keep, tmp, final, start)
                self.stall_seconds += time.perf_counter() - start
            else:
                written = dcp.async_save(self.tensors(), storage_writer=writer, process_group=self._group)
                self.stall_seconds += time.perf_counter() - start
                self._pending = self._executor.submit(self._commit, written, step, parts, keep, tmp, final, start)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            store.check_space(e, tmp)
            raise

    def wait(self) -> None:
        """Block until the save in flight (async_save) is committed; re-raise its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _commit(
        self, written: Future | None, step: int, parts: dict, keep: set[int], tmp: Path, final: Path, start: float
    ) -> None:
        """Once this rank's files are written (`written`, for an async save), gather every rank's
        checksums; rank 0 writes checkpoint.json and renames `tmp` to `final`."""
        if written is not None:
            try:
                written.result()
            except BaseException as e:
                store.check_space(e, tmp)
                raise
        fault("save", step, self.env.rank)
        everyone: list[dict] = [None] * self.env.world_size  # type: ignore[list-item]
        dist.all_gather_object(everyone, store.file_records(tmp, self.env.rank), group=self._group)
        files = {k: v for part in everyone for k, v in part.items()}
        if self.env.is_main:
            store.commit(self.root, tmp, final, self._meta(step, parts, files))
            store.retain(self.root, self.settings.keep_last, keep | {step})
        dist.barrier(group=self._group)
        self.saves += 1
        self.save_seconds_last = time.perf_counter() - start
        self.save_seconds += self.save_seconds_last
        self.last_bytes = sum(f["bytes"] for f in files.values())
        if self.env.is_main:
            how = " in the background" if written is not None else ""
            log.info(
                f"checkpoint {final} ({self.last_bytes / 1e6:.1f} MB) saved{how} in {self.save_seconds_last:.2f} s"
            )

    def _meta(self, step: int, parts: dict, files: dict) -> dict:
        """checkpoint.json: what the checkpoint is, what made it, the parts' state, its files."""
        tables = {
            reshard.table_name(k): list(reshard.tensor_size(v))
            for k, v in self.model.state_dict().items()
            if reshard.table_name(k) != k
        }
        return {
            "format": store.FORMAT,
            "version": store.VERSION,
            "step": step,
            "time": time.time(),
            "world_size": self.env.world_size,
            "model": self.cfg.model.name,
            "config": self.cfg.to_toml(),
            "dataset": self.schema.to_json(),
            "data_files": self.data_files,
            "tables": tables,
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "torch": torch.__version__,
            "state": parts,
            "files": files,
        }

    # ---- load -----------------------------------------------------------------------------------
    def load(self, resume: Resume) -> tuple[dict | None, list[str]]:
        """Load the tensors (a collective) and every part's state. Returns this rank's RNG states
        (None when saved on another world size) and notes on what was converted."""
        path = resume.path
        metadata = read_metadata(path)
        self._init_dense_state()
        tensors = self.tensors()
        notes: list[str] = []

        def check() -> dict:
            missing = sorted(set(self.parts) - set(resume.meta["state"]))
            if missing:
                raise CheckpointError(f"{path / store.META}: malformed: no state of {', '.join(missing)}")
            reshard.check_shapes(tensors, metadata, path)
            return reshard.convertible_states(tensors, metadata)

        converted = raise_on_every_rank(check, CheckpointError)
        dcp.load(tensors, storage_reader=safe_reader(path))
        for (param, key), (full, widths, original) in converted.items():
            reshard.set_rowwise_state(original, full, widths)
            tensors["optim"][param][key] = original
        if converted:
            notes.append(
                f"the row-wise optimizer state of {len(converted)} tables was converted to the new column split "
                f"(exact when shards merge, the row's mean otherwise)"
            )
        self.optimizer.load_state_dict({"state": tensors["optim"]})  # in place already; copies anything not
        for name, part in self.parts.items():
            part.load_state_dict(resume.meta["state"][name])
        self.saved_step = resume.meta["step"]
        rng = path / f"rank-{self.env.rank:05d}.pt"
        if resume.meta["world_size"] == self.env.world_size and rng.is_file():
            with rng.open("rb") as f:
                return torch.load(f, weights_only=True), notes
        notes.append(
            f"saved on {resume.meta['world_size']} ranks, resumed on {self.env.world_size}: RNG states not restored"
        )
        return None, notes

    def load_model(self, path: Path) -> None:
        """Only the model's weights (e.g. the best checkpoint's, to score the test split)."""
        tensors = {"model": self.model.state_dict()}
        metadata = read_metadata(path)
        raise_on_every_rank(lambda: reshard.check_shapes(tensors, metadata, path), CheckpointError)
        dcp.load(tensors, storage_reader=safe_reader(path))

    def init_from(self, path: Path) -> str:
        """The model weights of checkpoint `path` that fit (fine-tuning); a report of what was
        loaded, resized and initialised."""
        return reshard.init_from(self.model, path)

    def _init_dense_state(self) -> None:
        """Create the dense optimizer's lazily made state (Adam's moments), so that DCP can load
        into it in place (torchrec's KeyedOptimizer.init_state: one step with zero gradients; the
        weights it may move are overwritten by the load)."""
        fused = getattr(self.model, "fused_optimizer", None)
        for _, opt in self.optimizer.optimizers:
            if opt is not fused and len(opt.state) < len(opt.params):
                opt.init_state()
                opt.zero_grad(set_to_none=True)

    def path_of(self, step: int) -> Path | None:
        """The committed checkpoint of `step`, if it exists."""
        path = self.root / step_dir_name(step)
        return path if str(path) in map(str, store.committed(self.root)) else None
