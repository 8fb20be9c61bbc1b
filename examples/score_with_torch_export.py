"""Score a Parquet split with a `recsys export --format torch-export` program, using only torch and
pyarrow: what a serving process or a batch job outside this repository does.

    python score_with_torch_export.py models/demo.pt2 data/synthetic/test scores.parquet

The program's inputs are the prepared dataset's columns (docs/serving.md): dense float32 [B, D] in
the contract's order (nulls as 0.0, as the trainer reads them); per sparse feature, its ids back to
back (int64) and each row's count of them (a null single id is a row with none).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


def model_inputs(table: pa.Table, contract: dict) -> tuple:
    """(dense, ids, lengths) of every row of `table`, as the program takes them."""
    dense = [pc.fill_null(table[c], 0).to_numpy().astype(np.float32) for c in contract["dense"]]
    dense = torch.from_numpy(np.stack(dense, 1)) if dense else torch.zeros(len(table), 0)
    ids, lengths = {}, {}
    for feature in contract["sparse"]:
        column = table[feature["name"]].combine_chunks()
        if feature["multi_hot"]:  # list<int64>: a null list has no ids
            counts, values = pc.fill_null(pc.list_value_length(column), 0), pc.list_flatten(column)
        else:  # one id per row; a null is a row without one
            counts, values = pc.cast(column.is_valid(), pa.int32()), column.drop_null()
        lengths[feature["name"]] = torch.from_numpy(counts.to_numpy().astype(np.int32))
        ids[feature["name"]] = torch.from_numpy(values.to_numpy().astype(np.int64))
    return dense, ids, lengths


def main(program_file: str, split_dir: str, out: str, batch_size: int = 4096) -> None:
    extra = {"recsys.json": ""}
    model = torch.export.load(program_file, extra_files=extra).module()
    contract = json.loads(extra["recsys.json"])
    root = Path(split_dir)  # every *.parquet below, in path order; names starting with _ or . left out
    files = sorted(p for p in root.rglob("*.parquet") if not any(s[0] in "_." for s in p.relative_to(root).parts))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    outputs = {name: [] for name in contract["outputs"]}
    with torch.no_grad():
        for start in range(0, len(table), batch_size):
            scored = model(*model_inputs(table.slice(start, batch_size), contract))
            for name in outputs:
                outputs[name].append(scored[name].numpy())
    pq.write_table(pa.table({name: np.concatenate(parts) for name, parts in outputs.items()}), out)
    print(f"scored {len(table):,} rows of {split_dir} with {program_file} ({contract['model']}) -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
