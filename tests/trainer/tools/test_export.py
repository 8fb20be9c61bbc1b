"""`recsys export` of a sharded checkpoint scores like the sharded model it came from, for every
registered model: 2 gloo ranks shard the model table-wise with random weights, score a batch and
save a real checkpoint (the Checkpointer); `export()` writes the unsharded model file and
`load_model_file` (what `recsys predict` and `recsys evaluate` load) gives the same outputs on
each rank's batch, on the CPU, without torch.distributed.

It guards the models against depending on the sharding plan too: a sharded EmbeddingBagCollection
returns its features in the plan's order, so a model that reads `.values()` of it positionally
would feed its MLP other columns under another plan, another world size, or unsharded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.reader import ParquetBatches
from data_pipeline.schema import DatasetSchema
from models import MODELS, build_model
from tests.helpers.data import synthetic
from tests.helpers.dist import copy_state_dict, run_ranks
from tests.helpers.models import small_config
from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.distributed import DistEnv, plan_sharding, shard_model
from trainer.headline import headline
from trainer.optim import apply_sparse_optimizer, build_optimizer
from trainer.state import BestValidation, DataOrder, TrainState
from trainer.tools.export import MODEL_FORMAT, export, load_model_file

pytestmark = pytest.mark.slow

BATCH = 256


def _batch(schema: DatasetSchema, rank: int, world_size: int):
    return next(iter(ParquetBatches(schema, "test", BATCH, rank=rank, world_size=world_size)))


def _save_sharded(env: DistEnv, data: str, out: str) -> None:
    """Every model sharded with random weights: its scores of this rank's batch, and a checkpoint."""
    schema = DatasetSchema.load(data)
    batch = _batch(schema, env.rank, env.world_size).to(env.device)
    scores = {}
    for name in MODELS:
        cfg = small_config(name, Path(out) / name)
        torch.manual_seed(0)
        reference = build_model(cfg.model, schema, torch.device("cpu"), torch.device("cpu"))
        for p in reference.parameters():  # the linear tables start at 0: give every weight a value
            torch.nn.init.uniform_(p.data, -0.5, 0.5)
        model = build_model(cfg.model, schema, env.device, torch.device("meta"))
        apply_sparse_optimizer(model, "rowwise_adagrad", 0.05, 1e-8)
        dmp = shard_model(model, env, plan_sharding(model, env, BATCH, cfg.sharding))
        copy_state_dict(dmp.state_dict(), reference.state_dict())
        dmp.eval()
        with torch.no_grad():
            scores[name] = dmp(batch)[1][1].cpu()
        parts = {
            "train": TrainState(DataOrder(env.world_size, BATCH, 0, 0), step=3),
            "best": BestValidation(headline(schema.task)),
        }
        Checkpointer(cfg, env, dmp, build_optimizer(dmp, "adam", 1e-3, 1e-8), schema, parts).save(3)
    torch.save(scores, Path(out) / f"scores-rank{env.rank}.pt")


def test_exported_model_scores_like_the_sharded_one(tmp_path):
    schema = synthetic(tmp_path / "data")
    run_ranks(_save_sharded, 2, data=str(schema.root), out=str(tmp_path))
    for name in MODELS:
        blob = export(tmp_path / name, tmp_path / f"{name}.pt")  # the run directory: its latest checkpoint
        assert blob["format"] == MODEL_FORMAT and blob["step"] == 3 and blob["headline"] == "auc"
        model, cfg, trained, _ = load_model_file(tmp_path / f"{name}.pt")
        assert cfg.model.name == name and trained.sparse_names == schema.sparse_names
        for rank in range(2):
            sharded = torch.load(tmp_path / f"scores-rank{rank}.pt", weights_only=True)[name]
            with torch.no_grad():
                unsharded = model(_batch(schema, rank, 2))[1][1]
            assert unsharded.std() > 0.1, name  # the outputs do depend on the weights
            # fbgemm's pooled lookups and torch's EmbeddingBag sum in other orders: fp32 rounding apart
            torch.testing.assert_close(
                sharded,
                unsharded,
                rtol=1e-4,
                atol=1e-4,
                msg=lambda m, n=name, r=rank: f"{n}, rank {r}: {m}",
            )


def test_export_refuses_a_best_that_was_not_recorded(tmp_path):
    """--best of a checkpoint whose run never validated is a clear error, not a guess."""
    schema = synthetic(tmp_path / "data", rows=4000)
    run_ranks(_save_sharded, 1, data=str(schema.root), out=str(tmp_path))

    with pytest.raises(CheckpointError, match="no validation has been recorded"):
        export(tmp_path / "dlrm", tmp_path / "best.pt", best=True)
