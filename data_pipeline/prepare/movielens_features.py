"""MovieLens features: vocabularies and statistics learned on the data (transforms.json), and the
functions that turn users, items and (user, movie) pairs into training columns the same way for
every split, the catalogue files and new rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.schema import DatasetSchema

VERSION = 2  # bump when features or layout change, so stale datasets are not reported up to date
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
AGE_BOUNDARIES = (18, 25, 35, 45, 50, 56)  # bucket i holds ages in [boundary[i-1], boundary[i])
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")


SPARSE = ("user_id", "movie_id", "age_bucket", "gender", "occupation", "zip_prefix", "release_year", "genres")
DENSE = ("age_z", "release_year_z", "user_log_count_z", "movie_log_count_z")
TRANSFORMS_FILE = "transforms.json"

# ---- transforms: learned from the data, saved, and applied the same way to new rows ---------------


def _clean(values: pa.Array) -> pa.Array:
    """Trimmed strings, with empty ones as null (missing)."""
    values = pc.utf8_trim_whitespace(values)
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def _zip_prefix(zip_code: pa.Array, chars: int) -> pa.Array:
    return pc.utf8_upper(pc.utf8_slice_codeunits(_clean(zip_code), 0, chars))


def _release_year(release_date: pa.Array) -> pa.Array:
    """The 4-digit year ending a date like '01-Jan-1995' or '4-Feb-1971'; null if absent."""
    match = pc.extract_regex(_clean(release_date), r"(?P<year>\d{4})\s*$")
    year = pc.struct_field(match, [0])
    return pc.cast(pc.if_else(pc.is_valid(match), year, pa.scalar(None, pa.string())), pa.int64())


def _vocab(values: pa.Array) -> list:
    return pc.unique(values.drop_null()).sort().to_pylist()


def lookup(values: pa.Array, vocab: list) -> pa.Array:
    """Index of each value in `vocab` (its position), null where absent."""
    value_type = pa.string() if pa.types.is_string(values.type) else pa.int64()
    return pc.cast(pc.index_in(values, value_set=pa.array(vocab, value_type)), pa.int64())


def fit_vocabularies(users: pa.Table, items: pa.Table, zip_prefix_chars: int) -> dict:
    """The id spaces. `vocab[feature][i]` is the raw value of id i (so raw -> id is its position)."""
    return {
        "version": VERSION,
        "vocab": {
            "user_id": _vocab(users["user_id"]),
            "movie_id": _vocab(items["movie_id"]),
            "gender": _vocab(_clean(users["gender"])),
            "occupation": _vocab(_clean(users["occupation"])),
            "zip_prefix": _vocab(_zip_prefix(users["zip_code"], zip_prefix_chars)),
            "release_year": _vocab(_release_year(items["release_date"])),
        },
        "zip_prefix_chars": zip_prefix_chars,
        "age_bucket": {"boundaries": list(AGE_BOUNDARIES), "labels": list(AGE_LABELS)},
        "genres": list(GENRES),
    }


def _train_count(index: pa.Array, counts: list[int]) -> np.ndarray:
    """Train-split interactions of each id (0 for a null id)."""
    ids = pc.fill_null(index, -1).to_numpy(zero_copy_only=False)
    return np.where(ids >= 0, np.asarray(counts, np.float64)[np.maximum(ids, 0)], 0.0)


def _floats(values: pa.Array) -> np.ndarray:
    return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN


def user_columns(users: pa.Table, t: dict) -> tuple[dict[str, pa.Array], dict[str, np.ndarray]]:
    """Sparse ids and raw (not yet standardised) dense values of each row of `users`."""
    vocab = t["vocab"]
    index = lookup(users["user_id"].combine_chunks(), vocab["user_id"])
    age = _floats(users["age"])
    bucket = np.searchsorted(np.asarray(t["age_bucket"]["boundaries"], np.float64), np.nan_to_num(age), side="right")
    sparse = {
        "user_id": index,
        "age_bucket": pa.array(bucket, pa.int64(), mask=np.isnan(age)),
        "gender": lookup(_clean(users["gender"]), vocab["gender"]),
        "occupation": lookup(_clean(users["occupation"]), vocab["occupation"]),
        "zip_prefix": lookup(_zip_prefix(users["zip_code"], t["zip_prefix_chars"]), vocab["zip_prefix"]),
    }
    dense = {"age_z": age, "user_log_count_z": np.log1p(_train_count(index, t["train_counts"]["user_id"]))}
    return sparse, dense


def item_columns(items: pa.Table, t: dict) -> tuple[dict[str, pa.Array], dict[str, np.ndarray]]:
    """Sparse ids and raw dense values of each row of `items`."""
    index = lookup(items["movie_id"].combine_chunks(), t["vocab"]["movie_id"])
    year = _release_year(items["release_date"])
    flags = np.stack([pc.fill_null(items[g], 0).to_numpy(zero_copy_only=False) != 0 for g in t["genres"]], axis=1)
    rows, genre = np.nonzero(flags)  # row-major: each row's genres in order
    offsets = np.r_[0, np.cumsum(np.bincount(rows, minlength=len(flags)))].astype(np.int32)
    sparse = {
        "movie_id": index,
        "release_year": lookup(year, t["vocab"]["release_year"]),
        "genres": pa.ListArray.from_arrays(pa.array(offsets), pa.array(genre, pa.int64())),
    }
    dense = {
        "release_year_z": _floats(year),
        "movie_log_count_z": np.log1p(_train_count(index, t["train_counts"]["movie_id"])),
    }
    return sparse, dense


def _standardise(values: np.ndarray, stats: dict) -> pa.Array:
    z = (values - stats["mean"]) / stats["std"]
    return pa.array(np.nan_to_num(z, nan=0.0).astype(np.float32))


def fit_stats(values: np.ndarray, weights: np.ndarray) -> dict:
    """Mean and std of `values` over rows, entity i counting `weights[i]` times; NaN left out."""
    ok = ~np.isnan(values) & (weights > 0)
    if not ok.any():
        return {"mean": 0.0, "std": 1.0}
    mean = float(np.average(values[ok], weights=weights[ok]))
    std = float(np.sqrt(np.average((values[ok] - mean) ** 2, weights=weights[ok])))
    return {"mean": mean, "std": std if std > 0 else 1.0}


def user_features(users: pa.Table, t: dict) -> pa.Table:
    """One row per row of `users`: its sparse ids and standardised dense features."""
    sparse, dense = user_columns(users, t)
    return pa.table({**sparse, **{name: _standardise(x, t["dense"][name]) for name, x in dense.items()}})


def item_features(items: pa.Table, t: dict) -> pa.Table:
    """One row per row of `items`: its sparse ids and standardised dense features."""
    sparse, dense = item_columns(items, t)
    return pa.table({**sparse, **{name: _standardise(x, t["dense"][name]) for name, x in dense.items()}})


def featurize(user_ids, movie_ids, users: pa.Table, items: pa.Table, t: dict) -> pa.Table:
    """Feature columns (DENSE then SPARSE) for pairs of raw (user id, movie id), transformed exactly
    as the training rows were. `users`/`items` hold the input columns and may include entities
    unseen in training (their ids become null; their other features still apply). Pairs whose
    user or movie is not in `users`/`items` get null features (missing ids, dense 0)."""
    user_rows = pc.index_in(pa.array(user_ids, pa.int64()), value_set=users["user_id"].combine_chunks())
    item_rows = pc.index_in(pa.array(movie_ids, pa.int64()), value_set=items["movie_id"].combine_chunks())
    u = user_features(users, t).take(user_rows)
    i = item_features(items, t).take(item_rows)
    columns = {**{c: u[c] for c in u.column_names}, **{c: i[c] for c in i.column_names}}
    return pa.table({name: columns[name] for name in (*DENSE, *SPARSE)})


def load_transforms(root: str | Path) -> dict:
    """The transforms a dataset was made with (`schema.extra["transforms"]` names the file)."""
    schema = DatasetSchema.load(root)
    return json.loads((schema.root / schema.extra["transforms"]).read_text())
