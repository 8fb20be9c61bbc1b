"""Full-catalogue retrieval evaluation of a model with towers (two_tower), and the most-popular
baseline scored the same way.

For each user with positives in a split: score every item of the catalogue (`items.parquet`, which
`recsys prepare movielens` writes), hide the items the user had positive in earlier splits (train;
train and valid for test), and rank. Recall@K, NDCG@K, precision@K, hit rate@K and MRR are
computed per user, then averaged over users (`trainer.metrics.top_k_metrics`). Beyond accuracy:
popularity_lift@K is the mean train popularity of the items a user is shown over the catalogue's
mean (1: shown like random catalogue items; the most-popular baseline is far above), and
coverage@K the share of the catalogue that appears in at least one user's top K (across ranks), and
diversity@K (K >= 2) the intra-list diversity of Ziegler et al. (2005): 1 - the mean cosine
similarity of the item-feature vectors (the first multi-hot item feature of the catalogue, e.g.
MovieLens genres) over every pair in a user's top K, averaged over users (0: all alike; an item
without a value is unlike every other). Ranks split the users; every rank embeds the whole
catalogue (the sharded tables need every rank in each lookup, and the catalogue is small next to
the users x items score matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, pad_batch, table_to_batch
from data_pipeline.schema import SPLITS, DatasetSchema
from data_pipeline.storage import read_table
from trainer.metrics import top_k_metrics

Encoder = Callable[[Batch], tuple[torch.Tensor, ...]]
"""batch -> (user vectors, item vectors, user biases, item biases): `TwoTower.encode`."""


def supports_retrieval(schema: DatasetSchema) -> bool:
    """A binary dataset that lists its catalogue: `extra.items` and `extra.users` files."""
    extra = schema.extra or {}
    return schema.task == "binary" and bool(extra.get("items")) and bool(extra.get("users"))


def _full_rows(table: pa.Table, schema: DatasetSchema) -> pa.Table:
    """`table`'s columns plus every other column of the schema, empty (null ids, dense 0)."""
    n = table.num_rows
    columns = {schema.label: pa.array(np.zeros(n, np.float32))}
    for name in schema.dense:
        columns[name] = table[name] if name in table.column_names else pa.array(np.zeros(n, np.float32))
    for f in schema.sparse:
        kind = pa.list_(pa.int64()) if f.multi_hot else pa.int64()
        columns[f.name] = table[f.name] if f.name in table.column_names else pa.nulls(n, kind)
    return pa.table(columns)


def _batches(table: pa.Table, schema: DatasetSchema, batch_size: int, count: int) -> list[Batch]:
    """`count` batches of `batch_size` rows: `table`'s rows, then weight-0 padding."""
    batches = []
    for i in range(count):
        part = table.slice(i * batch_size, batch_size)
        batch = table_to_batch(_full_rows(part, schema), schema) if part.num_rows else None
        batches.append(pad_batch(batch, batch_size, schema))
    return batches


def _positives(schema: DatasetSchema, split: str, user: str, item: str) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) of the split's rows with label 1."""
    tables = [read_table(f, columns=[user, item, schema.label]) for f in schema.split_files(split)]
    table = pa.concat_tables(tables)
    table = table.filter(
        pc.and_(pc.greater(table[schema.label], 0), pc.and_(pc.is_valid(table[user]), pc.is_valid(table[item])))
    )
    return table[user].to_numpy(), table[item].to_numpy()


def item_features(items: pa.Table, schema: DatasetSchema, item_feature: str, num_items: int) -> torch.Tensor | None:
    """[num_items, values] unit rows: the first multi-hot feature of the catalogue as a bag of its
    values per item (zero rows for items without one), for diversity@K; None if it has none."""
    feature = next(
        (f for f in schema.sparse if f.multi_hot and f.name != item_feature and f.name in items.column_names), None
    )
    if feature is None:
        return None
    lists = items[feature.name].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    rows = np.repeat(items[item_feature].to_numpy().astype(np.int64), lengths)
    values = pc.list_flatten(lists)
    keep = pc.is_valid(values).to_numpy(zero_copy_only=False)
    values = pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = torch.zeros(num_items, feature.num_embeddings)
    out[torch.from_numpy(rows[keep]), torch.from_numpy(values[keep])] = 1.0
    return torch.nn.functional.normalize(out, dim=1)


def intra_list_diversity(features: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """[U]: 1 - the mean cosine similarity over the pairs of each row's items `top` [U, K] (K >= 2),
    from unit (or zero) feature rows: the sum over ordered pairs is |sum of the vectors|^2 minus
    the sum of their squared norms."""
    k = top.shape[1]
    if k < 2:
        return torch.ones(len(top), device=top.device)
    vectors = features[top]  # [U, K, F]
    pair_sum = vectors.sum(dim=1).pow(2).sum(dim=1) - vectors.pow(2).sum(dim=(1, 2))
    return 1 - pair_sum / (k * (k - 1))


class CatalogueRetrieval:
    """Recall@K / NDCG@K of the model and of the most-popular baseline on the valid and test splits."""

    def __init__(
        self,
        schema: DatasetSchema,
        user_feature: str,
        item_feature: str,
        ks: list[int],
        rank: int,
        world_size: int,
        device: torch.device,
        batch_size: int = 4096,
    ) -> None:
        self.schema, self.ks, self.rank, self.world_size, self.device = schema, sorted(ks), rank, world_size, device
        self.batch_size = batch_size
        self.user_feature, self.item_feature = user_feature, item_feature
        sizes = {f.name: f.num_embeddings for f in schema.sparse}
        self.num_items = sizes[item_feature]
        self.positives = {split: _positives(schema, split, user_feature, item_feature) for split in SPLITS}
        items = read_table(schema.root / schema.extra["items"])
        self.items = items.filter(pc.is_valid(items[item_feature]))
        self.item_ids = torch.from_numpy(self.items[item_feature].to_numpy().astype(np.int64))
        self.users = read_table(schema.root / schema.extra["users"])
        self.popularity = torch.from_numpy(
            np.bincount(self.positives["train"][1], minlength=self.num_items).astype(np.float32)
        )
        self.features = item_features(self.items, schema, item_feature, self.num_items)
        self.diverse_ks = [k for k in self.ks if k >= 2] if self.features is not None else []

    def _relevance(self, split: str, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(relevant [U, N], hidden [U, N]) of `users` (sorted ids): their positives in `split`
        and in the splits before it."""
        index = {u: i for i, u in enumerate(users.tolist())}
        relevant = torch.zeros(len(users), self.num_items, dtype=torch.bool)
        hidden = torch.zeros_like(relevant)
        for name in SPLITS[: SPLITS.index(split) + 1]:
            u, i = self.positives[name]
            keep = np.isin(u, users)
            rows = torch.tensor([index[x] for x in u[keep].tolist()], dtype=torch.long)
            (relevant if name == split else hidden)[rows, torch.from_numpy(i[keep].astype(np.int64))] = True
        return relevant, hidden & ~relevant

    @torch.no_grad()
    def evaluate(self, split: str, encode: Encoder) -> tuple[dict[str, float], dict[str, float]]:
        """(model metrics, most-popular metrics) over every user with positives in `split`.
        A collective: every rank must call it."""
        users = np.unique(self.positives[split][0])
        mine = users[self.rank :: self.world_size]
        per_rank = -(-len(users) // self.world_size)
        user_rows = self.users.filter(pc.is_in(self.users[self.user_feature], pa.array(mine)))
        user_rows = user_rows.take(pc.sort_indices(user_rows[self.user_feature]))
        mine = user_rows[self.user_feature].to_numpy()  # users without a users.parquet row drop out

        # The catalogue's item vectors (every rank, the same batches), then this rank's user vectors.
        catalogue = torch.full((self.num_items,), float("-inf"), device=self.device)
        vectors = None
        item_batches = _batches(self.items, self.schema, self.batch_size, -(-self.items.num_rows // self.batch_size))
        done = 0
        for batch in item_batches:
            _, v, _, item_bias = encode(batch.to(self.device))
            n = int((batch.weights > 0).sum())
            ids = self.item_ids[done : done + n].to(self.device)
            if vectors is None:
                vectors = torch.zeros(self.num_items, v.shape[1], device=self.device)
            vectors[ids] = v[:n].float()
            catalogue[ids] = item_bias[:n].float()
            done += n
        user_vectors = []
        for batch in _batches(user_rows, self.schema, self.batch_size, -(-per_rank // self.batch_size)):
            u = encode(batch.to(self.device))[0]
            user_vectors.append(u[: int((batch.weights > 0).sum())].float())
        users_u = torch.cat(user_vectors)
        popularity = self.popularity.to(self.device).masked_fill(catalogue.isinf(), float("-inf"))

        names = list(top_k_metrics(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), self.ks))
        names += [f"popularity_lift@{k}" for k in self.ks] + [f"diversity@{k}" for k in self.diverse_ks]
        features = self.features.to(self.device) if self.features is not None else None
        totals = torch.zeros(
            2, len(names) + 1, dtype=torch.float64, device=self.device
        )  # (model, popular) x (metrics, users)
        shown = torch.zeros(2, len(self.ks), self.num_items, device=self.device)  # items in someone's top K
        in_catalogue = ~catalogue.isinf()
        mean_popularity = self.popularity.to(self.device)[in_catalogue].mean().clamp(min=1e-12)
        chunk = max(1, 2**24 // self.num_items)
        for start in range(0, len(mine), chunk):
            relevant, hidden = (m.to(self.device) for m in self._relevance(split, mine[start : start + chunk]))
            model_scores = users_u[start : start + chunk] @ vectors.T + catalogue
            for row, scores in enumerate((model_scores, popularity.expand(len(relevant), -1))):
                scores = scores.masked_fill(hidden, float("-inf"))
                metrics = top_k_metrics(scores, relevant, self.ks)
                top = scores.topk(min(max(self.ks), self.num_items), dim=1).indices
                for i, k in enumerate(self.ks):  # how popular, and how many distinct, the items shown are
                    metrics[f"popularity_lift@{k}"] = (
                        self.popularity.to(self.device)[top[:, :k]].mean(dim=1) / mean_popularity
                    )
                    shown[row, i, top[:, :k].flatten()] = 1
                for k in self.diverse_ks:
                    metrics[f"diversity@{k}"] = intra_list_diversity(features, top[:, :k])
                totals[row, :-1] += torch.stack([metrics[name].sum() for name in names]).double()
                totals[row, -1] += len(relevant)
        if dist.is_initialized():
            dist.all_reduce(totals)
            dist.all_reduce(shown, op=dist.ReduceOp.MAX)
        results = [
            {name: (totals[row, j] / totals[row, -1].clamp(min=1)).item() for j, name in enumerate(names)}
            for row in (0, 1)
        ]
        for row in (0, 1):  # catalogue coverage: the share of the catalogue that some user is shown
            for i, k in enumerate(self.ks):
                results[row][f"coverage@{k}"] = (shown[row, i] * in_catalogue).sum().item() / max(
                    int(in_catalogue.sum()), 1
                )
        return results[0], results[1]
