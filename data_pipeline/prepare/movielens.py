"""`recsys prepare movielens`: MovieLens-100K ratings -> a dataset directory the trainer reads.

    recsys prepare movielens --input ml-100k/ --out data/ml100k                       # rating regression
    recsys prepare movielens --input ml-100k/ --out data/ml100k-implicit --implicit   # 0/1, 4 negatives
    recsys prepare movielens --input ml-100k/ --out data/ml100k-llo --implicit --split leave-last-out

Input (`--input DIR`), either layout (`--format auto` picks the one present):
  - the official files: `u.data` (tab-separated `user item rating timestamp`), `u.user`
    (`user_id|age|gender|occupation|zip_code`), `u.item` (latin-1, `movie_id|title|release_date|
    video_release_date|IMDb_URL|` + the 19 genre flags);
  - Parquet with the same columns: `ratings.parquet` (user_id, movie_id, rating, timestamp),
    `users.parquet`, `items.parquet` (movie_id, movie_title, release_date, the genre flags;
    video_release_date and IMDb_URL may be present but are not used).

Output: `train/`, `valid/`, `test/` (one `part-00000.parquet` each), `dataset.json`, and
  - `transforms.json`: everything learned from the data (vocabularies, train counts, normalisation
    statistics), so new rows are featurized exactly the same way (`load_transforms` + `featurize`);
  - `items.parquet`, `users.parquet`: every item (user) with its feature columns, in the same id
    spaces, for retrieval-style evaluation.
The raw ids and timestamps are not training columns.

Features. Every id space is contiguous from 0, and a raw value outside a vocabulary (a new user at
prediction time, a missing age) becomes null, which the reader treats as a missing id.
  sparse  user_id, movie_id   index of the raw id among the sorted ids of the users / items file
          age_bucket          MovieLens-1M buckets <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
          gender, occupation  index among the sorted distinct values of the users file
          zip_prefix          the first `--zip-prefix-chars` characters of the zip code, upper-cased
                              (default 1: the US zip area digit, or the Canadian province letter)
          release_year        year of release_date as a categorical (sorted distinct years)
          genres              multi-hot list of genre indices, in the u.item order (0 unknown ... 18 Western)
  dense   age_z, release_year_z, user_log_count_z, movie_log_count_z: standardised with the mean
          and std over the rows of the train split; log counts are log1p(the user's / movie's
          interactions in the train split), so valid/test leak nothing; missing values -> 0 (the mean).

Labels. Default: explicit, `rating` (float32 stars), task "regression", label_range [1, 5].
`--implicit`: task "binary", column `label`: every rating is a positive (or those >= `--min-rating`;
default none: every rating counts, as in NCF), plus `--negatives K` (default 4) negatives per positive.

Splits. `--split random` (default): a permutation seeded by `--seed` puts 80/10/10 % of the
interactions in train/valid/test. `--split leave-last-out`: per user by timestamp, the last
interaction -> test, the second last -> valid, the rest -> train (ties at one timestamp: the larger
movie id counts as later). Rows are first sorted by (user, timestamp, movie id), so neither split
depends on the input's row order. With --implicit the positives are split, then each split gets its
own negatives, so valid and test carry 0/1 labels too.

Negative sampling. For each positive (user u, split s), K items drawn i.i.d. uniformly from the items
u never rated (any rating, any split; a low rating excluded by --min-rating is still "seen"), by
rejection: draw uniformly from all items, redraw the draws that hit a rated item. The generator is
seeded by (seed, split), so the result depends only on the inputs and options. A positive's
negatives follow it in valid/test; train rows are shuffled (seeded) as a whole.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.movielens_features import (
    AGE_LABELS,
    DENSE,
    GENRES,
    SPARSE,
    TRANSFORMS_FILE,
    VERSION,
    featurize,
    fit_stats,
    fit_vocabularies,
    item_columns,
    item_features,
    lookup,
    user_columns,
    user_features,
)
from data_pipeline.prepare.output import DatasetOutput, input_identity, row_group_size, write_json, write_parquet
from data_pipeline.schema import SPLITS, DataError, DatasetSchema, SparseFeature, SplitInfo

RATING_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
ITEM_COLUMNS = ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL", *GENRES)
FILES = {
    "official": {"ratings": "u.data", "users": "u.user", "items": "u.item"},
    "parquet": {"ratings": "ratings.parquet", "users": "users.parquet", "items": "items.parquet"},
}

# Which columns describe the user and which the item (for two-tower models).
TOWERS = {
    "user": ["user_id", "age_bucket", "gender", "occupation", "zip_prefix", "age_z", "user_log_count_z"],
    "item": ["movie_id", "release_year", "genres", "release_year_z", "movie_log_count_z"],
}


@dataclass(frozen=True)
class MovieLensOptions:
    input: str = ""
    """The directory of u.data/u.user/u.item, or of ratings/users/items.parquet."""
    format: str = "auto"
    """The input layout: auto (the one present), official or parquet."""
    split: str = "random"
    """"random" (seeded 80/10/10) or "leave-last-out" (per user, by timestamp)."""
    seed: int = 0
    implicit: bool = False
    """Binary 0/1 labels with sampled negatives instead of the rating as a regression label."""
    min_rating: float | None = None
    """Implicit only: ratings below this are not positives (None: every rating is a positive)."""
    negatives: int = 4
    """Implicit only: negatives sampled per positive."""
    zip_prefix_chars: int = 1
    row_group_rows: int = 16_384

    def __post_init__(self) -> None:
        if self.split not in ("random", "leave-last-out"):
            raise ValueError(f"split must be random or leave-last-out, got '{self.split}'")
        if self.implicit and self.negatives < 1:
            raise ValueError("--negatives must be at least 1 (a binary task needs negatives)")
        if self.zip_prefix_chars < 1 or self.row_group_rows < 1:
            raise ValueError("--zip-prefix-chars and --row-group-rows must be positive")


# ---- reading and validating the inputs ---------------------------------------------------------


@dataclass
class Inputs:
    """The three input tables with the documented column names and types, and where they came from."""

    ratings: pa.Table  # user_id, movie_id int64; rating float64; timestamp int64 (no nulls)
    users: pa.Table  # user_id int64 (unique); age float64; gender, occupation, zip_code string
    items: pa.Table  # movie_id int64 (unique); movie_title, release_date string; genre flags int64
    format: str
    paths: dict[str, Path]


def find_inputs(input_dir: str | Path, fmt: str = "auto") -> tuple[str, dict[str, Path]]:
    """The input layout (official or parquet) and its three files; DataError if any is missing."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"--input {input_dir} is not a directory")
    if fmt == "auto":
        present = [f for f, names in FILES.items() if (input_dir / names["ratings"]).is_file()]
        if len(present) != 1:
            what = "holds both u.data and ratings.parquet" if present else "holds neither u.data nor ratings.parquet"
            raise DataError(
                f"{input_dir} {what}: expected the official MovieLens-100K files (u.data, u.user, u.item) "
                f"or Parquet (ratings.parquet, users.parquet, items.parquet); pass --format to choose"
            )
        fmt = present[0]
    paths = {kind: input_dir / name for kind, name in FILES[fmt].items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path} not found (the {fmt} layout needs {', '.join(FILES[fmt].values())})")
    return fmt, paths


def _read_official(path: Path, columns: tuple[str, ...], delimiter: str, encoding: str = "utf8") -> pa.Table:
    # quote_char=False: MovieLens does not quote, and titles may hold a lone '"'.
    types = {c: pa.int64() for c in ("user_id", "movie_id", "rating", "timestamp", "age", *GENRES)}
    types.update(
        {
            c: pa.string()
            for c in (
                "gender",
                "occupation",
                "zip_code",
                "movie_title",
                "release_date",
                "video_release_date",
                "IMDb_URL",
            )
        }
    )
    try:
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(columns), encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={c: types[c] for c in columns}, strings_can_be_null=True),
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not in the official MovieLens-100K format ({e})") from None


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pa.Table:
    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}' (file has: {', '.join(names)})")
        return pq.read_table(path, columns=list(columns))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _typed(table: pa.Table, column: str, to: pa.DataType, path: Path, nulls: bool = True) -> pa.Array:
    """`column` cast to `to` (DataError naming file and column if it cannot be, or has forbidden nulls)."""
    values = table.column(column).combine_chunks()
    try:
        values = values if values.type == to else pc.cast(values, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"{path}: column '{column}' has type {values.type}, expected {to} ({e})") from None
    if not nulls and values.null_count:
        row = pc.index(pc.is_null(values), True).as_py()
        raise DataError(f"{path}: column '{column}' has {values.null_count} nulls (first at row {row})")
    return values


def _unique(values: pa.Array, column: str, path: Path) -> None:
    if pc.count_distinct(values).as_py() != len(values):
        counts = pc.value_counts(values)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise DataError(f"{path}: column '{column}' repeats id {dup} (each id must appear once)")


def read_inputs(input_dir: str | Path, fmt: str = "auto", explicit: bool = True) -> Inputs:
    """Read and check the three tables. `explicit`: ratings must lie in [1, 5] (the label range)."""
    fmt, paths = find_inputs(input_dir, fmt)
    item_columns = ITEM_COLUMNS if fmt == "official" else ("movie_id", "movie_title", "release_date", *GENRES)
    if fmt == "official":
        raw = {
            "ratings": _read_official(paths["ratings"], RATING_COLUMNS, "\t"),
            "users": _read_official(paths["users"], USER_COLUMNS, "|"),
            "items": _read_official(paths["items"], ITEM_COLUMNS, "|", encoding="latin-1"),
        }
    else:
        raw = {
            "ratings": _read_parquet(paths["ratings"], RATING_COLUMNS),
            "users": _read_parquet(paths["users"], USER_COLUMNS),
            "items": _read_parquet(paths["items"], item_columns),
        }
    p = paths
    ratings = pa.table(
        {
            "user_id": _typed(raw["ratings"], "user_id", pa.int64(), p["ratings"], nulls=False),
            "movie_id": _typed(raw["ratings"], "movie_id", pa.int64(), p["ratings"], nulls=False),
            "rating": _typed(raw["ratings"], "rating", pa.float64(), p["ratings"], nulls=False),
            "timestamp": _typed(raw["ratings"], "timestamp", pa.int64(), p["ratings"], nulls=False),
        }
    )
    users = pa.table(
        {
            "user_id": _typed(raw["users"], "user_id", pa.int64(), p["users"], nulls=False),
            "age": _typed(raw["users"], "age", pa.float64(), p["users"]),
            **{c: _typed(raw["users"], c, pa.string(), p["users"]) for c in ("gender", "occupation", "zip_code")},
        }
    )
    items = pa.table(
        {
            "movie_id": _typed(raw["items"], "movie_id", pa.int64(), p["items"], nulls=False),
            "movie_title": _typed(raw["items"], "movie_title", pa.string(), p["items"]),
            "release_date": _typed(raw["items"], "release_date", pa.string(), p["items"]),
            # A null genre flag means "not this genre".
            **{g: pc.fill_null(_typed(raw["items"], g, pa.int64(), p["items"]), 0) for g in GENRES},
        }
    )
    _unique(users["user_id"], "user_id", p["users"])
    _unique(items["movie_id"], "movie_id", p["items"])
    for column, table, kind in (("user_id", users, "users"), ("movie_id", items, "items")):
        known = pc.is_in(ratings[column], value_set=table[column].combine_chunks())
        unknown = len(known) - pc.sum(known).as_py()
        if unknown:
            example = ratings[column].filter(pc.invert(known))[0].as_py()
            raise DataError(
                f"{p['ratings']}: column '{column}' has {unknown} rows whose id is not in {p[kind].name} "
                f"(e.g. {example})"
            )
    if explicit:
        bad = pc.or_(pc.less(ratings["rating"], 1), pc.greater(ratings["rating"], 5))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise DataError(
                f"{p['ratings']}: column 'rating' must lie in [1, 5] (the label range), row {row} holds "
                f"{ratings['rating'][row].as_py()}"
            )
    if ratings.num_rows == 0:
        raise DataError(f"{p['ratings']} holds no ratings")
    return Inputs(ratings, users, items, fmt, paths)


# ---- splits and negatives ----------------------------------------------------------------------


def assign_splits(user: np.ndarray, how: str, seed: int) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of each interaction; rows sorted by (user, time, movie)."""
    n = len(user)
    split = np.zeros(n, np.int8)
    if how == "random":
        held_out = max(1, round(n * 0.1))
        perm = np.random.default_rng([seed, 0]).permutation(n)
        split[perm[n - 2 * held_out : n - held_out]] = 1
        split[perm[n - held_out :]] = 2
    else:
        last_of_user = np.r_[np.flatnonzero(np.diff(user)), n - 1]  # index of each user's last row
        first_of_user = np.r_[0, last_of_user[:-1] + 1]
        from_end = np.repeat(last_of_user, last_of_user - first_of_user + 1) - np.arange(n)
        split[from_end == 1] = 1
        split[from_end == 0] = 2
    return split


def _is_rated(user: np.ndarray, item: np.ndarray, rated_keys: np.ndarray, n_items: int) -> np.ndarray:
    keys = user * n_items + item
    pos = np.minimum(np.searchsorted(rated_keys, keys), len(rated_keys) - 1)
    return rated_keys[pos] == keys


def sample_negatives(
    user: np.ndarray, rated_keys: np.ndarray, n_items: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """[len(user), k] item ids, i.i.d. uniform over the items each user never rated (rejection
    sampling; `rated_keys` = sorted unique user * n_items + item of every rating)."""
    rows = np.repeat(user, k)
    items = rng.integers(0, n_items, rows.size)
    todo = np.flatnonzero(_is_rated(rows, items, rated_keys, n_items))
    while todo.size:
        items[todo] = rng.integers(0, n_items, todo.size)
        todo = todo[_is_rated(rows[todo], items[todo], rated_keys, n_items)]
    return items.reshape(len(user), k)


# ---- the whole preparation ---------------------------------------------------------------------


def _provenance(inputs_fmt: str, paths: dict[str, Path], opts: MovieLensOptions) -> dict:
    settings = {k: v for k, v in asdict(opts).items() if k not in ("input", "format")}
    return {
        "movielens": {"format": inputs_fmt, **settings},
        "version": VERSION,
        "inputs": input_identity(list(paths.values())),
    }


def prepare(opts: MovieLensOptions, out: str | Path, overwrite: bool = False, log=print) -> DatasetSchema:
    """Build the dataset at `out` (see the module docstring); an identical existing one is kept."""
    input_dir = opts.input
    fmt, paths = find_inputs(input_dir, opts.format)
    output = DatasetOutput(out, _provenance(fmt, paths, opts), overwrite)
    existing = output.up_to_date()
    if existing is not None:
        log(f"{out}: up to date (same inputs and options); not rebuilt")
        return existing
    log(f"movielens {input_dir} -> {out}")
    data = read_inputs(input_dir, fmt, explicit=not opts.implicit)
    t = fit_vocabularies(data.users, data.items, opts.zip_prefix_chars)
    n_users, n_items = len(t["vocab"]["user_id"]), len(t["vocab"]["movie_id"])

    # Interactions as ids, sorted by (user, timestamp, movie): the order both split schemes start from.
    ratings = data.ratings
    user = lookup(ratings["user_id"].combine_chunks(), t["vocab"]["user_id"]).to_numpy()
    movie = lookup(ratings["movie_id"].combine_chunks(), t["vocab"]["movie_id"]).to_numpy()
    rating = ratings["rating"].to_numpy()
    order = np.lexsort((movie, ratings["timestamp"].to_numpy(), user))
    user, movie, rating = user[order], movie[order], rating[order]
    rated_keys = np.unique(user * n_items + movie)
    if opts.implicit and opts.min_rating is not None:
        keep = rating >= opts.min_rating
        user, movie, rating = user[keep], movie[keep], rating[keep]
    if len(user) < 3:
        raise DataError(f"{paths['ratings']}: {len(user)} usable interactions; at least 3 are needed for 3 splits")
    split_of = assign_splits(user, opts.split, opts.seed)
    for s, name in enumerate(SPLITS):
        if not (split_of == s).any():
            raise DataError(f"split '{name}' would be empty ({opts.split} split of {len(user)} interactions)")
    if opts.implicit:
        full = np.bincount(rated_keys // n_items, minlength=n_users) >= n_items
        if full[user].any():
            raise DataError(
                f"user {t['vocab']['user_id'][int(np.flatnonzero(full)[0])]} rated every item: no negatives to sample"
            )

    rows = {}  # split -> (user ids, movie ids, labels), in writing order
    for s, name in enumerate(SPLITS):
        pick = np.flatnonzero(split_of == s)
        u, m = user[pick], movie[pick]
        if opts.implicit:
            k = opts.negatives
            negatives = sample_negatives(u, rated_keys, n_items, k, np.random.default_rng([opts.seed, 1, s]))
            m = np.column_stack([m, negatives]).ravel()  # each positive followed by its negatives
            u = np.repeat(u, k + 1)
            label = np.tile(np.r_[1, np.zeros(k)].astype(np.int8), len(pick))
        else:
            label = rating[pick].astype(np.float32)
        if name == "train":
            perm = np.random.default_rng([opts.seed, 2]).permutation(len(u))
            u, m, label = u[perm], m[perm], label[perm]
        rows[name] = (u, m, label)

    # Train-split statistics: interaction counts (positives only) and the dense normalisation.
    t["train_counts"] = {
        "user_id": np.bincount(user[split_of == 0], minlength=n_users).tolist(),
        "movie_id": np.bincount(movie[split_of == 0], minlength=n_items).tolist(),
    }
    users_sorted = data.users.sort_by("user_id")  # row i <-> user id i
    items_sorted = data.items.sort_by("movie_id")
    train_u, train_m, _ = rows["train"]
    _, user_dense = user_columns(users_sorted, t)
    _, item_dense = item_columns(items_sorted, t)
    weights_u = np.bincount(train_u, minlength=n_users)
    weights_m = np.bincount(train_m, minlength=n_items)
    t["dense"] = {
        **{name: fit_stats(x, weights_u) for name, x in user_dense.items()},
        **{name: fit_stats(x, weights_m) for name, x in item_dense.items()},
    }

    label_name = "label" if opts.implicit else "rating"
    user_vocab = np.asarray(t["vocab"]["user_id"], np.int64)
    movie_vocab = np.asarray(t["vocab"]["movie_id"], np.int64)
    tables = {}
    for name, (u, m, label) in rows.items():
        features = featurize(user_vocab[u], movie_vocab[m], data.users, data.items, t)
        tables[name] = features.add_column(0, label_name, pa.array(label))

    output.start()
    splits = {}
    for name, table in tables.items():
        write_parquet(
            table, output.split_dir(name) / "part-00000.parquet", row_group_size(table.num_rows, opts.row_group_rows)
        )
        splits[name] = SplitInfo(path=name, rows=table.num_rows)
    write_json(t, output.root / TRANSFORMS_FILE)
    items_table = item_features(items_sorted, t)
    items_table = items_table.add_column(1, "raw_movie_id", items_sorted["movie_id"]).add_column(
        2, "movie_title", items_sorted["movie_title"]
    )
    write_parquet(items_table, output.root / "items.parquet", opts.row_group_rows)
    users_table = user_features(users_sorted, t).add_column(1, "raw_user_id", users_sorted["user_id"])
    write_parquet(users_table, output.root / "users.parquet", opts.row_group_rows)

    sizes = {
        "user_id": n_users,
        "movie_id": n_items,
        "age_bucket": len(AGE_LABELS),
        **{f: len(t["vocab"][f]) for f in ("gender", "occupation", "zip_prefix", "release_year")},
        "genres": len(GENRES),
    }
    schema = DatasetSchema(
        root=output.root,
        name="movielens-100k" + ("-implicit" if opts.implicit else ""),
        label=label_name,
        dense=list(DENSE),
        sparse=[SparseFeature(f, max(sizes[f], 1), multi_hot=f == "genres") for f in SPARSE],
        splits=splits,
        task="binary" if opts.implicit else "regression",
        label_range=None if opts.implicit else [1.0, 5.0],
        extra={
            "transforms": TRANSFORMS_FILE,
            "items": "items.parquet",
            "users": "users.parquet",
            "positives": {name: int((split_of == s).sum()) for s, name in enumerate(SPLITS)},
            "towers": TOWERS,
        },
    )
    schema = output.finish(schema)
    for line in _summary(schema, opts):
        log(line)
    return schema


def _summary(schema: DatasetSchema, opts: MovieLensOptions) -> list[str]:
    label = f"'{schema.label}' ({schema.task}" + (f", {schema.label_range})" if schema.label_range else ")")
    negatives = f"; {opts.negatives} negatives per positive" if opts.implicit else ""
    sparse = (f"{f.name} {f.num_embeddings:,}" + (" multi-hot" if f.multi_hot else "") for f in schema.sparse)
    return [
        f"  label {label}; split {opts.split}{negatives}",
        "  rows: " + ", ".join(f"{name} {info.rows:,}" for name, info in schema.splits.items()),
        "  sparse (ids): " + ", ".join(sparse),
        "  dense: " + ", ".join(schema.dense),
    ]


def parse(argv: list[str]) -> tuple[MovieLensOptions, str, bool]:
    """`recsys prepare movielens` flags -> (options, out, overwrite)."""
    parser = argparse.ArgumentParser(
        prog="recsys prepare movielens",
        description=__doc__.split("\n\n")[0],
        epilog="Features, splits and the negative-sampling scheme: see data_pipeline/prepare/movielens.py.",
    )
    parser.add_argument(
        "--input", required=True, help="directory of u.data/u.user/u.item or ratings/users/items.parquet"
    )
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument(
        "--format",
        choices=("auto", "official", "parquet"),
        default="auto",
        help="input layout (default: the one present)",
    )
    parser.add_argument(
        "--split",
        choices=("random", "leave-last-out"),
        default="random",
        help="random: seeded 80/10/10 (default); leave-last-out: per user, last -> test, second last -> valid",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random split, the negatives and the train order")
    parser.add_argument(
        "--implicit", action="store_true", help="binary 0/1 labels with sampled negatives instead of rating regression"
    )
    parser.add_argument(
        "--min-rating", type=float, default=None, help="implicit: positives are ratings >= this (default: every rating)"
    )
    parser.add_argument("--negatives", type=int, default=None, help="implicit: negatives per positive (default 4)")
    parser.add_argument(
        "--zip-prefix-chars",
        type=int,
        default=1,
        help="zip_prefix = the first N characters of the zip code (default 1)",
    )
    parser.add_argument("--row-group-rows", type=int, default=16_384)
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    args = parser.parse_args(argv)
    if not args.implicit and (args.min_rating is not None or args.negatives is not None):
        parser.error("--min-rating and --negatives need --implicit")
    try:
        opts = MovieLensOptions(
            input=args.input,
            format=args.format,
            split=args.split,
            seed=args.seed,
            implicit=args.implicit,
            min_rating=args.min_rating,
            negatives=4 if args.negatives is None else args.negatives,
            zip_prefix_chars=args.zip_prefix_chars,
            row_group_rows=args.row_group_rows,
        )
    except ValueError as e:
        parser.error(str(e))
    return opts, args.out, args.overwrite


if __name__ == "__main__":
    sys.exit(prepare_main("movielens", sys.argv[1:]))
