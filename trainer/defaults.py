"""Defaults derived from the data: the knobs a run leaves unset, chosen from the dataset and the
world size by the stated rules below, each printed at start with its reason and written into the
run's resolved config.toml and summary.json (so `--config runs/R/config.toml` repeats it exactly).

Why: fixed defaults fit one size of data. A batch of 2048 rows per rank trains 9 steps an epoch on
a 37k-row census table and a model worse than logistic regression; 16.6 GB of tables for 10k rows
overfit. The rules scale what matters with the data:

  batch       sqrt(rows per rank) down to a power of two in [32, 2048]: as many steps an epoch as rows
              in a batch (~125 on 4k rows a rank, ~780 on 200k), 2048 from 4.2M rows a rank;
  lr          dense `3e-3 x sqrt(global batch / 512)` in [3e-4, 1e-2] (Adam's square-root rule:
              gradient noise falls with the square root of the batch), sparse (Adagrad family)
              `3e-2 x sqrt(global batch / 512)` in [1e-2, 0.2];
  epochs      one pass on big data (>= 4M train rows), else floor(4M / rows) capped at 30, with
              validation 4 times an epoch, early stopping after 6 evaluations without a better
              validation headline, and the best weights kept for the test;
  embedding   dimension 6 x (geometric mean of the tables' rows) ^ 1/4, the nearest power of two
              in [8, 64] (Google's fourth-root rule of thumb), one size for all tables;
  MLP widths  from the input width: the first hidden layer the next power of two at or above it
              (DLRM's bottom MLP: 4 x the dense features), in [64, 256] below 1M train rows and
              [64, 1024] above, each next layer half of it.

Every rule is a pure function of `DataShape`, so the rules are tested without processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_pipeline.schema import DatasetSchema, check_files
from data_pipeline.storage import parquet_file
from models.config import DEEP_MODELS, DLRM_MODELS
from trainer.config import getattr_path

REFERENCE_GLOBAL_BATCH = 512
"""The global batch the reference learning rates below were tuned at (MovieLens, census, demo data)."""
DENSE_LR, DENSE_LR_RANGE = 3e-3, (3e-4, 1e-2)
SPARSE_LR, SPARSE_LR_RANGE = 3e-2, (1e-2, 0.2)
BATCH_RANGE = (32, 2048)
BIG_DATA_ROWS = 4_000_000
"""Train rows from which one epoch is the default (and, from BIG_DATA_ROWS / 2, fewer passes)."""
MAX_EPOCHS = 30
EVALS_PER_EPOCH = 4
PATIENCE = 6
"""Evaluations without a better validation headline before stopping (1.5 epochs at 4 an epoch)."""
FEW_STEPS = 100
"""A run that trains fewer steps than this in all gets a warning."""
KEEP_BEST_MAX_GB = 2.0
"""keep_best holds a host copy of each rank's tables: derived on only while it is this small."""


@dataclass(frozen=True)
class DataShape:
    """What the rules read: the train split's size, the world, and the tables."""

    train_rows: int
    world_size: int
    num_dense: int
    table_rows: tuple[int, ...]

    @property
    def rows_per_rank(self) -> int:
        return self.train_rows // self.world_size

    @classmethod
    def of(cls, schema: DatasetSchema, world_size: int) -> DataShape:
        # dataset.json's count, which preflight's check_files has held the files to; footers if absent
        rows = schema.splits["train"].rows
        if rows is None:
            rows = sum(parquet_file(f).metadata.num_rows for f in check_files(schema, "train"))
        tables = tuple(f.num_embeddings for f in schema.sparse)
        return cls(rows, world_size, len(schema.dense), tables)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _pow2_ceil(x: float) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(x, 1)))))


def _clamp(x, low, high):
    return max(low, min(high, x))


# ---- the rules: (value, reason) -----------------------------------------------------------------
def batch_size(shape: DataShape) -> tuple[int, str]:
    per_rank = shape.rows_per_rank
    size = _clamp(_pow2_floor(math.sqrt(per_rank)), *BATCH_RANGE)
    return size, (
        f"train has {shape.train_rows:,} rows, {per_rank:,} per rank: ~{per_rank // size:,} steps an epoch; "
        f"sqrt(rows per rank) down to a power of two in [{BATCH_RANGE[0]}, {BATCH_RANGE[1]}]"
    )


def learning_rate(reference: float, bounds: tuple[float, float], global_batch: int) -> float:
    """`reference` at REFERENCE_GLOBAL_BATCH, scaled by sqrt(global_batch / reference batch), clamped."""
    return float(f"{_clamp(reference * math.sqrt(global_batch / REFERENCE_GLOBAL_BATCH), *bounds):.3g}")


def learning_rates(global_batch: int) -> tuple[tuple[float, str], tuple[float, str]]:
    """(dense, sparse) learning rates with their reasons."""
    out = []
    for reference, (low, high) in ((DENSE_LR, DENSE_LR_RANGE), (SPARSE_LR, SPARSE_LR_RANGE)):
        why = f"global batch {global_batch:,}: {reference:g} x sqrt({global_batch:,} / {REFERENCE_GLOBAL_BATCH})"
        out.append((learning_rate(reference, (low, high), global_batch), f"{why} in [{low:g}, {high:g}]"))
    return out[0], out[1]


def epochs(shape: DataShape) -> tuple[int, str]:
    if shape.train_rows >= BIG_DATA_ROWS:
        return 1, f"train has {shape.train_rows:,} rows (>= {BIG_DATA_ROWS:,}): one pass"
    count = min(MAX_EPOCHS, BIG_DATA_ROWS // shape.train_rows)
    return count, (
        f"train has {shape.train_rows:,} rows: up to {count} passes (floor({BIG_DATA_ROWS:,} / rows), at most "
        f"{MAX_EPOCHS}), stopped early when validation stops improving"
    )


def embedding_dim(shape: DataShape) -> tuple[int, str]:
    if not shape.table_rows:
        return 16, "no sparse features"
    mean = math.exp(sum(math.log(max(n, 1)) for n in shape.table_rows) / len(shape.table_rows))
    dim = _clamp(1 << round(math.log2(6 * mean**0.25)), 8, 64)
    return dim, (
        f"{len(shape.table_rows)} tables, geometric mean {mean:,.0f} rows: 6 x rows^(1/4) = {6 * mean**0.25:.1f}, "
        "the nearest power of two in [8, 64]"
    )


def width_cap(shape: DataShape) -> int:
    return 256 if shape.train_rows < 1_000_000 else 1024


def hidden_width(inputs: int, shape: DataShape) -> int:
    return _clamp(_pow2_ceil(inputs), 64, width_cap(shape))


def _widths_why(inputs: int, shape: DataShape, what: str, then: str = "then halved") -> str:
    rows = "< 1M" if shape.train_rows < 1_000_000 else ">= 1M"
    return f"{what} {inputs}: the next power of two in [64, {width_cap(shape)}] ({rows} train rows), {then}"


def dlrm_layers(shape: DataShape, dim: int) -> tuple[tuple[list[int], str], tuple[list[int], str]]:
    bottom_in = 4 * max(shape.num_dense, 1)
    bottom = [hidden_width(bottom_in, shape), dim]
    features = len(shape.table_rows) + 1  # the tables and the dense vector
    top_in = dim + features * (features - 1) // 2
    top_h = hidden_width(top_in, shape)
    return (
        (bottom, _widths_why(bottom_in, shape, f"4 x {shape.num_dense} dense features =", f"then {dim}")),
        ([top_h, top_h // 2, 1], _widths_why(top_in, shape, f"{features} interacting vectors give an input of")),
    )


def deep_layers(shape: DataShape, dim: int) -> tuple[list[int], str]:
    inputs = shape.num_dense + len(shape.table_rows) * dim
    h = hidden_width(inputs, shape)
    return [h, h // 2], _widths_why(inputs, shape, "input width")


def tower_layers(shape: DataShape, dim: int) -> tuple[list[int], str]:
    inputs = shape.num_dense + len(shape.table_rows) * dim  # both towers together: an upper bound of one
    h = _clamp(_pow2_ceil(inputs / 2), 32, 256)
    return [h], f"half the input width of both towers ({inputs}), the next power of two in [32, 256]"


# ---- applying them --------------------------------------------------------------------------------
def derive(cfg, shape: DataShape, explicit: frozenset[str]) -> dict[str, str]:
    """Set every knob of `cfg` the rules cover and `explicit` lacks; returns {key: reason} of those set.

    `explicit`: the `section.key` names the config file or the command line gave (they win)."""
    derived: dict[str, str] = {}
    fixed = set(explicit)

    def put(key: str, value, why: str) -> None:
        if key in fixed:
            return
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        derived[key] = why
        fixed.add(key)

    put("data.batch_size", *batch_size(shape))
    global_batch = cfg.data.batch_size * shape.world_size
    dense_lr, sparse_lr = learning_rates(global_batch)
    put("optimizer.dense_lr", *dense_lr)
    put("optimizer.sparse_lr", *sparse_lr)

    model = cfg.model
    if model.name in DLRM_MODELS and "model.dense_arch_layer_sizes" in fixed:
        put("model.embedding_dim", model.dense_arch_layer_sizes[-1], "the bottom MLP's last size")
    put("model.embedding_dim", *embedding_dim(shape))
    dim = model.embedding_dim
    if model.name in DLRM_MODELS:
        bottom, top = dlrm_layers(shape, dim)
        put("model.dense_arch_layer_sizes", *bottom)
        put("model.over_arch_layer_sizes", *top)
    elif model.name in DEEP_MODELS:
        put("model.deep_layer_sizes", *deep_layers(shape, dim))
    elif model.name == "two_tower":
        put("model.tower_layer_sizes", *tower_layers(shape, dim))

    put("training.epochs", *epochs(shape))
    if cfg.training.epochs > 1:
        steps = max(1, shape.rows_per_rank // cfg.data.batch_size)
        every = max(1, round(steps / EVALS_PER_EPOCH))
        put("training.eval_every", every, f"{EVALS_PER_EPOCH} validations an epoch of ~{steps:,} steps")
        put("training.early_stopping_patience", PATIENCE, f"stop after {PATIENCE} validations without a better one")
        table_gb = sum(shape.table_rows) * dim * 4 / shape.world_size / 1e9
        if table_gb <= KEEP_BEST_MAX_GB:
            put("training.keep_best", True, "several passes: test with the best validation's weights")
    return derived


def few_steps_warning(total_steps: int) -> str | None:
    if total_steps >= FEW_STEPS:
        return None
    return (
        f"this run trains {total_steps} steps in all (< {FEW_STEPS}): too few for a good model; "
        "lower data.batch_size or raise training.epochs"
    )


def as_record(cfg, derived: dict[str, str]) -> dict[str, dict]:
    """{key: {"value", "why"}} for summary.json."""
    return {key: {"value": getattr_path(cfg, key), "why": why} for key, why in derived.items()}


def precision() -> tuple[str, str]:
    """bf16 where this process's device (the one `init_distributed` picks) has bf16 arithmetic
    at speed, fp32 elsewhere. Measured on an AVX512-BF16 CPU: 1.27x the samples/s of fp32 for the
    4M-row default DLRM at the same test AUC (BENCHMARKS.md, "Precision auto"), 1.65x at MLPerf's
    MLP sizes."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return "bf16", f"CUDA compute capability {major}.{minor}: bf16 tensor cores"
        return "fp32", f"CUDA compute capability {major}.{minor} (< 8.0): no fast bf16"
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    found = [name for name, check in checks if getattr(torch.cpu, check, lambda: False)()]
    if found:
        return "bf16", f"a CPU with {' and '.join(found)}"
    return "fp32", "a CPU without bf16 instructions (AVX512-BF16 or AMX)"


def resolve(cfg, schema: DatasetSchema, world_size: int) -> None:
    """Fill the derived defaults into `cfg` (cfg.derived: their reasons), unless
    `derive_defaults` is off; resolve `training.mixed_precision auto` (a hardware rule: derived with
    the others, or asked for by name); then check the rules across fields."""
    if cfg.derive_defaults:
        cfg.derived = derive(cfg, DataShape.of(schema, world_size), cfg.explicit)
    if cfg.training.mixed_precision == "auto":
        named = "training.mixed_precision" in cfg.explicit
        value, why = precision() if cfg.derive_defaults or named else ("fp32", "derive_defaults false")
        cfg.training.mixed_precision = value
        cfg.derived = {**cfg.derived, "training.mixed_precision": why}
    cfg.model.check()
