"""`recsys prepare movielens` on a small hand-made MovieLens written in both input layouts, plus one
run on the real MovieLens-100K when it is present (skipped otherwise)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare import main as prepare_main
from data_pipeline.prepare.movielens import MovieLensOptions, prepare, read_inputs
from data_pipeline.prepare.movielens_features import GENRES, featurize, load_transforms
from data_pipeline.reader import ParquetBatches, list_row_groups
from data_pipeline.schema import DatasetSchema, check_files, check_row_group
from launch.cli import main as recsys
from tests.helpers.runs import ROOT

REAL = ROOT.parent / "shared" / "data" / "movielens-100k"  # evaluation data beside the repo; skipped when absent

# user_id, age, gender, occupation, zip_code
USERS = [
    (10, 17, "F", "student", "02139"),
    (20, 18, "M", "engineer", "T8H1N"),
    (30, 56, "M", "other", "94043"),
    (40, 35, "F", "writer", "10001"),
    (50, 24, "M", "student", "55455"),
    (60, 49, "F", "engineer", "V3N4P"),
]
# movie_id, title, release_date, genres
ITEMS = [
    (101, "Toy Story (1995)", "01-Jan-1995", ("Animation", "Children's", "Comedy")),
    (102, "Café au lait (1993)", "4-Feb-1993", ("Comedy", "Romance")),
    (103, "unknown", None, ("unknown",)),
    (105, "Alien (1979)", "01-Jan-1979", ("Horror", "Sci-Fi")),
    (107, "Heat (1995)", "15-Dec-1995", ("Action", "Crime", "Thriller")),
    (110, "Casablanca (1942)", "01-Jan-1942", ("Drama", "Romance", "War")),
    (111, "Fargo (1996)", "14-Feb-1997", ("Crime", "Drama", "Thriller")),
    (120, "No Genre (1995)", "01-Jan-1995", ()),
]
# user_id, movie_id, rating, timestamp. User 20 rates 103 and 105 at the same last timestamp.
RATINGS = [
    (10, 101, 5, 1000),
    (10, 102, 3, 1005),
    (10, 105, 4, 1003),
    (10, 107, 1, 1010),
    (10, 110, 2, 1001),
    (20, 101, 4, 2000),
    (20, 105, 4, 2050),
    (20, 103, 2, 2050),
    (20, 111, 5, 2010),
    (20, 120, 3, 2020),
    (30, 110, 5, 3000),
    (30, 111, 4, 3001),
    (30, 101, 2, 3002),
    (30, 102, 1, 3003),
    (40, 107, 3, 4000),
    (40, 105, 5, 4100),
    (40, 101, 4, 4050),
    (40, 120, 2, 4020),
    (40, 111, 3, 4030),
    (40, 102, 4, 4040),
    (50, 102, 5, 5000),
    (50, 103, 3, 5001),
    (50, 110, 4, 5002),
    (50, 101, 1, 5003),
    (60, 111, 2, 6000),
    (60, 120, 5, 6001),
    (60, 105, 3, 6002),
    (60, 107, 4, 6003),
    (60, 101, 5, 6004),
    (60, 110, 1, 6005),
]
TIMESTAMP = {(u, m): ts for u, m, _, ts in RATINGS}


def _flags(genres: tuple[str, ...]) -> list[int]:
    return [int(g in genres) for g in GENRES]


def write_official(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{ts}\n" for u, m, r, ts in RATINGS))
    (root / "u.user").write_text("".join("|".join(map(str, row)) + "\n" for row in USERS))
    lines = [
        "|".join(
            [
                str(m),
                title,
                date or "",
                "",
                f"http://us.imdb.com/M/title-exact?{m}" if date else "",
                *map(str, _flags(g)),
            ]
        )
        for m, title, date, g in ITEMS
    ]
    (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return root


def write_parquet(root: Path, drop: tuple[str, str] | None = None) -> Path:
    """The same data as Parquet; `drop` = (file stem, column) leaves one column out."""
    root.mkdir(parents=True, exist_ok=True)
    tables = {
        "ratings": pa.table(
            {k: [r[i] for r in RATINGS] for i, k in enumerate(("user_id", "movie_id", "rating", "timestamp"))}
        ),
        "users": pa.table(
            {k: [r[i] for r in USERS] for i, k in enumerate(("user_id", "age", "gender", "occupation", "zip_code"))}
        ),
        "items": pa.table(
            {
                "movie_id": [m for m, *_ in ITEMS],
                "movie_title": [t for _, t, _, _ in ITEMS],
                "release_date": [d for _, _, d, _ in ITEMS],
                "video_release_date": pa.nulls(len(ITEMS), pa.float64()),
                "IMDb_URL": [f"http://us.imdb.com/M/title-exact?{m}" for m, *_ in ITEMS],
                **{g: [_flags(genres)[j] for *_, genres in ITEMS] for j, g in enumerate(GENRES)},
            }
        ),
    }
    for stem, table in tables.items():
        if drop and drop[0] == stem:
            table = table.drop_columns([drop[1]])
        pq.write_table(table, root / f"{stem}.parquet")
    return root


def read_split(root: Path, split: str) -> pa.Table:
    return pq.read_table(root / split / "part-00000.parquet")


def all_rows(root: Path) -> pa.Table:
    return pa.concat_tables([read_split(root, s) for s in ("train", "valid", "test")])


def raw_pairs(root: Path, table: pa.Table) -> list[tuple[int, int]]:
    """(raw user id, raw movie id) of each row, through the saved id maps."""
    vocab = load_transforms(root)["vocab"]
    return [
        (vocab["user_id"][u], vocab["movie_id"][m])
        for u, m in zip(table["user_id"].to_pylist(), table["movie_id"].to_pylist())
    ]


@pytest.fixture
def parquet_input(tmp_path) -> Path:
    return write_parquet(tmp_path / "in_parquet")


# ---- inputs and features ------------------------------------------------------------------------


def test_official_and_parquet_inputs_give_the_same_dataset(tmp_path, parquet_input):
    official = write_official(tmp_path / "in_official")
    for implicit in (False, True):
        opts = MovieLensOptions(implicit=implicit, negatives=2)
        a = prepare(replace(opts, input=str(official)), tmp_path / f"a{implicit}", log=lambda *_: None)
        b = prepare(replace(opts, input=str(parquet_input)), tmp_path / f"b{implicit}", log=lambda *_: None)
        assert a.extra["provenance"]["movielens"]["format"] == "official"
        assert b.extra["provenance"]["movielens"]["format"] == "parquet"
        for split in ("train", "valid", "test"):
            assert read_split(a.root, split).equals(read_split(b.root, split))
        for name in ("transforms.json", "items.parquet", "users.parquet"):
            assert (a.root / name).read_bytes() == (b.root / name).read_bytes()
    titles = pq.read_table(a.root / "items.parquet")["movie_title"].to_pylist()
    assert "Café au lait (1993)" in titles  # latin-1 u.item decoded


def test_id_maps_and_features_are_exact(tmp_path, parquet_input):
    schema = prepare(MovieLensOptions(input=str(parquet_input)), tmp_path / "out", log=lambda *_: None)
    t = load_transforms(schema.root)
    assert t["vocab"]["user_id"] == [10, 20, 30, 40, 50, 60]
    assert t["vocab"]["movie_id"] == [101, 102, 103, 105, 107, 110, 111, 120]
    assert t["vocab"]["gender"] == ["F", "M"]
    assert t["vocab"]["occupation"] == ["engineer", "other", "student", "writer"]
    assert t["vocab"]["zip_prefix"] == ["0", "1", "5", "9", "T", "V"]
    assert t["vocab"]["release_year"] == [1942, 1979, 1993, 1995, 1997]
    sizes = {f.name: (f.num_embeddings, f.multi_hot) for f in schema.sparse}
    assert sizes == {
        "user_id": (6, False),
        "movie_id": (8, False),
        "age_bucket": (7, False),
        "gender": (2, False),
        "occupation": (4, False),
        "zip_prefix": (6, False),
        "release_year": (5, False),
        "genres": (19, True),
    }
    assert schema.task == "regression" and schema.label == "rating" and schema.label_range == [1.0, 5.0]
    assert schema.dense == ["age_z", "release_year_z", "user_log_count_z", "movie_log_count_z"]
    assert schema.extra["transforms"] == "transforms.json"

    rows = all_rows(schema.root)
    assert set(rows.column_names) == {"rating", *schema.dense, *schema.sparse_names}  # no raw ids, no timestamp
    by_pair = dict(zip(raw_pairs(schema.root, rows), rows.to_pylist()))
    row = by_pair[(20, 105)]  # 18-year-old engineer from T8H1N rates Alien (1979), Horror + Sci-Fi
    assert {k: row[k] for k in schema.sparse_names} == {
        "user_id": 1,
        "movie_id": 3,
        "age_bucket": 1,
        "gender": 1,
        "occupation": 0,
        "zip_prefix": 4,
        "release_year": 1,
        "genres": [11, 15],
    }
    assert row["rating"] == 4.0
    stats = t["dense"]
    assert row["age_z"] == pytest.approx((18 - stats["age_z"]["mean"]) / stats["age_z"]["std"], abs=1e-6)
    assert row["release_year_z"] == pytest.approx(
        (1979 - stats["release_year_z"]["mean"]) / stats["release_year_z"]["std"], abs=1e-6
    )
    assert by_pair[(10, 101)]["age_bucket"] == 0 and by_pair[(30, 110)]["age_bucket"] == 6  # 17 -> <18, 56 -> 56+
    assert by_pair[(60, 111)]["age_bucket"] == 4 and by_pair[(40, 107)]["age_bucket"] == 3  # 49, 35
    assert by_pair[(10, 102)]["genres"] == [5, 14] and by_pair[(10, 102)]["release_year"] == 2  # 4-Feb-1993
    assert by_pair[(20, 103)]["release_year"] is None  # no release date -> missing id
    assert by_pair[(20, 103)]["release_year_z"] == 0.0  # -> the mean
    assert by_pair[(20, 120)]["genres"] == []

    # Normalisation statistics are those of the train split's rows, counts those of train only.
    train = read_split(schema.root, "train")
    ages = {u: a for u, a, *_ in USERS}
    train_ages = [ages[u] for u, _ in raw_pairs(schema.root, train)]
    assert stats["age_z"]["mean"] == pytest.approx(np.mean(train_ages))
    assert stats["age_z"]["std"] == pytest.approx(np.std(train_ages))
    assert pc.mean(train["age_z"]).as_py() == pytest.approx(0, abs=1e-6)
    train_users = Counter(u for u, _ in raw_pairs(schema.root, train))
    assert t["train_counts"]["user_id"] == [train_users[u] for u in t["vocab"]["user_id"]]


def test_transforms_featurize_new_rows_like_the_training_rows(tmp_path, parquet_input):
    schema = prepare(MovieLensOptions(input=str(parquet_input)), tmp_path / "out", log=lambda *_: None)
    t = load_transforms(schema.root)
    data = read_inputs(parquet_input)
    again = featurize([u for u, *_ in RATINGS], [m for _, m, *_ in RATINGS], data.users, data.items, t)
    keys = [("user_id", "ascending"), ("movie_id", "ascending")]
    assert again.sort_by(keys).equals(all_rows(schema.root).drop_columns(["rating"]).sort_by(keys))
    # A new user (known age and occupation) and a new movie: unknown raw ids become missing ids.
    users = pa.concat_tables(
        [
            data.users,
            pa.table(
                {"user_id": [99], "age": [30.0], "gender": ["F"], "occupation": ["writer"], "zip_code": ["94110"]}
            ),
        ]
    )
    (row,) = featurize([99], [12345], users, data.items, t).to_pylist()
    assert row["user_id"] is None and row["movie_id"] is None and row["genres"] is None
    assert (row["age_bucket"], row["gender"], row["occupation"], row["zip_prefix"]) == (2, 0, 3, 3)
    items = pq.read_table(schema.root / "items.parquet")
    assert items["movie_id"].to_pylist() == list(range(8))
    assert items["raw_movie_id"].to_pylist() == t["vocab"]["movie_id"]
    assert items["genres"][0].as_py() == [3, 4, 5]


# ---- splits and labels --------------------------------------------------------------------------


def test_random_split_partitions_the_ratings(tmp_path, parquet_input):
    schema = prepare(MovieLensOptions(input=str(parquet_input), seed=3), tmp_path / "out", log=lambda *_: None)
    assert {s: i.rows for s, i in schema.splits.items()} == {"train": 24, "valid": 3, "test": 3}
    seen = []
    for split in ("train", "valid", "test"):
        table = read_split(schema.root, split)
        seen += [(u, m, r) for (u, m), r in zip(raw_pairs(schema.root, table), table["rating"].to_pylist())]
    assert sorted(seen) == sorted((u, m, float(r)) for u, m, r, _ in RATINGS)
    other = prepare(MovieLensOptions(input=str(parquet_input), seed=4), tmp_path / "seed4", log=lambda *_: None)
    assert not read_split(other.root, "test").equals(read_split(schema.root, "test"))


def test_leave_last_out_puts_each_users_latest_in_test(tmp_path, parquet_input):
    schema = prepare(
        MovieLensOptions(input=str(parquet_input), split="leave-last-out"), tmp_path / "out", log=lambda *_: None
    )
    pairs = {s: raw_pairs(schema.root, read_split(schema.root, s)) for s in ("train", "valid", "test")}
    assert sorted(p for s in pairs.values() for p in s) == sorted((u, m) for u, m, *_ in RATINGS)
    for user, *_ in USERS:
        mine = sorted((TIMESTAMP[(u, m)], m) for u, m, *_ in RATINGS if u == user)  # ties: larger movie id is later
        assert [m for u, m in pairs["test"] if u == user] == [mine[-1][1]]
        assert [m for u, m in pairs["valid"] if u == user] == [mine[-2][1]]
        assert sorted(m for u, m in pairs["train"] if u == user) == sorted(m for _, m in mine[:-2])
    assert (20, 105) in pairs["test"] and (20, 103) in pairs["valid"]  # the tie at t=2050


@pytest.mark.parametrize("split", ["random", "leave-last-out"])
def test_implicit_negatives_are_unrated_items_k_per_positive(tmp_path, parquet_input, split):
    k = 3
    opts = MovieLensOptions(split=split, implicit=True, negatives=k, seed=1)
    schema = prepare(replace(opts, input=str(parquet_input)), tmp_path / "out", log=lambda *_: None)
    assert schema.task == "binary" and schema.label == "label" and schema.label_range is None
    rated = {(u, m) for u, m, *_ in RATINGS}
    positives = []
    for name in ("train", "valid", "test"):
        table = read_split(schema.root, name)
        labels = table["label"].to_pylist()
        pairs = raw_pairs(schema.root, table)
        pos = [p for p, y in zip(pairs, labels) if y == 1]
        neg = [p for p, y in zip(pairs, labels) if y == 0]
        assert set(labels) == {0, 1} and len(neg) == k * len(pos)
        assert all(p in rated for p in pos) and not any(p in rated for p in neg)
        assert Counter(u for u, _ in neg) == Counter({u: k * n for u, n in Counter(u for u, _ in pos).items()})
        if name != "train":  # each positive is followed by its own user's negatives
            assert labels == [1, *[0] * k] * len(pos)
            assert all(pairs[i][0] == pairs[i - i % (k + 1)][0] for i in range(len(pairs)))
        positives += pos
    assert sorted(positives) == sorted(rated)
    # Deterministic: the same options give the same rows.
    again = prepare(replace(opts, input=str(parquet_input)), tmp_path / "again", log=lambda *_: None)
    assert all(read_split(again.root, s).equals(read_split(schema.root, s)) for s in ("train", "valid", "test"))


def test_min_rating_keeps_only_high_ratings_as_positives(tmp_path, parquet_input):
    opts = MovieLensOptions(implicit=True, min_rating=4, negatives=1)
    schema = prepare(replace(opts, input=str(parquet_input)), tmp_path / "out", log=lambda *_: None)
    rows = all_rows(schema.root)
    pairs = raw_pairs(schema.root, rows)
    pos = sorted(p for p, y in zip(pairs, rows["label"].to_pylist()) if y == 1)
    assert pos == sorted((u, m) for u, m, r, _ in RATINGS if r >= 4)
    rated = {(u, m) for u, m, *_ in RATINGS}
    assert not any(
        p in rated for p, y in zip(pairs, rows["label"].to_pylist()) if y == 0
    )  # low ratings are not negatives


# ---- the dataset contract -------------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True])
def test_dataset_passes_checks_and_loads_into_batches(tmp_path, parquet_input, implicit):
    opts = MovieLensOptions(implicit=implicit, negatives=2, row_group_rows=8)
    prepare(replace(opts, input=str(parquet_input)), tmp_path / "out", log=lambda *_: None)
    schema = DatasetSchema.load(tmp_path / "out")
    for split in ("train", "valid", "test"):
        groups = list_row_groups(check_files(schema, split))
        assert len(groups) == -(-schema.splits[split].rows // 8)
        for g in groups:
            check_row_group(schema, pq.ParquetFile(g.file).read_row_group(g.index), str(g))
    batches = list(ParquetBatches(schema, "train", batch_size=4, shuffle=True))
    assert len(batches) == schema.splits["train"].rows // 4
    batch = batches[0]
    assert batch.dense.shape == (4, 4) and batch.sparse.keys() == schema.sparse_names
    assert set(batch.labels.tolist()) <= ({0.0, 1.0} if implicit else {1.0, 2.0, 3.0, 4.0, 5.0})
    evaluated = list(ParquetBatches(schema, "test", batch_size=5, drop_last=False))
    assert sum(int((b.weights > 0).sum()) for b in evaluated) == schema.splits["test"].rows


def test_cli_rerun_is_up_to_date_and_a_different_dataset_is_refused(tmp_path, parquet_input, capsys):
    out = tmp_path / "out"
    args = ["prepare", "movielens", "--input", str(parquet_input), "--out", str(out), "--implicit", "--negatives", "2"]
    assert recsys(args) == 0
    printed = capsys.readouterr().out
    assert "train 72" in printed and "user_id 6" in printed and "genres 19 multi-hot" in printed
    assert recsys(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert recsys([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err
    assert DatasetSchema.load(out).extra["provenance"]["movielens"]["seed"] == 0  # left as it was
    assert recsys([*args, "--seed", "1", "--overwrite"]) == 0
    provenance = DatasetSchema.load(out).extra["provenance"]
    assert provenance["movielens"]["seed"] == 1 and provenance["movielens"]["negatives"] == 2
    assert [Path(i["path"]).name for i in provenance["inputs"]] == ["ratings.parquet", "users.parquet", "items.parquet"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: write_parquet(d, drop=("users", "age")), ["users.parquet", "column 'age'"]),
        (lambda d: write_parquet(d, drop=("ratings", "timestamp")), ["ratings.parquet", "column 'timestamp'"]),
        (lambda d: write_parquet(d, drop=("items", "Sci-Fi")), ["items.parquet", "column 'Sci-Fi'"]),
        (lambda d: (write_official(d), (d / "u.item").unlink()), ["u.item", "not found"]),
        (lambda d: (write_official(d), (d / "u.user").write_text("10|17|F|student\n")), ["u.user", "official"]),
        (lambda d: d.mkdir(), ["neither u.data nor ratings.parquet"]),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, setup, expected):
    setup(tmp_path / "in")
    assert prepare_main("movielens", ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "out").exists()  # nothing claimed on bad input


def test_ratings_of_unknown_users_and_out_of_range_are_errors(tmp_path, capsys):
    root = write_parquet(tmp_path / "in")
    ratings = pq.read_table(root / "ratings.parquet")
    pq.write_table(
        pa.concat_tables([ratings, pa.table({"user_id": [77], "movie_id": [101], "rating": [3], "timestamp": [1]})]),
        root / "ratings.parquet",
    )
    assert prepare_main("movielens", ["--input", str(root), "--out", str(tmp_path / "out")]) == 2
    assert "column 'user_id' has 1 rows whose id is not in users.parquet (e.g. 77)" in capsys.readouterr().err
    pq.write_table(
        ratings.set_column(2, "rating", pa.array([0] + [3] * (ratings.num_rows - 1))), root / "ratings.parquet"
    )
    assert prepare_main("movielens", ["--input", str(root), "--out", str(tmp_path / "out")]) == 2
    assert "'rating' must lie in [1, 5]" in capsys.readouterr().err
    assert (
        prepare_main("movielens", ["--input", str(root), "--out", str(tmp_path / "out"), "--implicit"]) == 0
    )  # fine as implicit


# ---- the real MovieLens-100K ----------------------------------------------------------------------


@pytest.mark.skipif(
    not (REAL / "ratings.parquet").is_file(), reason=f"{REAL} not present (evaluation licence: not in the repo)"
)
@pytest.mark.parametrize("split", ["random", "leave-last-out"])
def test_real_movielens_100k_ends_up_in_the_splits(tmp_path, split):
    schema = prepare(MovieLensOptions(input=str(REAL), split=split), tmp_path / "ml100k", log=lambda *_: None)
    rows = all_rows(schema.root)
    assert rows.num_rows == 100_000
    assert pc.count_distinct(rows["user_id"]).as_py() == 943 and pc.count_distinct(rows["movie_id"]).as_py() == 1682
    assert {f.name: f.num_embeddings for f in schema.sparse}["user_id"] == 943
    pairs = pc.add(pc.multiply(rows["user_id"], 10_000), rows["movie_id"])
    assert pc.count_distinct(pairs).as_py() == 100_000  # no rating lost or duplicated
    if split == "random":
        assert [schema.splits[s].rows for s in ("train", "valid", "test")] == [80_000, 10_000, 10_000]
    else:
        assert schema.splits["test"].rows == schema.splits["valid"].rows == 943
