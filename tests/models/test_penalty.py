"""The embedding penalty: its value, that it reaches the tables' gradients, and that evaluation
keeps nothing."""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from models.penalty import EmbeddingL2


def _collection() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    config = dict(embedding_dim=4, num_embeddings=10)
    tables = [EmbeddingBagConfig(name=f"t{i}", feature_names=[f"f{i}"], **config) for i in "01"]
    return EmbeddingBagCollection(tables=tables)


def _ids() -> KeyedJaggedTensor:  # 3 rows; f0 holds ids 1, 2, 2; f1 holds 5, (none), 5 and 6
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2, 2, 5, 5, 6]), lengths=torch.tensor([1, 1, 1, 1, 0, 2])
    )


def test_penalty_is_the_weight_times_the_batch_mean_squared_norm_of_the_pooled_lookups():
    ebc = _collection()
    penalty = EmbeddingL2(0.25)
    assert penalty.attach(ebc) == 1
    pooled = ebc(_ids()).values()  # [3 rows, 2 tables x 4]
    value = penalty.take(rows=3)
    torch.testing.assert_close(value, 0.25 * pooled.pow(2).sum() / 3)
    assert penalty.outputs == []  # taken once

    second = EmbeddingL2(0.25)
    second.attach(ebc)
    ebc(_ids())
    second.take(rows=3).backward()
    grads = {name: p.grad for name, p in ebc.named_parameters()}
    t0 = grads["embedding_bags.t0.weight"]
    weights = dict(ebc.named_parameters())["embedding_bags.t0.weight"].detach()
    # id 2 is looked up twice: twice the pull of id 1; an unseen id gets nothing
    torch.testing.assert_close(t0[1], 2 * 0.25 * weights[1] / 3)
    torch.testing.assert_close(t0[2], 2 * 2 * 0.25 * weights[2] / 3)
    assert t0[0].abs().sum() == 0


def test_evaluation_forwards_keep_nothing():
    ebc = _collection()
    penalty = EmbeddingL2(1.0)
    penalty.attach(ebc)
    with torch.no_grad():
        ebc(_ids())
    ebc.eval()
    ebc(_ids())
    assert penalty.outputs == []
