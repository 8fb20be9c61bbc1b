"""What must match for a checkpoint to be resumed by a run: the model, the optimizers' kinds and
the dataset schema. Other config changes are allowed and reported."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from data_pipeline.schema import DatasetSchema, split_digest
from trainer.checkpoint.store import CheckpointError
from trainer.config import Config


class IncompatibleCheckpoint(CheckpointError):
    """An intact checkpoint of another model, optimizer or dataset."""


# Keys that may change between a checkpoint and its resumption without a word: where things go,
# how they are shown, how tables are placed (DCP reshards on load), and whether values were derived
# (the values themselves are compared).
_FREE = (
    "config",
    "run_dir",
    "derive_defaults",
    "data.path",
    "data.eval_batch_size",
    "training.progress_bar",
    "training.stop_at_step",
    "training.log_every",
    "training.divergence_factor",
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


def data_differences(meta: dict, schema: DatasetSchema) -> list[str]:
    """Notes on splits whose files changed since the checkpoint (another dataset of the same
    schema, rows appended, files rewritten): allowed, since continuing on new data is a use, but
    said. The train split's new order is handled by TrainState.resume_position."""
    saved = meta.get("data_files") or {}  # absent in checkpoints written before it was recorded
    out = []
    for split in sorted(saved.keys() & schema.splits.keys()):
        if saved[split] != split_digest(schema, split):
            before = (meta.get("dataset", {}).get("splits", {}).get(split) or {}).get("rows")
            now = schema.splits[split].rows
            rows = f" ({before:,} rows then, {now:,} now)" if before is not None and now is not None else ""
            then = "training goes on with these files" if split == "train" else "its metrics are not comparable"
            out.append(f"the {split} split's files changed since the checkpoint{rows}: {then}")
    return out


def config_differences(saved_toml: str, cfg: Config) -> tuple[list[str], list[str]]:
    """(fatal, allowed) differences between a checkpoint's resolved config and this run's."""
    # A key the checkpoint's config lacks (added to the trainer since) had its default value then.
    saved = {**_flat(tomllib.loads(Config().to_toml())), **_flat(tomllib.loads(saved_toml))}
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
    return allowed + data_differences(meta, schema)
