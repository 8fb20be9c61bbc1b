"""A serving artifact: the unsharded model as a `torch.export` program that loads without this
repository (or torchrec: the graph holds only aten ops) and scores like `recsys predict`.

    recsys export runs/demo --format torch-export --out models/demo.pt2

    program = torch.export.load("models/demo.pt2", extra_files={"recsys.json": ""})
    outputs = program.module()(dense, ids, lengths)      # any batch size B >= 1

Inputs, the prepared dataset's columns (the contract is also in the file, as `recsys.json`):
- `dense`: float32 [B, D], the dataset's dense columns in `contract["dense"]` order (D may be 0);
- `ids`: {feature: int64 [N_f]}, every row's ids of that sparse feature back to back, in row order;
- `lengths`: {feature: int32 or int64 [B]}, how many of `ids[feature]` each row has (0 where the
  value is missing; 1 for a single-id column), so `lengths[feature].sum() == len(ids[feature])`.
  Every sparse feature of `contract["sparse"]` is given, ids in [0, num_embeddings).
Outputs: {"prediction": float32 [B]} (a probability for binary tasks, the value clipped to the label
range for regression) and, for binary tasks, "logit": float32 [B], as in a predictions file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data_pipeline.atomic import write_atomic
from data_pipeline.schema import DatasetSchema
from trainer.tools.export import to_prediction

PROGRAM_FORMAT = "recsys-trainer torch-export"
PROGRAM_VERSION = 1
CONTRACT_FILE = "recsys.json"
"""The name of the input contract inside the .pt2 archive (`torch.export.load(extra_files=...)`)."""


class ServingModel(nn.Module):
    """A training wrapper (`RankingModel`, `InBatchSoftmax`) as plain tensors in, predictions out:
    the KeyedJaggedTensor is built inside, so a caller needs no torchrec."""

    def __init__(self, trained: nn.Module, schema: DatasetSchema) -> None:
        super().__init__()
        self.trained = trained
        self.keys = [f.name for f in schema.sparse]
        self.schema = schema

    def _keyed_jagged(
        self, ids: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor], rows: int
    ) -> KeyedJaggedTensor:
        """The KJT of the inputs, built in a handful of aten ops whatever the number of features.

        Each key's id count is its tensor's size and its JaggedTensor (with offsets) is given, so
        the exported graph has no data-dependent splitting (`KeyedJaggedTensor.to_dict` would add
        about a thousand symbolic-size nodes, each a cost on every call) and no fbgemm op (torchrec
        computes offsets with one, which a process without fbgemm could not load)."""
        values = torch.cat([ids[key] for key in self.keys]).long()
        counts = torch.cat([lengths[key] for key in self.keys]).int()
        per_key = counts.view(len(self.keys), rows)
        offsets = F.pad(torch.cumsum(per_key, 1, dtype=torch.int32), (1, 0))
        sizes = [ids[key].shape[0] for key in self.keys]
        torch._assert_async(
            (offsets[:, -1] == torch.tensor(sizes, dtype=torch.int32)).all(),
            "each feature's lengths must sum to the number of its ids",
        )
        keyed = {
            key: JaggedTensor(values=key_values, lengths=key_lengths, offsets=key_offsets)
            for key, key_values, key_lengths, key_offsets in zip(
                self.keys, values.split(sizes), per_key.unbind(0), offsets.unbind(0), strict=True
            )
        }
        return KeyedJaggedTensor(
            keys=self.keys, values=values, lengths=counts, stride=rows, length_per_key=sizes, jt_dict=keyed
        )

    def forward(
        self, dense: torch.Tensor, ids: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        score = self.trained.scores(dense, self._keyed_jagged(ids, lengths, dense.shape[0])).float()
        prediction = to_prediction(self.schema, score)  # the rule recsys predict applies
        if self.schema.task == "binary":
            return {"prediction": prediction, "logit": score}
        return {"prediction": prediction}


def contract(schema: DatasetSchema, about: dict) -> dict:
    """What a caller needs to build the program's inputs and read its outputs (+ where it came from)."""
    return {
        "format": PROGRAM_FORMAT,
        "version": PROGRAM_VERSION,
        "dense": list(schema.dense),
        "sparse": [
            {"name": f.name, "num_embeddings": f.num_embeddings, "multi_hot": f.multi_hot} for f in schema.sparse
        ],
        "task": schema.task,
        "label_range": list(schema.label_range) if schema.label_range else None,
        "outputs": ["prediction", "logit"] if schema.task == "binary" else ["prediction"],
        **about,
    }


def example_inputs(schema: DatasetSchema, rows: int = 3) -> tuple:
    """Inputs of `rows` rows for tracing. Each feature's id count differs from the batch size (and
    includes an empty row), so the exporter keeps the two as separate dynamic sizes."""
    pattern = torch.tensor([2, 0] + [2] * (rows - 2), dtype=torch.int32)
    dense = torch.zeros(rows, len(schema.dense))
    ids = {f.name: torch.zeros(int(pattern.sum()), dtype=torch.long) for f in schema.sparse}
    lengths = {f.name: pattern.clone() for f in schema.sparse}
    return dense, ids, lengths


class _QuietKJTExport(logging.Filter):
    """torchrec logs that exporting `KeyedJaggedTensor.to_dict` non-strictly is slow: it is, once
    (seconds), at export; the program it leaves has no such cost."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "non-strict torch.export KJT" not in record.getMessage()


def export_program(trained: nn.Module, schema: DatasetSchema, out, about: dict) -> torch.export.ExportedProgram:
    """Export `trained` (on the CPU, eval mode) with a dynamic batch size and write it to `out`
    (a path or URL, atomically) with its input contract inside."""
    serving = ServingModel(trained, schema).eval().requires_grad_(False)  # outputs a caller can .numpy()
    batch = torch.export.Dim("batch", min=1)
    dynamic = (
        {0: batch},
        {f.name: {0: torch.export.Dim(f"ids_{i}", min=0)} for i, f in enumerate(schema.sparse)},
        {f.name: {0: batch} for f in schema.sparse},
    )
    quiet = _QuietKJTExport()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.no_grad():
            program = torch.export.export(serving, example_inputs(schema), dynamic_shapes=dynamic, strict=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    extra = {CONTRACT_FILE: json.dumps(contract(schema, about), indent=1)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: torch.export.save wants a name ending in .pt2
            torch.export.save(program, f, extra_files=extra)

    write_atomic(out, write)
    return program


def load_program(file: str | Path) -> tuple[nn.Module, dict]:
    """(the program's callable module, its contract) of a .pt2 file written by `export_program`.
    `torch.export.load` falls back to plain unpickling for what it cannot read as weights, so load
    only files you trust, as with any pickle."""
    extra = {CONTRACT_FILE: ""}
    program = torch.export.load(str(file), extra_files=extra)
    return program.module(), json.loads(extra[CONTRACT_FILE])
