"""Unsharded model files from checkpoints, and batch scoring with them, on CPU without
torch.distributed.

    recsys export runs/demo --out models/demo.pt              # a run dir: its latest checkpoint
    recsys export runs/demo/checkpoints/step-00000400 --out models/demo-400.pt
    recsys export runs/demo --best --out models/demo-best.pt    # the best validation's checkpoint
    recsys predict --model models/demo.pt --data data/synthetic --split test --out preds.parquet
    recsys export runs/demo --format torch-export --out models/demo.pt2  # for serving: trainer.tools.serving

A model file is one `torch.save` of plain tensors, strings and numbers, read back with
`torch.load(weights_only=True)` (no pickled code runs):

    {"format": "recsys-trainer model", "version": 1,
     "state_dict": {name: tensor},   # the whole model, every table unsharded, as build_model names it
     "config": "<the run's resolved config.toml>", "dataset": {dataset.json of the training data},
     "step": N, "checkpoint": "<where it came from>", "valid": {metrics at that step, if evaluated},
     "headline": "the metric the run chose its best by (auc, rmse, recall@10), or None"}

`predict` builds the model with `models.build_model` (tables on the CPU), loads the state dict
strictly, scores every row of a split in file order and writes `row`, `label`, (`weight`),
`prediction` (a probability for binary tasks, the clipped value for regression) and, for binary
tasks, `logit`, as one Parquet file written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from data_pipeline.atomic import write_atomic
from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DataError, DatasetSchema
from data_pipeline.storage import StorageError, location
from trainer.checkpoint import CheckpointError, locate, read_meta, step_dir_name, verify_files
from trainer.checkpoint.safe_reader import safe_reader
from trainer.config import Config, from_dict

MODEL_FORMAT = "recsys-trainer model"
MODEL_VERSION = 1


def checkpoint_tensors(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` ("model" or "optim") of a checkpoint, unsharded, read in this
    process alone (DCP assembles each tensor from the shards every rank wrote)."""
    reader = safe_reader(path)
    metadata = reader.read_metadata()
    lead = prefix + "."
    tensors = {
        key[len(lead) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(lead) and isinstance(entry, TensorStorageMetadata)
    }
    flat = {lead + key: value for key, value in tensors.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=reader, no_dist=True)
    return {key[len(lead) :]: value for key, value in flat.items()}


def _config(text: str, where: str) -> Config:
    return from_dict(Config, tomllib.loads(text), where)


def build_cpu_model(cfg: Config, schema: DatasetSchema) -> torch.nn.Module:
    """The training model (with its loss wrapper), every table on the CPU, unsharded."""
    from models import build_model

    cpu = torch.device("cpu")
    return build_model(cfg.model, schema, dense_device=cpu, sparse_device=cpu)


def checkpoint_model(path: Path, meta: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(model in eval mode, its state dict) of a committed checkpoint, built on the CPU and loaded
    strictly after every file is checked against checkpoint.json (a corrupt one fails clearly)."""
    problems = verify_files(path, meta)
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    state = checkpoint_tensors(path)
    cfg = _config(meta["config"], f"{path}/checkpoint.json config")
    model = build_cpu_model(cfg, DatasetSchema.from_json(meta["dataset"], ".", f"{path}/checkpoint.json dataset"))
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, state


def chosen_checkpoint(checkpoint: str | Path, best: bool = False) -> tuple[Path, dict]:
    """(path, checkpoint.json) of `checkpoint` (a checkpoint, checkpoints or run directory: its
    latest); with `best`, of the checkpoint of its best validation (kept by checkpoint.keep_best)."""
    path = locate(checkpoint)
    meta = read_meta(path)
    if not best:
        return path, meta
    step = meta["state"].get("best", {}).get("step")
    if step is None:
        raise CheckpointError(f"{path}: no validation has been recorded, so there is no best checkpoint")
    path = path.parent / step_dir_name(step)
    if not (path / "checkpoint.json").is_file():
        raise CheckpointError(f"the best validation was at step {step}, but {path} was not kept (checkpoint.keep_best)")
    return path, read_meta(path)


def export(checkpoint: str | Path, out: str | Path, best: bool = False) -> dict:
    """Write the model file of `checkpoint` (see `chosen_checkpoint`) to `out`; returns its contents."""
    path, meta = chosen_checkpoint(checkpoint, best)
    out = location(out)
    _, state = checkpoint_model(path, meta)  # the file will load: every name and shape fits the model code
    train, best = meta["state"].get("train", {}), meta["state"].get("best", {})
    blob = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "state_dict": state,
        "config": meta["config"],
        "dataset": meta["dataset"],
        "step": meta["step"],
        "checkpoint": str(path),
        "valid": train.get("valid") if train.get("valid_step") == meta["step"] else {},
        "headline": best.get("metric"),  # the run's "better" metric (checkpoints before it was saved: None)
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save(blob, tmp))
    return blob


def export_serving(checkpoint: str | Path, out: str | Path, best: bool = False) -> dict:
    """Write `checkpoint`'s model as a torch.export program (trainer.tools.serving) to `out`;
    returns the input contract written inside it."""
    from trainer.tools.serving import contract, export_program

    path, meta = chosen_checkpoint(checkpoint, best)
    out = location(out)
    model, _ = checkpoint_model(path, meta)
    schema = DatasetSchema.from_json(meta["dataset"], ".", f"{path}/checkpoint.json dataset")
    about = {"step": meta["step"], "checkpoint": str(path), "model": _config(meta["config"], "x").model.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    export_program(model, schema, out, about)
    return contract(schema, about)


def load_model_file(file: str | Path) -> tuple[torch.nn.Module, Config, DatasetSchema, dict]:
    """(model in eval mode, config, training dataset schema, the file's contents) of a model file
    (a path or an object-store URL)."""
    file = location(file)
    try:
        with file.open("rb") as f:
            blob = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"model file {file} does not exist") from None
    except Exception as e:  # not a torch file, truncated, or holding something other than data
        if _is_program(file):
            raise CheckpointError(
                f"{file} is a torch.export program (for serving: docs/serving.md), not a model file; "
                "make one for predict/evaluate with `recsys export RUN --out FILE.pt`"
            ) from None
        raise CheckpointError(f"{file} is not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{file} is not a recsys-trainer model file (make one with `recsys export`)")
    if blob.get("version") != MODEL_VERSION:
        raise CheckpointError(f"{file}: model file version {blob.get('version')}, this code reads {MODEL_VERSION}")
    cfg = _config(blob["config"], f"{file} config")
    schema = DatasetSchema.from_json(blob["dataset"], ".", f"{file} dataset")
    model = build_cpu_model(cfg, schema)
    model.load_state_dict(blob["state_dict"], strict=True)
    model.eval()
    return model, cfg, schema, blob


def _is_program(file) -> bool:
    """Whether `file` is a .pt2 archive of `recsys export --format torch-export`."""
    try:
        with file.open("rb") as f, zipfile.ZipFile(f) as archive:
            return any(name.endswith("/extra/recsys.json") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


@torch.no_grad()
def score_split(
    model: torch.nn.Module, trained: DatasetSchema, data: Path, split: str, batch_size: int = 8192
) -> tuple[DatasetSchema, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(schema read with, scores, labels, weights) of every row of `split` of dataset `data`, in
    file order. The scores are the model's raw outputs (logits for binary tasks)."""
    target = DatasetSchema.load(data)
    # Read with the training schema (the model's columns, their order, its id ranges) and the
    # target's files: a missing column or an id beyond the model's tables is a clear DataError.
    names = {f.name for f in target.sparse}
    missing = [f.name for f in trained.sparse if f.name not in names] + [
        c for c in trained.dense if c not in target.dense
    ]
    if missing:
        raise DataError(f"{data}: the model reads columns this dataset does not describe: {', '.join(missing)}")
    schema = replace(trained, root=target.root, splits=target.splits)
    batches = ParquetBatches(schema, split, batch_size, shuffle=False, drop_last=False)
    rows = sum(group.rows for group in batches.row_groups)
    scores, labels, weights = [], [], []
    for batch in batches:
        _, (_, score, label, weight) = model(batch)
        scores.append(score.float())
        labels.append(label)
        weights.append(weight)
    score, label, weight = (torch.cat(t)[:rows] for t in (scores, labels, weights))  # drop the last batch's padding
    return schema, score, label, weight


def to_prediction(schema: DatasetSchema, score: torch.Tensor) -> torch.Tensor:
    """A model's raw scores as what it predicts: a probability for binary tasks, the value clipped
    to the label range for regression."""
    if schema.task == "binary":
        return torch.sigmoid(score)
    return score.clamp(*schema.label_range) if schema.label_range else score


def prediction_columns(
    schema: DatasetSchema, score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor
) -> dict[str, pa.Array]:
    """`row`, `label`, (`weight`), `prediction` (`to_prediction`) and, for binary tasks, `logit`:
    what predictions files hold."""
    prediction = to_prediction(schema, score)
    columns = {"row": pa.array(np.arange(len(score), dtype=np.int64)), "label": pa.array(label.numpy())}
    if schema.weight:
        columns["weight"] = pa.array(weight.numpy())
    columns["prediction"] = pa.array(prediction.numpy())
    if schema.task == "binary":
        columns["logit"] = pa.array(score.numpy())
    return columns


def predict(model_file: str | Path, data: str | Path, split: str, out: str | Path, batch_size: int = 8192) -> dict:
    """Score every row of `split` of dataset `data` with a model file; write the predictions to
    `out` (Parquet, atomically). Returns the split's metrics when it has labels."""
    from trainer.metrics import task_metrics

    model, _, trained, _ = load_model_file(model_file)
    schema, score, label, weight = score_split(model, trained, data, split, batch_size)
    metrics = task_metrics(schema.task, torch.device("cpu"), schema.label_range)
    metrics.update(score, label, weight)
    results = metrics.compute()
    columns = prediction_columns(schema, score, label, weight)
    out = location(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: pq.write_table(pa.table(columns), tmp))
    return {"rows": len(score), **results}


def main_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys export", description="Write an unsharded model file from a checkpoint."
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint (step-N), a checkpoints directory or a run directory (its latest)"
    )
    parser.add_argument(
        "--out", required=True, help="the model file to write (e.g. models/demo.pt, s3://bucket/demo.pt)"
    )
    parser.add_argument(
        "--best", action="store_true", help="the checkpoint of the best validation instead of the latest"
    )
    parser.add_argument(
        "--format",
        choices=["model", "torch-export"],
        default="model",
        help="model: a model file for recsys predict/evaluate (default); torch-export: a torch.export "
        "program (.pt2) that serving loads with torch.export.load, without this repository",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.format == "torch-export":
            about = export_serving(args.checkpoint, args.out, args.best)
        else:
            blob = export(args.checkpoint, args.out, args.best)
    except (CheckpointError, StorageError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    took = f"in {time.perf_counter() - start:.2f} s"
    if args.format == "torch-export":
        print(
            f"exported {about['checkpoint']} (step {about['step']}, model {about['model']}) as a torch.export "
            f"program to {args.out} {took}; inputs: dense [B, {len(about['dense'])}] float32, "
            f"ids and lengths of {len(about['sparse'])} sparse features (docs/serving.md)"
        )
        return 0
    size = sum(t.numel() * t.element_size() for t in blob["state_dict"].values())
    print(
        f"exported {blob['checkpoint']} (step {blob['step']}, model {_config(blob['config'], 'x').model.name}, "
        f"{len(blob['state_dict'])} tensors, {size / 1e6:.1f} MB) to {args.out} {took}"
    )
    return 0


def main_predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys predict", description="Score a dataset split with a model file.")
    parser.add_argument("--model", required=True, help="a model file from `recsys export` (a path or URL)")
    parser.add_argument("--data", required=True, help="a dataset directory (dataset.json + Parquet; a path or URL)")
    parser.add_argument("--split", default="test", help="the split to score (default: test)")
    parser.add_argument("--out", required=True, help="the Parquet file to write (a path or URL)")
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        results = predict(args.model, args.data, args.split, args.out, args.batch_size)
    except (CheckpointError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = " ".join(f"{k} {v:.4f}" for k, v in results.items() if k not in ("rows", "ctr"))
    print(
        f"scored {results['rows']:,} rows of {args.data} [{args.split}] in {time.perf_counter() - start:.2f} s: "
        f"{shown} -> {args.out}"
    )
    return 0
