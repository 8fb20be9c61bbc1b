"""An L2 penalty on the embeddings a training batch looks up, added to the loss.

Why not the tables' own weight decay: fbgemm's fused CPU kernels ignore it (measured with
rowwise Adagrad, WeightDecayMode.L2, fbgemm-gpu-cpu 1.8), so a run would regularise on a GPU and
not on a laptop. A term in the loss goes through the same fused backward on every device and
every sharding type.

The penalty is `weight x the batch mean of each row's squared embedding norm` (every table's
pooled output, the wide part's weights included): a row's gradient is `2 x weight x its vector`
each time a batch holds it, so often-seen ids are pulled as hard as their data pushes, and rare
ids, whose few examples would otherwise fit noise, stay near zero: the frequency-weighted L2 of
regularised logistic regression on one-hot features.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_modules import EmbeddingBagCollection

COLLECTIONS = (EmbeddingBagCollection, ShardedEmbeddingBagCollection)


class EmbeddingL2:
    """Collects the pooled embeddings of every collection under a module during training
    forwards (a forward hook), and turns them into the penalty once the model's forward is done.

    Attach after sharding (DMP replaces the collections, and their hooks with them)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.outputs: list = []

    def attach(self, module: nn.Module) -> int:
        """Hook every embedding collection under `module`; returns how many."""
        hooked = 0
        for child in module.modules():
            if isinstance(child, COLLECTIONS):
                child.register_forward_hook(self._keep)
                hooked += 1
        return hooked

    def _keep(self, module, inputs, output) -> None:
        if torch.is_grad_enabled() and module.training:  # evaluation keeps nothing
            self.outputs.append(output)

    def take(self, rows: int) -> torch.Tensor:
        """The penalty of the outputs kept since the last call, averaged over `rows`."""
        # an output may be a sharded collection's awaitable: .values() waits for it (by now it is done)
        total = sum(output.values().float().pow(2).sum() for output in self.outputs)
        self.outputs.clear()
        return self.weight * total / max(rows, 1)


def penalise(wrapper: nn.Module, weight: float) -> int:
    """Give a (sharded) training wrapper (models.losses.Penalised) the penalty `weight` over every
    collection under it; returns how many collections were hooked."""
    wrapper.embedding_l2 = EmbeddingL2(weight)
    return wrapper.embedding_l2.attach(wrapper)
