"""training.compile: the dense modules of the sharded model compile (the sharded tables stay
eager) and the compiled model computes what the eager one does."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.dist import run_ranks
from trainer.build import build_sharded
from trainer.config import load_config
from trainer.defaults import resolve


def _compiled_matches_eager(env, root: str) -> None:
    from torchrec.distributed.types import ShardedModule

    from data_pipeline.reader import ParquetBatches
    from data_pipeline.schema import DatasetSchema

    schema = DatasetSchema.load(root)
    models = []
    for compile_ in ("false", "true"):
        cfg = load_config(["--data.path", root, "--derive_defaults", "false", "--training.compile", compile_])
        resolve(cfg, schema, env.world_size)
        torch.manual_seed(0)
        models.append(build_sharded(cfg, env, schema)[0])
    eager, compiled = models
    compiled.load_state_dict(eager.state_dict())
    compiled_names = {n for n, m in compiled.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert any(n.endswith("dense_arch") for n in compiled_names), compiled_names
    assert any(n.endswith("over_arch") for n in compiled_names), compiled_names
    for name in compiled_names:
        assert not any(isinstance(m, ShardedModule) for m in compiled.get_submodule(name).modules()), name
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    outputs = []
    for model in (eager, compiled):
        loss, (_, logits, _, _) = model(batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.module.model.over_arch.parameters()]
        outputs.append((loss.detach(), logits.detach(), grads))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(outputs[0][2], outputs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_dense_modules_compute_what_eager_ones_do(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    run_ranks(_compiled_matches_eager, world_size=1, root=str(schema.root))
