"""Retrieval metrics: Recall@K / NDCG@K against direct per-user computations, the catalogue
evaluation on 1 and 2 gloo ranks, and a two-tower trained with the in-batch softmax (2 ranks,
torchrun) beating the most-popular baseline on data with user/item clusters."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.batch import Batch
from data_pipeline.prepare.movielens import MovieLensOptions, prepare
from data_pipeline.prepare.movielens_features import GENRES
from data_pipeline.schema import DatasetSchema
from models.losses import entity_ids
from tests.helpers.dist import run_ranks
from tests.helpers.runs import train
from trainer.catalogue import CatalogueRetrieval
from trainer.distributed import DistEnv
from trainer.metrics import top_k_metrics

KS = [1, 3, 10]


def _direct(scores: list[float], relevant: set[int], k: int) -> tuple[float, float]:
    """(recall@k, ndcg@k) of one user, from the sorted list (hidden items have score -inf)."""
    ranked = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if scores[i] != -math.inf][:k]
    hits = [i in relevant for i in ranked]
    dcg = sum(1 / math.log2(p + 2) for p, hit in enumerate(hits) if hit)
    ideal = sum(1 / math.log2(p + 2) for p in range(min(len(relevant), k)))
    return sum(hits) / len(relevant), dcg / ideal


def _direct_more(scores: list[float], relevant: set[int], k: int) -> tuple[float, float, float]:
    """(precision@k, hit_rate@k, reciprocal rank) of one user, from the sorted list."""
    ranked = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if scores[i] != -math.inf]
    hits = [i in relevant for i in ranked[:k]]
    first = next(p for p, i in enumerate(ranked) if i in relevant)
    return sum(hits) / k, float(any(hits)), 1 / (first + 1)


def test_top_k_metrics_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, generator=g)
    relevant = torch.rand(40, 30, generator=g) < 0.15
    relevant[torch.arange(40), torch.randint(0, 30, (40,), generator=g)] = True  # at least one each
    hidden = (torch.rand(40, 30, generator=g) < 0.3) & ~relevant
    scores = scores.masked_fill(hidden, -math.inf)
    metrics = top_k_metrics(scores, relevant, KS)
    assert list(metrics) == [
        *"recall@1 ndcg@1 recall@3 ndcg@3 recall@10 ndcg@10 precision@1 hit_rate@1 precision@3 hit_rate@3".split(),
        *"precision@10 hit_rate@10 mrr".split(),
    ]
    for u in range(40):
        rel = set(torch.nonzero(relevant[u]).squeeze(1).tolist())
        for k in KS:
            recall, ndcg = _direct(scores[u].tolist(), rel, k)
            precision, hit, reciprocal_rank = _direct_more(scores[u].tolist(), rel, k)
            assert metrics[f"recall@{k}"][u].item() == pytest.approx(recall)
            assert metrics[f"ndcg@{k}"][u].item() == pytest.approx(ndcg)
            assert metrics[f"precision@{k}"][u].item() == pytest.approx(precision)
            assert metrics[f"hit_rate@{k}"][u].item() == hit
        assert metrics["mrr"][u].item() == pytest.approx(reciprocal_rank)


# ---- a small implicit MovieLens with structure: users and items in clusters ----------------------


def write_clustered_movielens(root, users=240, items=160, clusters=4, per_user=30, seed=0):
    """MovieLens-format Parquet input where each user mostly rates items of their own cluster."""
    rng = np.random.default_rng(seed)
    user_cluster = np.arange(users) % clusters
    item_cluster = np.arange(items) % clusters
    rows = []
    for u in range(users):
        own = np.flatnonzero(item_cluster == user_cluster[u])
        popularity = 1.0 / np.arange(1, len(own) + 1)  # Zipf within the cluster
        picked = set(rng.choice(own, size=int(per_user * 0.9), replace=False, p=popularity / popularity.sum()).tolist())
        while len(picked) < per_user:
            picked.add(int(rng.integers(items)))
        for m in picked:
            rows.append((u + 1, m + 1, 5, int(rng.integers(10**6))))
    root.mkdir(parents=True, exist_ok=True)
    ratings = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("user_id", "movie_id", "rating", "timestamp"))})
    pq.write_table(ratings, root / "ratings.parquet")
    pq.write_table(
        pa.table(
            {
                "user_id": np.arange(1, users + 1),
                "age": rng.integers(18, 60, users),
                "gender": rng.choice(["F", "M"], users),
                "occupation": ["other"] * users,
                "zip_code": ["12345"] * users,
            }
        ),
        root / "users.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "movie_id": np.arange(1, items + 1),
                "movie_title": [f"m{m}" for m in range(items)],
                "release_date": ["01-Jan-1995"] * items,
                # one genre per movie, a second for every third one (diversity@K sees bags of several sizes)
                **{
                    g: ((m % len(GENRES) == j) | ((m % 3 == 0) & (m // 3 % len(GENRES) == j))).astype(np.int64)
                    for m in [np.arange(items)]
                    for j, g in enumerate(GENRES)
                },
            }
        ),
        root / "items.parquet",
    )
    return root


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustered")
    source = write_clustered_movielens(root / "input")
    return prepare(
        MovieLensOptions(input=str(source), implicit=True, split="leave-last-out", negatives=4),
        root / "data",
        log=lambda *_: None,
    )


def fake_encode(batch: Batch) -> tuple[torch.Tensor, ...]:
    """A stand-in for a trained model: vectors made from the ids, so a direct loop can recompute
    every score. The user vector sits in columns 0-1, the item vector in 2-3 of one space."""
    user = entity_ids(batch.sparse, "user_id").float()
    item = entity_ids(batch.sparse, "movie_id").float()
    u = torch.stack([torch.sin(user), torch.cos(user * 0.3)], dim=1)
    v = torch.stack([torch.cos(item * 0.7), torch.sin(item)], dim=1)
    return u, v, torch.zeros_like(user), 0.01 * torch.sin(item * 3)


def _brute_force(schema: DatasetSchema, split: str) -> dict[str, float]:
    def positives(name):
        t = pq.read_table(schema.split_files(name)[0])
        return [
            (u, m)
            for u, m, y in zip(t["user_id"].to_pylist(), t["movie_id"].to_pylist(), t["label"].to_pylist())
            if y == 1
        ]

    before = {s: positives(s) for s in ("train", "valid", "test")[: ("train", "valid", "test").index(split)]}
    seen = {(u, m) for pairs in before.values() for u, m in pairs}
    relevant: dict[int, set[int]] = {}
    for u, m in positives(split):
        relevant.setdefault(u, set()).add(m)
    n_items = next(f.num_embeddings for f in schema.sparse if f.name == "movie_id")
    catalogue = set(pq.read_table(schema.root / schema.extra["items"])["movie_id"].to_pylist())
    train_counts = dict.fromkeys(range(n_items), 0)
    for _, m in positives("train"):
        train_counts[m] += 1
    mean_popularity = sum(train_counts[m] for m in catalogue) / len(catalogue)
    sums = {f"{name}@{k}": 0.0 for k in KS for name in ("recall", "ndcg", "precision", "hit_rate", "popularity_lift")}
    sums.update({f"diversity@{k}": 0.0 for k in KS if k >= 2})
    items = pq.read_table(schema.root / schema.extra["items"])
    genres = {m: set(g or []) for m, g in zip(items["movie_id"].to_pylist(), items["genres"].to_pylist())}

    def similarity(a: int, b: int) -> float:  # cosine of two bags of genres
        shared = len(genres.get(a, set()) & genres.get(b, set()))
        return shared / math.sqrt(len(genres[a]) * len(genres[b])) if shared else 0.0

    sums["mrr"] = 0.0
    shown = {k: set() for k in KS}
    for u, rel in relevant.items():
        uv = (math.sin(u), math.cos(u * 0.3))
        scores = [
            uv[0] * math.cos(m * 0.7) + uv[1] * math.sin(m) + 0.01 * math.sin(m * 3) if m in catalogue else -math.inf
            for m in range(n_items)
        ]
        scores = [-math.inf if (u, m) in seen and m not in rel else s for m, s in enumerate(scores)]
        ranked = sorted(range(n_items), key=lambda m: -scores[m])
        for k in KS:
            recall, ndcg = _direct(scores, rel, k)
            precision, hit, reciprocal_rank = _direct_more(scores, rel, k)
            sums[f"recall@{k}"] += recall
            sums[f"ndcg@{k}"] += ndcg
            sums[f"precision@{k}"] += precision
            sums[f"hit_rate@{k}"] += hit
            sums[f"popularity_lift@{k}"] += sum(train_counts[m] for m in ranked[:k]) / k / mean_popularity
            shown[k] |= set(ranked[:k])
            if k >= 2:
                pairs = [(a, b) for i, a in enumerate(ranked[:k]) for b in ranked[i + 1 : k]]
                sums[f"diversity@{k}"] += 1 - sum(similarity(a, b) for a, b in pairs) / len(pairs)
        sums["mrr"] += reciprocal_rank
    out = {name: total / len(relevant) for name, total in sums.items()}
    return {**out, **{f"coverage@{k}": len(shown[k] & catalogue) / len(catalogue) for k in KS}}


def _evaluate_on_rank(env: DistEnv, root: str, out: str) -> None:
    schema = DatasetSchema.load(root)
    retrieval = CatalogueRetrieval(
        schema, "user_id", "movie_id", KS, env.rank, env.world_size, env.device, batch_size=64
    )
    with open(f"{out}.{env.rank}", "w") as f:
        json.dump({split: retrieval.evaluate(split, fake_encode) for split in ("valid", "test")}, f)


def test_catalogue_metrics_match_brute_force_on_one_and_two_ranks(clustered, tmp_path):
    one = CatalogueRetrieval(clustered, "user_id", "movie_id", KS, 0, 1, torch.device("cpu"), batch_size=50)
    for split in ("valid", "test"):
        model, popular = one.evaluate(split, fake_encode)
        expected = _brute_force(clustered, split)
        assert model == pytest.approx(expected, abs=1e-5)
        assert 0 < popular["recall@10"] < 1
    run_ranks(_evaluate_on_rank, 2, root=str(clustered.root), out=str(tmp_path / "out"))
    for rank in range(2):
        two = json.loads((tmp_path / f"out.{rank}").read_text())
        for split in ("valid", "test"):
            assert two[split][0] == pytest.approx(one.evaluate(split, fake_encode)[0], abs=1e-6)
            assert two[split][1] == pytest.approx(one.evaluate(split, fake_encode)[1], abs=1e-6)


@pytest.mark.slow
def test_two_tower_in_batch_softmax_beats_most_popular(clustered, tmp_path):
    run_dir = tmp_path / "run"
    flags = "--model two_tower --model.loss in_batch_softmax --model.embedding_dim 16 --data.batch_size 128"
    summary = train(clustered.root, run_dir, *flags.split(), *"--optimizer.dense_lr 0.003 --training.epochs 4".split())
    test, popular = summary["test"], summary["most_popular"]["test"]
    assert list(test)[:2] == ["recall@10", "ndcg@10"] and "auc" in test
    # the towers learn the clusters (measured: recall@10 0.75 vs 0.05); popularity alone cannot
    assert test["recall@10"] > 0.5 and test["recall@10"] > 3 * popular["recall@10"], summary
    assert test["ndcg@10"] > 3 * popular["ndcg@10"], summary
