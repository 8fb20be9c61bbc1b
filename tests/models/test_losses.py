"""The in-batch softmax loss: against a direct computation in one process, and across 2 gloo ranks
(the candidates gathered from both ranks, gradients flowing back to the rank that owns them)."""

import json
import math

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.losses import InBatchSoftmaxLoss, entity_ids
from tests.helpers.dist import run_ranks
from trainer.distributed import DistEnv

NUM_ITEMS = 6
# 8 rows: item id (-1 missing), label, weight. Rows 0 and 3 share item 2 (an accidental hit for
# each other); row 5 is padding; row 6 has no item id.
ITEMS = [2, 0, 4, 2, 1, 3, -1, 5]
LABELS = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
WEIGHTS = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def _kjt(items: list[int]) -> KeyedJaggedTensor:
    present = [i for i in items if i >= 0]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=torch.tensor(present), lengths=torch.tensor([int(i >= 0) for i in items])
    )


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(8, generator=g)


def _reference(user, item, bias, items, labels, weights, counts=None):
    """Direct loop: for each query row, log-softmax over the candidates it may see."""
    losses = []
    for q in range(len(items)):
        if not (labels[q] > 0 and weights[q] > 0 and items[q] >= 0):
            continue
        logits, target = [], None
        for c in range(len(items)):
            if weights[c] == 0 or items[c] < 0 or (items[c] == items[q] and c != q):
                continue
            logit = user[q] @ item[c] + bias[c]
            if counts is not None:
                logit = logit - math.log((counts[items[c]] + 1) / (sum(counts) + len(counts)))
            if c == q:
                target = len(logits)
            logits.append(logit)
        losses.append(-torch.log_softmax(torch.stack(logits), 0)[target])
    return torch.stack(losses).mean()


def test_entity_ids_reads_one_id_per_row_and_minus_one_when_missing():
    assert entity_ids(_kjt(ITEMS), "item").tolist() == ITEMS


def test_loss_is_the_softmax_over_visible_candidates():
    user, item, bias = _inputs()
    loss_fn = InBatchSoftmaxLoss(NUM_ITEMS, "item", logq_correction=False, device=torch.device("cpu"))
    loss = loss_fn(user, item, bias, _kjt(ITEMS), torch.tensor(LABELS), torch.tensor(WEIGHTS))
    torch.testing.assert_close(loss, _reference(user, item, bias, ITEMS, LABELS, WEIGHTS))


def test_logq_correction_uses_the_candidate_counts_seen_in_training():
    user, item, bias = _inputs()
    loss_fn = InBatchSoftmaxLoss(NUM_ITEMS, "item", logq_correction=True, device=torch.device("cpu"))
    loss_fn(user, item, bias, _kjt(ITEMS), torch.tensor(LABELS), torch.tensor(WEIGHTS))  # counts this batch first
    counts = [0] * NUM_ITEMS
    for i, w in zip(ITEMS, WEIGHTS):
        if i >= 0 and w > 0:
            counts[i] += 1
    assert loss_fn.candidate_counts.tolist() == counts
    loss_fn.eval()  # evaluation leaves the counts alone
    loss = loss_fn(user, item, bias, _kjt(ITEMS), torch.tensor(LABELS), torch.tensor(WEIGHTS))
    assert loss_fn.candidate_counts.tolist() == counts
    torch.testing.assert_close(loss, _reference(user, item, bias, ITEMS, LABELS, WEIGHTS, counts))


def test_no_query_gives_zero_loss_with_gradients():
    user, item, bias = (t.requires_grad_() for t in _inputs())
    loss_fn = InBatchSoftmaxLoss(NUM_ITEMS, "item", logq_correction=True, device=torch.device("cpu"))
    loss = loss_fn(user, item, bias, _kjt(ITEMS), torch.zeros(8), torch.tensor(WEIGHTS))
    loss.backward()
    assert loss.item() == 0.0 and user.grad is not None and item.grad is not None


def _rank(env: DistEnv, out: str) -> None:
    rank, device = env.rank, env.device
    user, item, bias = (t[rank * 4 : rank * 4 + 4].to(device).requires_grad_() for t in _inputs())
    rows = slice(rank * 4, rank * 4 + 4)
    loss_fn = InBatchSoftmaxLoss(NUM_ITEMS, "item", logq_correction=True, device=device)
    labels, weights = torch.tensor(LABELS[rows], device=device), torch.tensor(WEIGHTS[rows], device=device)
    loss = loss_fn(user, item, bias, _kjt(ITEMS[rows]).to(device), labels, weights)
    loss.backward()
    result = {
        "loss": loss.item(),
        "counts": loss_fn.candidate_counts.tolist(),
        "user_grad": user.grad.tolist(),
        "item_grad": item.grad.tolist(),
        "bias_grad": bias.grad.tolist(),
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def test_two_ranks_see_each_others_items_and_send_gradients_back(tmp_path):
    run_ranks(_rank, 2, out=str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    # One process, all 8 rows: rank r's loss is the mean over its own queries against all 8 candidates.
    user, item, bias = (t.clone().requires_grad_() for t in _inputs())
    counts = [0] * NUM_ITEMS
    for i, w in zip(ITEMS, WEIGHTS):
        if i >= 0 and w > 0:
            counts[i] += 1
    assert ranks[0]["counts"] == ranks[1]["counts"] == counts  # updated from the gathered ids
    total = 0
    for r in range(2):
        mine = [label if r * 4 <= q < r * 4 + 4 else 0.0 for q, label in enumerate(LABELS)]
        expected = _reference(user, item, bias, ITEMS, mine, WEIGHTS, counts)
        assert abs(ranks[r]["loss"] - expected.item()) < 1e-5
        total = total + expected
    total.backward()  # each rank's backward gets the gradient of both ranks' losses for its rows
    for r in range(2):
        rows = slice(r * 4, r * 4 + 4)
        torch.testing.assert_close(torch.tensor(ranks[r]["user_grad"]), user.grad[rows])
        torch.testing.assert_close(torch.tensor(ranks[r]["item_grad"]), item.grad[rows])
        torch.testing.assert_close(torch.tensor(ranks[r]["bias_grad"]), bias.grad[rows])
