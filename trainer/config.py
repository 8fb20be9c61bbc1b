"""One typed config tree, loaded from TOML and overridden on the command line.

    python -m trainer --config configs/demo.toml --data.batch_size 4096 --model dlrm_dcn

Every knob has one name, `section.key`, used in TOML (`[section] key = ...`), on the command
line (`--section.key`), in the resolved `config.toml` written to the run directory, and in the
reference, docs/config.md (generated from these dataclasses). Short aliases: `--model`
(model.name), `--data` (data.path), `--run-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from data_pipeline.config import DataConfig, check_choices
from data_pipeline.storage import location
from models.config import ModelConfig
from trainer.tracking import LoggingConfig

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")


LR_SCHEDULES = ("constant", "linear", "cosine", "plateau")
DENSE_OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimizerConfig:
    dense: Literal[DENSE_OPTIMIZERS] = "adam"
    """Optimizer of the dense (data-parallel) MLPs: adam, adamw, adagrad or sgd."""
    dense_lr: float = 1e-3
    """Learning rate of the dense optimizer."""
    sparse: Literal[SPARSE_OPTIMIZERS] = "rowwise_adagrad"
    """Optimizer fused into the embedding tables' backward: rowwise_adagrad, adagrad or sgd."""
    sparse_lr: float = 0.05
    """Learning rate of the fused sparse optimizer (every table, unless table_lr or a model's own
    rate, e.g. wide_deep's model.wide_lr, says otherwise)."""
    table_lr: list[str] = field(default_factory=list)
    """Per-table sparse learning rates overriding sparse_lr, as "table=lr" (e.g. "t_user_id=0.1")."""
    eps: float = 1e-8
    """Epsilon of the (rowwise) Adagrad and Adam updates."""
    weight_decay: float = 0.0
    """Weight decay of the dense parameters (decoupled for adamw, L2 otherwise); the tables get
    embedding_l2 instead."""
    embedding_l2: float = 0.0
    """L2 penalty on the embeddings each training batch looks up, added to the loss: this x the
    batch mean of a row's squared embedding norm over all tables (models/penalty.py)."""
    grad_clip_norm: float = 0.0
    """Clip the dense gradients to this global norm (0: off). Fused table updates happen inside
    the backward pass and are not clipped."""
    lr_schedule: Literal[LR_SCHEDULES] = "constant"
    """Learning-rate schedule of every optimizer (dense and fused sparse) after warmup: constant,
    linear or cosine decay to min_lr_ratio at the last step, or plateau (ReduceLROnPlateau on the
    validation metric)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    min_lr_ratio: float = 0.0
    """linear/cosine: the final learning rate as a fraction of the initial one."""
    plateau_factor: float = 0.5
    """plateau: multiply the learning rates by this when the validation metric stops improving."""
    plateau_patience: int = 0
    """plateau: evaluations without improvement before the rates drop."""

    def __post_init__(self) -> None:
        check_choices(self, "optimizer")
        if min(self.warmup_steps, self.weight_decay, self.embedding_l2, self.grad_clip_norm) < 0 or not (
            0 <= self.min_lr_ratio <= 1
        ):
            raise ValueError(
                "optimizer: warmup_steps, weight_decay, embedding_l2, grad_clip_norm must be >= 0, "
                "min_lr_ratio in [0, 1]"
            )
        rates = {"optimizer.dense_lr": self.dense_lr, "optimizer.sparse_lr": self.sparse_lr}
        rates |= {f"optimizer.table_lr {table}": lr for table, lr in self.table_lrs().items()}
        for name, lr in rates.items():
            if not lr >= 0:  # also catches NaN; 0 freezes (a test of init_from uses it)
                raise ValueError(f"{name} is {lr}; a learning rate must be >= 0")

    def table_lrs(self) -> dict[str, float]:
        rates = {}
        for entry in self.table_lr:
            table, sep, lr = entry.partition("=")
            try:
                rates[table.strip()] = float(lr)
            except ValueError:
                sep = ""
            if not sep or not table.strip():
                raise ValueError(f"optimizer.table_lr entries look like 't_user_id=0.1', got '{entry}'")
        return rates


COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching")
UVM_KERNELS = ("fused_uvm", "fused_uvm_caching")


def _table_entries(entries: list[str], key: str, allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """ "table=a+b" entries -> {table: [a, b]}, each value one of `allowed`."""
    out = {}
    for entry in entries:
        table, sep, values = entry.partition("=")
        choices = [v.strip() for v in values.split("+") if v.strip()]
        if not sep or not table.strip() or not choices:
            raise ValueError(
                f"sharding.{key} entries look like 't_cat_25={allowed[0]}' (several joined by +), got '{entry}'"
            )
        unknown = [c for c in choices if c not in allowed]
        if unknown:
            raise ValueError(f"sharding.{key}: unknown {unknown} in '{entry}'; choose from {allowed}")
        out[table.strip()] = choices
    return out


@dataclass
class ShardingConfig:
    sharding_types: list[Literal[SHARDING_TYPES]] = field(default_factory=lambda: list(SHARDING_TYPES))
    """Sharding types the planner may use for every table. data_parallel (each rank a full copy,
    gradients all-reduced; the planner's cost model picks it for small, busy tables) trains as the
    unsharded reference does (tests/trainer/test_sharded_equals_unsharded.py) and checkpoints as a
    sharded table does, so a run can resume on a plan that shards it. Unpooled tables
    (EmbeddingCollection) never get it on CPU, where torchrec cannot run it. torchrec offers
    row_wise and table_row_wise on CUDA only; on CPU a table is split column-wise."""
    table_sharding_types: list[str] = field(default_factory=list)
    """Per-table sharding types overriding sharding_types, as "table=type[+type...]"
    (e.g. "t_cat_25=row_wise+table_row_wise")."""
    compute_kernels: list[Literal[COMPUTE_KERNELS]] = field(default_factory=list)
    """Embedding kernels the planner may use for every table (empty: any the device supports):
    fused (tables in GPU memory, or host memory on CPU), fused_uvm_caching (tables in host memory
    with a GPU cache of the hot rows: tables bigger than the GPUs), fused_uvm, dense."""
    table_compute_kernels: list[str] = field(default_factory=list)
    """Per-table kernels overriding compute_kernels, as "table=kernel[+kernel...]"."""
    cache_load_factor: float = 0.2
    """fused_uvm_caching: the share of a table's rows its GPU cache holds."""
    min_partition: int = 0
    """Narrowest column shard (embedding columns) column-wise sharding may cut (0: torchrec's 128)."""
    hbm_cap_gb: float = 0.0
    """GPU memory per device the planner may fill (0: the device's total memory)."""
    ddr_cap_gb: float = 0.0
    """Host memory per rank the planner may fill (0: the host's memory / processes per host).
    On CPU the tables live there."""
    storage_reserve: float = 0.15
    """Share of each device's memory the planner leaves for the dense part, activations and
    buffers (torchrec's FixedPercentageStorageReservation)."""
    intra_host_bw_gbps: float = 0.0
    """Bandwidth between ranks of one host, GB/s, for the planner's cost model (0: torchrec's
    600, NVLink class)."""
    inter_host_bw_gbps: float = 0.0
    """Bandwidth between hosts per rank, GB/s (0: torchrec's 12.5, 100 Gb/s networking)."""

    def __post_init__(self) -> None:
        check_choices(self, "sharding")
        self.table_types(), self.table_kernels()  # validate the "table=..." entries now
        if not 0 < self.cache_load_factor <= 1 or not 0 <= self.storage_reserve < 1:
            raise ValueError("sharding.cache_load_factor must lie in (0, 1] and sharding.storage_reserve in [0, 1)")
        if (
            min(self.min_partition, self.hbm_cap_gb, self.ddr_cap_gb, self.intra_host_bw_gbps, self.inter_host_bw_gbps)
            < 0
        ):
            raise ValueError("sharding: min_partition, caps and bandwidths must be >= 0")

    def table_types(self) -> dict[str, list[str]]:
        return _table_entries(self.table_sharding_types, "table_sharding_types", SHARDING_TYPES)

    def table_kernels(self) -> dict[str, list[str]]:
        return _table_entries(self.table_compute_kernels, "table_compute_kernels", COMPUTE_KERNELS)


@dataclass
class TrainingConfig:
    epochs: int = 1
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many steps in all (0: run every epoch to the end)."""
    eval_every: int = 0
    """Evaluate on the valid split every this many steps (0: at the end of each epoch)."""
    log_every: int = 50
    """Steps between loss/throughput records in metrics.jsonl and TensorBoard."""
    seed: int = 0
    """Seeds model initialisation and the shuffling order."""
    pipelined: bool = True
    """Use TrainPipelineSparseDist (overlaps input all-to-all with compute); false runs the
    plain, non-overlapped step, for debugging."""
    progress_bar: bool = True
    """Show a progress bar (rank 0, tqdm) while training."""
    mixed_precision: Literal[PRECISIONS] = "auto"
    """auto: bf16 where the device runs it fast (CUDA compute capability >= 8.0; a CPU with
    AVX512-BF16 or AMX), fp32 elsewhere, printed at start (fp32 with derive_defaults false,
    unless auto is asked for by name). bf16: training steps run their forward under torch.autocast
    in bfloat16 (the MLPs and interactions; embedding lookups, the loss and the optimizers stay
    fp32); validation and test score in fp32, as an exported model serves. No fp16: its loss
    scaling cannot be undone inside the tables' fused optimizer, which updates them during the
    backward pass."""
    compile: bool = False
    """torch.compile each dense module (the MLPs, cross layers, towers; not the sharded tables):
    fused kernels for a few % to 1.3x on big MLPs, for ~20-60 s of compiling per process and shape
    (BENCHMARKS.md, "torch.compile"): off unless asked, as it loses on short runs."""
    auroc_thresholds: int = 0
    """0: exact AUC (keeps every score); N: binned AUC over N thresholds, for huge eval sets."""
    early_stopping_patience: int = 0
    """Stop when the validation metric (auc, or rmse for regression) has not improved for this many
    evaluations in a row (0: never stop early)."""

    top_k: list[int] = field(default_factory=lambda: [10, 50])
    """Cut-offs of the retrieval metrics (recall@K, ndcg@K over the whole catalogue, per user),
    computed for models with towers on datasets that list their items and users (`recsys prepare
    movielens --implicit`); an empty list turns them off. When on, recall@<smallest K> is the
    validation metric that decides "best" and early stopping."""

    keep_best: bool = False
    """Keep a copy of the weights of the best validation (in memory: one more copy of every table
    shard on each rank) and score the test split with them instead of the last weights."""

    profile_steps: list[int] = field(default_factory=list)
    """Record a torch.profiler trace of training steps [first, last], e.g. [100, 104] (a few steps
    after warm-up), one per rank in <run_dir>/profile (TensorBoard's profiler tab, Perfetto).
    Empty: off."""

    table_stats_max_rows: int = 10_000_000
    """Track which rows of each table training looks up, for tables of at most this many rows (a
    bool per row on every rank; 0: off). Each validation records `tables/<feature>_coverage` (share
    of the rows looked up so far) and `_reuse` (share of the lookups since the last one that hit a
    row seen before) in metrics.jsonl and TensorBoard; summary.json has the final coverage. Cost:
    about 0.2 ms of host time per batch of 26 features x 256 rows (0.4 ms at 1,024 rows)."""

    threads: int = 0
    """Intra-op CPU threads per rank (torch.set_num_threads; 0: torch's default, which is every
    core in a plain `python -m trainer`, and 1 per rank under torchrun with several ranks, or
    OMP_NUM_THREADS). Matters for CPU training: on 2 cores, 1 thread trains the demo's small
    MLPs ~1.4x faster than 2, while MLPerf-sized MLPs train ~1.8x faster on 2 (BENCHMARKS.md)."""

    divergence_factor: float = 10.0
    """Stop the run with an error when a log interval's mean loss exceeds this many times the median
    of the intervals before it (0: off; trainer/guard.py). A non-finite loss or weight stops it always."""

    skip_nonfinite_batches: int = 0
    """Skip up to this many batches in a run whose loss is not finite on some rank (no backward:
    no weight, table or optimizer state moves), with a warning each; one more stops the run as
    diverged. 0 (off): a non-finite loss stops the run. Costs one all-reduce and host sync per step."""

    stop_at_step: int = 0
    """Save a checkpoint and exit at this step without finishing the run, as a pre-empted job would
    (0: off). Unlike max_steps it changes neither the learning-rate schedule nor when training
    ends: rerunning the same command resumes (checkpoint.resume = "auto") and finishes exactly as
    an uninterrupted run. For time-boxed jobs, and for testing resumption."""

    def __post_init__(self) -> None:
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ValueError(
                f"training.profile_steps must be [first, last] with 1 <= first <= last, got {self.profile_steps}"
            )
        if min(self.stop_at_step, self.table_stats_max_rows, self.threads, self.skip_nonfinite_batches) < 0:
            raise ValueError(
                "training.stop_at_step, training.table_stats_max_rows, training.threads and "
                "training.skip_nonfinite_batches must be >= 0"
            )
        if self.epochs <= 0 or self.max_steps < 0 or self.eval_every < 0 or self.log_every <= 0:
            raise ValueError("training: epochs and log_every must be positive; max_steps and eval_every >= 0")
        check_choices(self, "training")
        if any(k <= 0 for k in self.top_k):
            raise ValueError(f"training.top_k must be positive, got {self.top_k}")
        if self.early_stopping_patience < 0:
            raise ValueError("training.early_stopping_patience must be >= 0")
        if not self.divergence_factor >= 0:  # NaN too
            raise ValueError(f"training.divergence_factor must be >= 0, got {self.divergence_factor}")


RESUME_MODES = ("auto", "never")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Save checkpoints (sharded, with torch.distributed.checkpoint) every `every_steps`, at the end
    of training and, with keep_best, at each better validation. Loading (resume, init_from) works
    either way."""
    dir: str = ""
    """Directory of the run's checkpoints (default: <run_dir>/checkpoints); one sub-directory
    step-<N> per committed checkpoint."""
    every_steps: int = 500
    """Save every this many steps (0: only at the end, and at better validations with keep_best)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0: keep all); older ones are deleted once a newer
    one is committed."""
    keep_best: bool = True
    """Also save a checkpoint at each evaluation that improves the validation metric, and keep the
    best one besides the last keep_last (training.keep_best then survives a restart)."""
    resume: str = "auto"
    """auto: continue from the latest committed checkpoint in `dir`, if any (what a restarted job
    needs; a fresh start otherwise); never: always start fresh (an error if `dir` already holds
    checkpoints); or a path: a checkpoint (step-<N>), a checkpoints directory or a run directory
    (its latest checkpoint). A resumed run continues exactly where the checkpoint was taken."""
    init_from: str = ""
    """Start from the model weights of this checkpoint (or run directory) with a fresh optimizer
    and step 0: fine-tuning. Tables may have grown (rows are copied, new rows keep their
    initialisation) and the model may have new tables or layers; a report lists what was loaded,
    resized and initialised. Ignored when the run resumes from its own checkpoints."""
    verify: bool = True
    """Check every file's sha256 against the checkpoint's record before loading (ranks share the
    work); file sizes are always checked."""
    async_save: bool = False
    """Write checkpoints in the background (torch.distributed.checkpoint.async_save): training
    waits only while this rank's shards and optimizer state are copied to host memory, then goes
    on while a thread writes, checksums and commits them (one save in flight; the next save, the
    end of training and a stop wait for it). Costs one more host copy of the rank's state during
    the write and a second (gloo) process group for the save's collectives."""
    preempt_grace_s: float = 30.0
    """What the scheduler allows between its SIGTERM (or SIGINT, SIGUSR1) and its SIGKILL. On such
    a signal the ranks agree on the next step, save a checkpoint there and exit with 128 + the
    signal's number (trainer/preempt.py); a save that took longer than this is reported, so the
    grace period (Kubernetes' terminationGracePeriodSeconds, Slurm's --signal lead) can be raised."""

    def __post_init__(self) -> None:
        if not self.preempt_grace_s > 0:
            raise ValueError(f"checkpoint.preempt_grace_s must be > 0, got {self.preempt_grace_s}")
        if self.every_steps < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every_steps and checkpoint.keep_last must be >= 0")
        if not self.resume:
            raise ValueError(f"checkpoint.resume must be {' or '.join(RESUME_MODES)} or a checkpoint path")


@dataclass
class Config:
    config: Annotated[str, tyro.conf.arg(aliases=("-c",))] = ""
    """TOML file the defaults come from (its stem names the run)."""
    run_dir: Annotated[str, tyro.conf.arg(aliases=("--run-dir",))] = ""
    """Output directory (default: runs/<config file stem>)."""
    derive_defaults: bool = True
    """Derive the knobs that neither the config file nor the command line sets from the dataset and
    the world size (batch size, learning rates, epochs, validation cadence, early stopping,
    keep-best, embedding dimension, MLP widths: rules in trainer/defaults.py), each printed at
    start with its reason and written into the resolved config.toml; false: the fixed defaults
    listed here."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    explicit: tyro.conf.Suppress[frozenset[str]] = field(default_factory=frozenset, compare=False, repr=False)
    """(Not a knob.) The `section.key` names the config file or the command line set: derived
    defaults never replace them."""
    derived: tyro.conf.Suppress[dict[str, str]] = field(default_factory=dict, compare=False, repr=False)
    """(Not a knob.) The knobs set by `trainer.defaults.derive`, with their reasons."""

    def __post_init__(self) -> None:
        if not self.run_dir:
            self.run_dir = str(Path("runs") / (Path(self.config).stem if self.config else "default"))

    def knobs(self) -> dict[str, Any]:
        """Every knob as {"section.key": value} (what experiment trackers get as parameters)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out.update({f"{f.name}.{k}": v for k, v in dataclasses.asdict(value).items()})
            elif f.name not in NOT_KNOBS:
                out[f.name] = value
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML (what `--config` reads back)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_KNOBS}
        top = {k: v for k, v in values.items() if not dataclasses.is_dataclass(v)}
        sections = {k: dataclasses.asdict(v) for k, v in values.items() if dataclasses.is_dataclass(v)}
        lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
        for name, values in sections.items():
            lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"


NOT_KNOBS = ("explicit", "derived")
"""Config fields that record where values came from; not read from or written to TOML."""


def toml_value(value: Any) -> str:
    """A value as TOML writes it (strings quoted, booleans lower case, lists in brackets)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def getattr_path(cfg: Config, key: str) -> Any:
    """The value of knob `section.key`."""
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def checkpoint_root(cfg: Config) -> Path:
    """checkpoint.dir (a path or an fsspec URL), by default the run directory's checkpoints/."""
    return location(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run_dir) / "checkpoints"


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the file and `section.key`."""


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return (
            f"a list, each {_type_name(inner)}"
            if typing.get_origin(inner) is Literal
            else f"a list of {inner.__name__}s"
        )
    return kind.__name__


def _fits(value: Any, kind: Any) -> bool:
    """Whether a TOML value has the knob's type (an integer is a float; a boolean is not a number)."""
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(kind)[0]) for v in value)
    if typing.get_origin(kind) is Literal:
        return value in typing.get_args(kind)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def from_dict(cls: type, values: dict, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, each value checked against its knob's type;
    unknown keys are an error, not silently ignored."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a [table] of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        kind = typing.get_args(hints[key])[0] if typing.get_origin(hints[key]) is Annotated else hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, f"{where} [{key}]")
        elif not _fits(value, kind):
            raise ConfigError(f"{where}: {key} = {value!r} should be {_type_name(kind)}")
        else:
            kwargs[key] = float(value) if kind is float else value
    return cls(**kwargs)


def _check_finite(section: Any, prefix: str = "") -> None:
    """No knob is NaN or infinite (a NaN rate would train to NaN without a word until the guard)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} is {value}; expected a finite number")


# Short flags for the knobs set most often; each stands for one `--section.key`.
ALIASES = {"--model": "--model.name", "--data": "--data.path", "--verbose": "--logging.verbose"}


SWITCHES = {"--verbose"}
"""Aliases of boolean knobs that may stand alone: `--verbose` is `--logging.verbose true`."""


def _normalise(argv: list[str]) -> list[str]:
    """Expand aliases, and accept TOML's `true`/`false` where the parser wants True/False."""
    out = []
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in SWITCHES and not eq and (i + 1 == len(argv) or argv[i + 1] not in ("true", "false")):
            out += [ALIASES[flag], "True"]
            continue
        if not eq and flag in ("true", "false"):
            flag = flag.capitalize()
        elif value in ("true", "false"):
            value = value.capitalize()
        out.append(ALIASES.get(flag, flag) + eq + value)
    return out


def load_config(argv: Sequence[str] = (), prog: str | None = None) -> Config:
    """`--config FILE` gives the defaults; every other flag overrides one field. The flags are
    `argv` only (never sys.argv: a notebook's own flags are not the trainer's); `prog` names the
    command in `--help`."""
    argv = _normalise(list(argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", "-c", default="")
    known, _ = pre.parse_known_args(argv)
    default, toml = Config(), {}
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            with path.open("rb") as f:
                toml = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        unknown = set(toml) & set(NOT_KNOBS)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
        try:
            default = from_dict(Config, {**toml, "config": str(path)}, str(path))
        except ConfigError:
            raise
        except ValueError as e:  # a section's own check (__post_init__)
            raise ConfigError(f"{path}: {e}") from None
    description = __doc__.split("\n\n")[0] + " Aliases: " + ", ".join(f"{a} = {k}" for a, k in ALIASES.items())
    with _one_line_errors():
        cfg = tyro.cli(
            Config,
            default=default,
            args=argv,
            prog=prog,
            use_underscores=True,
            description=description,
            config=(tyro.conf.FlagConversionOff,),  # booleans take a value, as in TOML: --data.shuffle false
        )
    _check_finite(cfg)
    cfg.explicit = explicit_keys(toml, argv)
    return cfg


def _knob_flags(cls: type = Config, prefix: str = "--") -> list[str]:
    """Every `--section.key` flag of the config tree."""
    flags = []
    for f in dataclasses.fields(cls):
        if f.name not in NOT_KNOBS:
            kind = typing.get_type_hints(cls)[f.name]
            kind = typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
            nested = dataclasses.is_dataclass(kind)
            flags += _knob_flags(kind, f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
    return flags


def _raise_one_line(event: Any) -> None:
    """tyro's parse-error hook: a bad value or an unknown flag becomes one ConfigError line, not
    tyro's framed message (other failures keep tyro's own output)."""
    from tyro import _errors

    flags = getattr(getattr(getattr(event, "argument", None), "lowered", None), "name_or_flags", None)
    where = f"{'/'.join(flags)}: " if flags else ""
    if isinstance(event, _errors.InstantiationFailure):  # a value a type or a section's check refused
        raise ConfigError(where + event.message)
    if isinstance(event, _errors.InvalidChoice):
        raise ConfigError(f"{where}{event.value!r} is not one of {', '.join(event.choices)}")
    if isinstance(event, _errors.BadValue):
        raise ConfigError(
            f"{where}expected a value" + (f", got {event.offending_value!r}" if event.offending_value else "")
        )
    if isinstance(event, _errors.UnrecognizedArgs):
        message = f"unknown flag(s) {' '.join(event.tokens)}"
        for token in event.tokens:
            close = difflib.get_close_matches(token.partition("=")[0].replace("-", "_"), _knob_flags(), n=1)
            message += f" (did you mean {close[0]}?)" if token.startswith("-") and close else ""
        raise ConfigError(message + "; `--help` lists them all")


@contextlib.contextmanager
def _one_line_errors():
    """tyro's (experimental) parse-error hook when this tyro has it; its framed messages if not."""
    try:
        from tyro._errors import on_parse_error
    except ImportError:
        yield
        return
    with on_parse_error(_raise_one_line):
        yield


def explicit_keys(toml: dict, argv: list[str]) -> frozenset[str]:
    """The `section.key` names a TOML document and a normalised command line set."""
    keys = {f"{s}.{k}" for s, table in toml.items() if isinstance(table, dict) for k in table}
    keys |= {s for s, v in toml.items() if not isinstance(v, dict)}
    keys |= {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return frozenset(keys)
