"""training.mixed_precision = bf16: a training step's MLPs run in bfloat16, the loss and outputs come
back fp32, evaluation runs fp32, and a real 2-rank run still learns."""

from types import SimpleNamespace

import torch

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.reader import ParquetBatches
from models import ModelConfig, build_model
from tests.helpers.data import TINY_SPARSE, write_dataset
from tests.helpers.runs import train
from trainer.train import Trainer


def test_bf16_forward_runs_the_mlps_in_bfloat16_and_returns_fp32(tmp_path, tiny_table):
    schema = write_dataset(tmp_path, {"train": [tiny_table]}, TINY_SPARSE, ["d0", "d1"])
    (batch,) = list(ParquetBatches(schema, "train", batch_size=5))
    model = build_model(
        ModelConfig(embedding_dim=4, dense_arch_layer_sizes=[8, 4]), schema, torch.device("cpu"), torch.device("cpu")
    )
    seen = []
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(training=SimpleNamespace(mixed_precision="bf16")),
        env=SimpleNamespace(device=torch.device("cpu"), rank=0),
        state=SimpleNamespace(step=0),
        model=model,
    )
    loss, (detached, logits, labels, weights) = Trainer._forward(trainer, batch)
    assert seen and set(seen) == {torch.bfloat16}
    assert loss.dtype == detached.dtype == logits.dtype == torch.float32
    loss.backward()  # outside autocast, as the pipeline calls it
    assert all(p.grad is not None for p in model.model.dense_arch.parameters())
    seen.clear()
    model.eval()  # validation and test score in fp32, as the exported model serves
    Trainer._forward(trainer, batch)
    assert seen and set(seen) == {torch.float32}


def test_bf16_training_on_two_ranks_learns(tmp_path):
    data = prepare_synthetic(SyntheticSpec(rows=60_000), tmp_path / "data", log=lambda *_: None)
    summary = train(data.root, tmp_path / "run", *"--config configs/demo.toml --training.mixed_precision bf16".split())
    assert summary["test"]["auc"] > summary["oracle_auc"] - 0.1, summary
