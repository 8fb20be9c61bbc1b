"""Criteo-shaped synthetic click data with a known answer.

Labels are drawn from a hidden ground-truth click model, so the best achievable AUC (the "oracle
AUC": the AUC of the true click probabilities against the drawn labels) is known per split and
recorded in `dataset.json`. A trainer that is wired right gets close to it; one that is not
(features shuffled across keys, embeddings not updated, ranks seeing the same rows) does not.

Shape: 13 dense float32 columns (log1p of counts, a few nulls), 26 sparse id columns with Zipf-like
id frequencies and id spaces from 10 to 100k ids (a few with missing ids); the last two are
multi-hot `list<int64>` columns of varying length. Splits train/valid/test = 80/10/10 %, each
several files of several row groups.

The click model: logit = bias + dense part (linear + one non-linearity) + per-id weights of every
sparse feature (popular ids carry bigger effects, as in real logs) + low-rank pairwise interactions
between a few feature pairs + one dense x sparse interaction. Everything is deterministic from the
seed; rows are generated file by file, so memory stays flat for any row count.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_auroc

from data_pipeline.atomic import write_atomic
from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.output import DatasetOutput
from data_pipeline.schema import SPLITS, DataError, DatasetSchema, SparseFeature, SplitInfo

NUM_DENSE = 13
NUM_SPARSE = 26
MULTI_HOT = (24, 25)  # indices of the multi-hot sparse features
MISSING_IDS = (3, 11)  # scalar features with some missing (null) ids
NULL_DENSE = (2, 9)  # dense features with some nulls (imputed as 0.0)
PAIRS = ((0, 1), (2, 5), (4, 7))  # sparse feature pairs with a low-rank interaction
SHARES = (0.8, 0.1, 0.1)  # of the rows, per split in SPLITS order
VERSION = 3  # bump when the click model or layout changes, so stale datasets are regenerated


@dataclass(frozen=True)
class SyntheticSpec:
    rows: int = 500_000
    seed: int = 0
    files: int = 4
    """Files per split (train; valid and test get half as many, at least one)."""
    row_group_rows: int = 16_384
    max_vocab: int = 100_000
    ctr: float = 0.25
    """Target click-through rate (sets the bias)."""


class ClickModel:
    """The hidden ground truth. Built from the seed alone, so every file of a dataset shares it."""

    def __init__(self, spec: SyntheticSpec) -> None:
        rng = np.random.default_rng([spec.seed, 0])
        self.vocab = np.geomspace(10, spec.max_vocab, NUM_SPARSE).round().astype(np.int64)
        self.zipf_cdf = []
        self.id_of_rank = []
        self.weight = []
        for v in self.vocab:
            p = 1.0 / np.arange(1, v + 1) ** 1.1
            self.zipf_cdf.append(np.cumsum(p / p.sum()))
            self.id_of_rank.append(rng.permutation(v))
            # Effect sizes shrink with popularity rank: the head of each id space carries the signal.
            w = np.zeros(v)
            w[self.id_of_rank[-1]] = rng.normal(0, 0.6, v) / (1 + np.arange(v) / 20)
            self.weight.append(w)
        self.pair_u = {pair: rng.normal(0, 0.5, (self.vocab[pair[0]], 4)) for pair in PAIRS}
        self.pair_v = {pair: rng.normal(0, 0.5, (self.vocab[pair[1]], 4)) for pair in PAIRS}
        self.dense_scale = rng.gamma(2.0, 3.0, NUM_DENSE)
        self.dense_w = rng.normal(0, 0.25, NUM_DENSE)
        self.dense_x_sparse = rng.normal(0, 0.3, self.vocab[6])
        self.bias = 0.0
        self.bias = self._calibrate(spec)

    def _calibrate(self, spec: SyntheticSpec) -> float:
        """Bias that puts the mean click probability at `spec.ctr` (bisection on a sample)."""
        logits = self.sample(np.random.default_rng([spec.seed, 1]), 100_000)[-1]
        lo, hi = -10.0, 10.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (1 / (1 + np.exp(-(logits + mid)))).mean() < spec.ctr else (lo, mid)
        return (lo + hi) / 2

    def _ids(self, rng: np.random.Generator, f: int, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.zipf_cdf[f], rng.random(n)).clip(max=self.vocab[f] - 1)
        return self.id_of_rank[f][ranks]

    def sample(self, rng: np.random.Generator, n: int):
        """n rows: (dense [n,13] with NaN for null, ids per feature, list lengths, logits)."""
        dense = np.log1p(rng.exponential(self.dense_scale, (n, NUM_DENSE))).astype(np.float32)
        for j in NULL_DENSE:
            dense[rng.random(n) < 0.03, j] = np.nan
        x = np.nan_to_num(dense, nan=0.0)
        logit = self.bias + (x - x.mean(0)) @ self.dense_w + 0.8 * np.sin(2 * x[:, 0])

        ids, lengths = [], []
        for f in range(NUM_SPARSE):
            if f in MULTI_HOT:
                length = rng.poisson(3, n).clip(max=12)
                values = self._ids(rng, f, int(length.sum()))
                row = np.repeat(np.arange(n), length)
                logit += np.bincount(row, weights=self.weight[f][values], minlength=n) / np.maximum(length, 1)
                ids.append(values)
                lengths.append(length)
            else:
                values = self._ids(rng, f, n)
                present = np.ones(n, bool) if f not in MISSING_IDS else rng.random(n) > 0.1
                logit += np.where(present, self.weight[f][values], 0.0)
                ids.append(np.where(present, values, -1))
                lengths.append(None)

        for a, b in PAIRS:
            logit += (self.pair_u[(a, b)][ids[a]] * self.pair_v[(a, b)][ids[b]]).sum(1)
        logit += x[:, 1] * self.dense_x_sparse[ids[6]]
        return dense, ids, lengths, logit


def _to_table(dense, ids, lengths, labels) -> pa.Table:
    columns = {"label": pa.array(labels, pa.int8())}
    for j in range(NUM_DENSE):
        columns[f"int_{j}"] = pa.array(dense[:, j], pa.float32(), from_pandas=True)  # NaN -> null
    for f in range(NUM_SPARSE):
        if f in MULTI_HOT:
            offsets = np.r_[0, np.cumsum(lengths[f])].astype(np.int32)
            columns[f"cat_{f}"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[f], pa.int64()))
        else:
            columns[f"cat_{f}"] = pa.array(ids[f], pa.int64(), mask=ids[f] < 0)
    return pa.table(columns)


def prepare(spec: SyntheticSpec, out: str | Path, overwrite: bool = False, log=print) -> DatasetSchema:
    """Write the dataset to `out` through `DatasetOutput` (refuse another dataset unless
    `overwrite`, "up to date" for the same spec, atomic files, dataset.json last)."""
    output = DatasetOutput(out, _provenance(spec), overwrite)
    existing = output.up_to_date() or _made_earlier(Path(out), spec)
    if existing is not None:
        log(f"{out}: up to date ({spec.rows:,} rows, seed {spec.seed}); not regenerated")
        return existing
    output.start()  # an interrupted run is redone whole: every file is cheap and deterministic
    log(f"synthetic dataset -> {out}")
    model = ClickModel(spec)
    splits = {}
    for split_index, (split, share) in enumerate(zip(SPLITS, SHARES)):
        split_rows = int(spec.rows * share)
        n_files = spec.files if split == "train" else max(1, spec.files // 2)
        probs, labels = [], []
        directory = output.split_dir(split)
        for file_index, rows in enumerate(np.array_split(np.arange(split_rows), n_files)):
            rng = np.random.default_rng([spec.seed, 2, split_index, file_index])
            write = functools.partial(
                _write_part, model=model, rng=rng, rows=len(rows), spec=spec, probs=probs, labels=labels
            )
            write_atomic(directory / f"part-{file_index:05d}.parquet", write)
        oracle = binary_auroc(torch.from_numpy(np.concatenate(probs)), torch.from_numpy(np.concatenate(labels))).item()
        splits[split] = SplitInfo(path=split, rows=split_rows, oracle_auc=round(oracle, 5))
        log(f"  {split}: {split_rows:,} rows in {n_files} files, oracle AUC {oracle:.4f}")
    schema = DatasetSchema(
        root=output.root,
        name="synthetic",
        label="label",
        dense=[f"int_{j}" for j in range(NUM_DENSE)],
        sparse=[SparseFeature(f"cat_{f}", int(model.vocab[f]), f in MULTI_HOT) for f in range(NUM_SPARSE)],
        splits=splits,
    )
    return output.finish(schema)


def _made_earlier(out: Path, spec: SyntheticSpec) -> DatasetSchema | None:
    """The same dataset as written before this preparer used DatasetOutput (its provenance under
    `extra.generator`; the files are the same), so that it stays up to date."""
    try:
        existing = DatasetSchema.load(out)
    except DataError:
        return None
    return existing if existing.extra.get("generator") == _provenance(spec) else None


def _write_part(
    path: Path, model: ClickModel, rng: np.random.Generator, rows: int, spec: SyntheticSpec, probs: list, labels: list
) -> None:
    """One Parquet file of `rows` rows in row groups of spec.row_group_rows; each row group's true
    click probabilities and drawn labels are appended to `probs` and `labels` (the oracle AUC)."""
    with pq.ParquetWriter(path, _schema()) as writer:
        for chunk in np.array_split(np.arange(rows), max(1, -(-rows // spec.row_group_rows))):
            dense, ids, lengths, logit = model.sample(rng, len(chunk))
            p = 1 / (1 + np.exp(-logit))
            y = (rng.random(len(chunk)) < p).astype(np.int8)
            writer.write_table(_to_table(dense, ids, lengths, y), row_group_size=len(chunk))
            probs.append(p)
            labels.append(y)


def _provenance(spec: SyntheticSpec) -> dict:
    return {"synthetic": asdict(spec), "version": VERSION}


def _schema() -> pa.Schema:
    fields = [pa.field("label", pa.int8())]
    fields += [pa.field(f"int_{j}", pa.float32()) for j in range(NUM_DENSE)]
    fields += [pa.field(f"cat_{f}", pa.list_(pa.int64()) if f in MULTI_HOT else pa.int64()) for f in range(NUM_SPARSE)]
    return pa.schema(fields)


def parse(argv: list[str]) -> tuple[SyntheticSpec, str, bool]:
    """`recsys prepare synthetic` flags -> (spec, out, overwrite)."""
    parser = argparse.ArgumentParser(prog="recsys prepare synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=SyntheticSpec.rows)
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--seed", type=int, default=SyntheticSpec.seed)
    parser.add_argument("--files", type=int, default=SyntheticSpec.files, help="files per split (train)")
    parser.add_argument("--row-group-rows", type=int, default=SyntheticSpec.row_group_rows)
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    args = parser.parse_args(argv)
    spec = SyntheticSpec(rows=args.rows, seed=args.seed, files=args.files, row_group_rows=args.row_group_rows)
    return spec, args.out, args.overwrite


if __name__ == "__main__":
    sys.exit(prepare_main("synthetic", sys.argv[1:]))
