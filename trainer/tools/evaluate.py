"""Evaluate a model on a dataset split: metrics overall, per segment of rows, and per user.

    recsys evaluate --checkpoint runs/demo --data data/synthetic --split test
    recsys evaluate --checkpoint models/ml.pt --data data/quality/movielens \\
        --segment-by gender --segment-by activity:user_id --segment-by popularity:movie_id --k 10,50

`--checkpoint` is a checkpoint (step-N), a checkpoints or run directory (its latest checkpoint;
with `--best`, the one of its best validation: the weights a keep_best run tested), or a model file
from `recsys export`. One process scores every row of the split on the CPU, with
every embedding table unsharded, so the tables must fit in host memory.

Metrics (rows of weight 0 do not count): count; binary tasks: positives, AUC, log loss, NE (log
loss / entropy of the rows' CTR), calibration (mean predicted probability / CTR), CTR, mean
prediction; regression: RMSE and MAE of predictions clipped to the label range, mean label and
mean prediction. With a user column (`--user-column`, default `user_id` when the split has it),
each user's rows are ranked by the model's raw score and Recall@K, NDCG@K, Precision@K,
HitRate@K and MRR are averaged over the users with at least one relevant row (label > 0 for
binary tasks, >= 4 for ratings; `--relevant-at`).

Segments (`--segment-by SPEC`, repeatable) split the rows and repeat every metric per segment:
    COL              the values of any column of the split's files (read by the model or not) when
                     it has at most 20 distinct values, else deciles of its value
    popularity:COL   deciles of the rows by how often their COL id occurs in the train split
    activity:COL     train-split count of the COL id: 0 (new), 1-4, 5-19, 20-99, 100+
    new:COL          "new" (id absent from the train split) or "returning"
Rows with a null value form a "null" segment.

Writes `metrics.json` and `predictions.parquet` (what `recsys predict` writes, plus the segment and
user columns) atomically into `--out`: default `<run dir>/eval/<split>` for a checkpoint of a run
directory, else `./eval/<split>`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data_pipeline.atomic import write_atomic, write_text_atomic
from data_pipeline.schema import DataError, DatasetSchema
from data_pipeline.storage import StorageError, location, parquet_file, read_table
from trainer.checkpoint import CheckpointError
from trainer.headline import headline
from trainer.metrics import task_metrics, top_k_metrics
from trainer.numbers import format_number
from trainer.tools.export import (
    checkpoint_model,
    chosen_checkpoint,
    load_model_file,
    prediction_columns,
    score_split,
    to_prediction,
)

DERIVED = ("popularity", "activity", "new")
MAX_VALUES = 20
"""A column with more distinct values than this is cut into deciles instead."""
ACTIVITY_EDGES = [1, 5, 20, 100]
ACTIVITY_LABELS = ["0 (new)", "1-4", "5-19", "20-99", "100+"]
RANKING_CELLS = 1 << 22
"""Cells of one padded [users, rows] block of ranking scores: bounds the memory of ranking."""
NULL = "null"
TABLE_WIDTH = 120


@dataclass(frozen=True)
class SegmentSpec:
    text: str
    """As given on the command line: the key of its table in metrics.json."""
    kind: str | None
    """None (the column's own values or deciles) or one of DERIVED."""
    column: str


@dataclass
class Scored:
    """Every row of the split, in file order: the model's raw scores and the labels and weights."""

    schema: DatasetSchema
    score: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor


def parse_segment(text: str) -> SegmentSpec:
    kind, sep, column = text.partition(":")
    if not sep:
        return SegmentSpec(text, None, text)
    if kind not in DERIVED or not column:
        raise argparse.ArgumentTypeError(f"'{text}' is not COL or one of {', '.join(k + ':COL' for k in DERIVED)}")
    return SegmentSpec(text, kind, column)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive integers (e.g. 10,50)")
    return sorted(set(ks))


@dataclass
class Trained:
    """A model to evaluate and what it was trained as."""

    model: torch.nn.Module
    """In eval mode, on the CPU, every table whole."""
    schema: DatasetSchema
    """The training dataset's schema."""
    source: Path
    """The checkpoint or model file it came from."""
    step: int
    run_headline: str | None
    """The metric the training run chose its best by (None: not recorded)."""


def load_model(checkpoint: str | Path, best: bool = False) -> Trained:
    """A model file, or a checkpoint (`chosen_checkpoint`: the latest, or with `best` the one of
    the best validation, which is what a keep_best run tested)."""
    checkpoint = location(checkpoint)
    if checkpoint.is_file():
        if best:
            raise CheckpointError(f"{checkpoint} is a model file: --best picks among a run's checkpoints")
        model, _, schema, blob = load_model_file(checkpoint)
        return Trained(model, schema, checkpoint, int(blob["step"]), blob.get("headline"))
    path, meta = chosen_checkpoint(checkpoint, best)
    model, _ = checkpoint_model(path, meta)
    schema = DatasetSchema.from_json(meta["dataset"], ".", f"{path}/checkpoint.json dataset")
    return Trained(model, schema, path, int(meta["step"]), meta["state"].get("best", {}).get("metric"))


def default_out(source: Path, split: str) -> Path:
    """<run dir>/eval/<split> for a checkpoint in a run's `checkpoints/`, else ./eval/<split>."""
    if source.is_dir() and source.parent.name == "checkpoints":
        return source.parent.parent / "eval" / split
    return Path("eval") / split


def read_column(schema: DatasetSchema, split: str, column: str, purpose: str) -> pa.ChunkedArray:
    """One column of every file of a split, in file order (the order the rows were scored in)."""
    pieces = []
    for file in schema.split_files(split):
        fields = parquet_file(file).schema_arrow
        if column not in fields.names:
            raise DataError(f"{file}: no column '{column}' to {purpose} (file has: {', '.join(fields.names)})")
        kind = fields.field(column).type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            raise DataError(f"{file}: column '{column}' holds lists ({kind}); to {purpose} needs one value per row")
        piece = read_table(file, columns=[column]).column(column)
        if pa.types.is_dictionary(piece.type):
            piece = piece.cast(piece.type.value_type)
        pieces.append(piece if not pieces else piece.cast(pieces[0].type))
    return pa.chunked_array([chunk for piece in pieces for chunk in piece.chunks], type=pieces[0].type)


def default_user_column(schema: DatasetSchema, split: str) -> str | None:
    """`user_id` when the split's files have it (MovieLens and the like), else no ranking."""
    return "user_id" if "user_id" in parquet_file(schema.split_files(split)[0]).schema_arrow.names else None


def _number(value: float) -> str:
    return f"{value:.6g}"


def deciles(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(segment of each row, -1 for NaN; labels "[min, max]" of each segment's values) of the
    deciles of `values`. Equal values stay together, so ties can leave fewer than ten."""
    present = ~np.isnan(values)
    if not present.any():
        return np.full(len(values), -1), []
    edges = np.unique(np.quantile(values[present], np.linspace(0.1, 0.9, 9)))
    bins = np.searchsorted(edges, values, side="right")
    used, codes = np.unique(bins[present], return_inverse=True)
    out = np.full(len(values), -1)
    out[present] = codes
    labels = []
    for code in range(len(used)):
        members = values[out == code]
        lo, hi = members.min(), members.max()
        labels.append(_number(lo) if lo == hi else f"[{_number(lo)}, {_number(hi)}]")
    return out, labels


def value_segments(values: pa.ChunkedArray, column: str) -> tuple[np.ndarray, list[str]]:
    """A column's own values as segments (sorted), or deciles of a numeric column with more than
    MAX_VALUES distinct values."""
    distinct = pc.unique(values).drop_null()
    if len(distinct) <= MAX_VALUES:
        distinct = distinct.take(pc.sort_indices(distinct))
        codes = pc.index_in(values, value_set=distinct).to_numpy(zero_copy_only=False)
        return np.nan_to_num(codes.astype(float), nan=-1).astype(int), [str(v) for v in distinct.to_pylist()]
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_decimal(values.type)):
        raise DataError(
            f"column '{column}' has {len(distinct):,} distinct {values.type} values, too many to segment by "
            f"(at most {MAX_VALUES}, or a number for deciles): try popularity:{column} or activity:{column}"
        )
    return deciles(values.cast(pa.float64()).to_numpy(zero_copy_only=False))


def train_counts(values: pa.ChunkedArray, train: pa.ChunkedArray) -> np.ndarray:
    """How often each row's id occurs in the train split (0 for ids it lacks; NaN for null ids)."""
    counted = pc.value_counts(train.cast(values.type))
    index = pc.index_in(values, value_set=counted.field("values"))
    counts = pc.take(counted.field("counts"), index).cast(pa.float64()).to_numpy(zero_copy_only=False)
    counts = np.nan_to_num(counts, nan=0.0)
    counts[values.is_null().to_numpy(zero_copy_only=False)] = np.nan
    return counts


def derived_segments(kind: str, counts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Segments of rows by their id's train count: deciles, activity buckets, or new/returning."""
    if kind == "popularity":
        return deciles(counts)
    present = ~np.isnan(counts)
    if kind == "activity":
        codes, labels = np.searchsorted(ACTIVITY_EDGES, counts, side="right"), ACTIVITY_LABELS
    else:
        codes, labels = (counts > 0).astype(int), ["new", "returning"]
    return np.where(present, codes, -1), labels


def segments_of(spec: SegmentSpec, schema: DatasetSchema, split: str) -> tuple[pa.ChunkedArray, np.ndarray, list[str]]:
    """(the column's values, each row's segment (-1: null), segment labels) of one spec."""
    values = read_column(schema, split, spec.column, f"segment by ({spec.text})")
    if spec.kind is None:
        return values, *value_segments(values, spec.column)
    if "train" not in schema.splits:
        raise DataError(f"{schema.root}: {spec.text} counts ids in the train split, and this dataset has none")
    train = read_column(schema, "train", spec.column, f"count ids of ({spec.text})")
    try:
        counts = train_counts(values, train)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(
            f"{spec.text}: column '{spec.column}' is {train.type} in the train split and {values.type} in "
            f"split '{split}' ({e})"
        ) from None
    return values, *derived_segments(spec.kind, counts)


def user_codes(values: pa.ChunkedArray) -> np.ndarray:
    """A dense integer per distinct user (-1 for a null user: not ranked)."""
    codes = pc.dictionary_encode(values.combine_chunks()).indices.to_numpy(zero_copy_only=False)
    return np.nan_to_num(codes.astype(float), nan=-1).astype(np.int64)


def _blocks(counts: np.ndarray) -> Iterator[np.ndarray]:
    """Users to rank together: row counts within a factor 2 (padding to the longest wastes at most
    half a block) and at most RANKING_CELLS padded cells."""
    size = np.ceil(np.log2(counts)).astype(int)
    for bucket in np.unique(size):
        members = np.flatnonzero(size == bucket)
        per = max(1, RANKING_CELLS // int(counts[members].max()))
        for start in range(0, len(members), per):
            yield members[start : start + per]


def ranking_names(ks: list[int]) -> list[str]:
    """The keys top_k_metrics reports, in its order."""
    return list(top_k_metrics(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), ks))


def ranking_metrics(
    score: torch.Tensor, relevant: torch.Tensor, user: np.ndarray, ks: list[int]
) -> dict[str, float | None]:
    """top_k_metrics of each user's rows ranked by score, averaged over the users with at least one
    relevant row; `users` is how many that is."""
    order = np.argsort(user, kind="stable")
    _, starts, counts = np.unique(user[order], return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(order)) - starts[group]
    score, relevant = score[torch.from_numpy(order)], relevant[torch.from_numpy(order)]
    chosen = (
        np.flatnonzero(np.add.reduceat(relevant.numpy().astype(int), starts) > 0) if len(order) else np.array([], int)
    )
    sums = dict.fromkeys(ranking_names(ks), 0.0)
    for block in _blocks(counts[chosen]):
        slot = np.full(len(counts), -1)
        slot[chosen[block]] = np.arange(len(block))
        rows = torch.from_numpy(slot[group] >= 0)
        at = (torch.from_numpy(slot[group])[rows], torch.from_numpy(position)[rows])
        width = int(counts[chosen[block]].max())
        scores = torch.full((len(block), width), float("-inf")).index_put_(at, score[rows])
        hits = torch.zeros((len(block), width), dtype=torch.bool).index_put_(at, relevant[rows])
        for name, values in top_k_metrics(scores, hits, ks).items():
            sums[name] += values.sum().item()
    users = len(chosen)
    return {"users": users, **{name: total / users if users else None for name, total in sums.items()}}


def _finite(value: float) -> float | int | None:
    """JSON has no NaN: a metric a segment cannot have (AUC of one class) is null."""
    return value if isinstance(value, int) or math.isfinite(value) else None


def segment_metrics(
    scored: Scored, rows: np.ndarray, user: np.ndarray | None, relevant: torch.Tensor, ks: list[int]
) -> dict[str, float | int | None]:
    """Every metric of the rows where `rows` (bool) holds, leaving out rows of weight 0."""
    keep = torch.from_numpy(rows) & (scored.weight > 0)
    score, label, weight = scored.score[keep], scored.label[keep], scored.weight[keep]
    schema = scored.schema
    out: dict[str, float | int | None] = {"count": len(score)}
    if not len(score):
        return out
    metrics = task_metrics(schema.task, torch.device("cpu"), schema.label_range)
    metrics.update(score, label, weight)
    if schema.task == "binary":
        positives = int((label > 0).sum())
        with warnings.catch_warnings():  # a segment of one class: torchmetrics warns, AUC is undefined
            warnings.simplefilter("ignore")
            results = metrics.compute()
        if positives in (0, len(label)):
            results["auc"] = float("nan")
        out.update(positives=positives, **results)
    else:
        out.update(metrics.compute())
        out["mean_label"] = (label * weight).sum().item() / weight.sum().item()
    out["mean_prediction"] = (to_prediction(schema, score) * weight).sum().item() / weight.sum().item()
    if user is not None:
        ranked = keep.numpy() & (user >= 0)
        at = torch.from_numpy(ranked)
        out.update(ranking_metrics(scored.score[at], relevant[at], user[ranked], ks))
    return {name: _finite(value) if value is not None else None for name, value in out.items()}


def relevance(scored: Scored, relevant_at: float | None) -> torch.Tensor:
    """Which rows a ranking should put first: label >= relevant_at; by default label > 0 for
    binary tasks and >= 4 (stars) for regression."""
    if relevant_at is None:
        return scored.label > 0 if scored.schema.task == "binary" else scored.label >= 4
    return scored.label >= relevant_at


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    specs: list[SegmentSpec] = (),
    user_column: str | None = None,
    ks: list[int] = (10, 50),
    out: str | Path | None = None,
    batch_size: int = 8192,
    relevant_at: float | None = None,
    best: bool = False,
) -> tuple[dict, Path]:
    """Score `split` of `data` with a checkpoint or model file (`load_model`), compute every metric
    overall and per segment, write metrics.json and predictions.parquet into `out`; returns
    (metrics, out)."""
    trained = load_model(checkpoint, best)
    scored = Scored(*score_split(trained.model, trained.schema, data, split, batch_size))
    schema, ks, source = scored.schema, sorted(ks), trained.source
    user_column = user_column or default_user_column(schema, split)
    extra: dict[str, pa.ChunkedArray] = {}
    user = None
    if user_column:
        extra[user_column] = read_column(schema, split, user_column, "rank by user (--user-column)")
        user = user_codes(extra[user_column])
    relevant = relevance(scored, relevant_at)
    everyone = np.ones(len(scored.score), dtype=bool)
    # A retrieval run (chosen by recall@K) is judged by its per-user recall here too, when users are ranked.
    retrieval = bool(trained.run_headline and trained.run_headline.startswith("recall@") and user_column)
    result = {
        "checkpoint": str(source),
        "step": trained.step,
        "data": str(data),
        "split": split,
        "task": schema.task,
        "headline": headline(schema.task, ks[0] if retrieval else None).name,
        "ks": ks,
        "user_column": user_column,
        "overall": segment_metrics(scored, everyone, user, relevant, ks),
        "segments": {},
    }
    for spec in specs:
        values, codes, labels = segments_of(spec, schema, split)
        extra.setdefault(spec.column, values)
        named = [(code, label) for code, label in enumerate(labels)] + [(-1, NULL)]
        result["segments"][spec.text] = [
            {"segment": label, **segment_metrics(scored, codes == code, user, relevant, ks)}
            for code, label in named
            if (codes == code).any()
        ]
    out = location(out) if out else default_out(source, split)
    write_outputs(out, result, scored, extra)
    return result, out


def write_outputs(out: Path, result: dict, scored: Scored, extra: dict[str, pa.ChunkedArray]) -> None:
    """metrics.json and predictions.parquet (the predictions, then the segment and user columns),
    each written atomically."""
    columns = prediction_columns(scored.schema, scored.score, scored.label, scored.weight)
    columns.update({name: values for name, values in extra.items() if name not in columns})
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "predictions.parquet", lambda tmp: pq.write_table(pa.table(columns), tmp))
    write_text_atomic(out / "metrics.json", json.dumps(result, indent=2) + "\n")


def format_table(rows: list[dict], width: int = TABLE_WIDTH) -> str:
    """Rows of metrics as aligned text: one column per key, the first (the segment) left-aligned
    and repeated in each block of columns that fits in `width` characters."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [[key] + [format_number(row.get(key)) for row in rows] for key in keys]
    widths = [max(len(cell) for cell in column) for column in columns]
    columns = [
        [cell.ljust(w) if i == 0 else cell.rjust(w) for cell in column]
        for i, (column, w) in enumerate(zip(columns, widths))
    ]
    blocks, line = [], [columns[0]]
    for column in columns[1:]:
        if len(line) > 1 and sum(len(c[0]) + 2 for c in line) + len(column[0]) > width:
            blocks.append(line)
            line = [columns[0]]
        line.append(column)
    blocks.append(line)
    return "\n\n".join("\n".join("  ".join(cells) for cells in zip(*block)) for block in blocks)


def report(result: dict) -> str:
    """The overall metrics, then one table per segment spec."""
    parts = [format_table([{"segment": "all", **result["overall"]}])]
    for spec, rows in result["segments"].items():
        parts.append(f"by {spec}:\n" + format_table(rows))
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="recsys evaluate",
        description="Metrics of a model on a dataset split, overall, per segment and per user.",
        epilog="Segment specs: COL, popularity:COL, activity:COL, new:COL (see trainer/tools/evaluate.py).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint (step-N), a checkpoints or run directory (its latest), or a model file from `recsys export`",
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="the checkpoint of the best validation instead of the latest (what a keep_best run tested)",
    )
    parser.add_argument("--data", required=True, help="a dataset directory (dataset.json + Parquet; a path or URL)")
    parser.add_argument("--split", default="test", help="the split to evaluate (default: test)")
    parser.add_argument(
        "--segment-by",
        dest="segments",
        action="append",
        default=[],
        type=parse_segment,
        metavar="SPEC",
        help="COL, popularity:COL, activity:COL or new:COL; repeatable",
    )
    parser.add_argument(
        "--user-column", help="rank each user's rows by score for Recall/NDCG/... @K (default: user_id when present)"
    )
    parser.add_argument("--k", type=parse_ks, default=[10, 50], help="cut-offs of the ranking metrics (default: 10,50)")
    parser.add_argument(
        "--relevant-at",
        type=float,
        help="a row is relevant when its label is at least this "
        "(default: label > 0 for binary tasks, >= 4 for regression)",
    )
    parser.add_argument(
        "--out", help="output directory, a path or URL (default: <run dir>/eval/<split>, or ./eval/<split>)"
    )
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result, out = evaluate(
            args.checkpoint,
            args.data,
            args.split,
            args.segments,
            args.user_column,
            args.k,
            args.out,
            args.batch_size,
            args.relevant_at,
            args.best,
        )
    except (CheckpointError, DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"evaluated {result['checkpoint']} (step {result['step']}) on {args.data} [{args.split}] "
        f"in {time.perf_counter() - start:.2f} s\n"
    )
    print(report(result))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'predictions.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
