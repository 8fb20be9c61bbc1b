"""The torch.export serving program against the same model run eagerly, in one run.

    python benchmarks/bench_serving.py                   # the demo's model (configs/demo.toml), CPU
    python benchmarks/bench_serving.py --model dlrm_dcn --threads 4

Both sides take the same inputs (the contract of docs/serving.md, built once from the test split)
and must give the same predictions; each batch size is timed for `--seconds`, best of `--repeats`.
The ratio is program / eager rows per second: above 1 the export is faster than the code it came
from. Random weights: speed does not depend on training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.reader import ParquetBatches  # noqa: E402
from tests.helpers.data import synthetic  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.defaults import resolve  # noqa: E402
from trainer.tools.export import build_cpu_model  # noqa: E402
from trainer.tools.serving import ServingModel, export_program, load_program  # noqa: E402


def inputs(schema, rows: int) -> tuple:
    batch = next(iter(ParquetBatches(schema, "test", rows, shuffle=False, drop_last=False)))
    columns = batch.sparse.to_dict()
    ids = {k: columns[k].values().clone() for k in schema.sparse_names}
    lengths = {k: columns[k].lengths().clone() for k in schema.sparse_names}
    return batch.dense.clone(), ids, lengths


def rate(fn, args: tuple, rows: int, seconds: float, repeats: int) -> float:
    """Best rows per second over `repeats` windows of `seconds`."""
    for _ in range(3):
        fn(*args)
    best = 0.0
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn(*args)
            calls += 1
        best = max(best, calls * rows / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dlrm")
    parser.add_argument("--batch-sizes", default="1,64,2048")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a serving worker's share of a host)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        schema = synthetic(Path(folder) / "data", rows=max(sizes) * 12, max_vocab=100_000)
        cfg = load_config(["--config", "configs/demo.toml", "--model", args.model, "--data", str(schema.root)])
        resolve(cfg, schema, 1)
        torch.manual_seed(0)
        eager = ServingModel(build_cpu_model(cfg, schema).eval(), schema).eval()
        start = time.perf_counter()
        export_program(eager.trained, schema, Path(folder) / "m.pt2", {"model": args.model})
        took = time.perf_counter() - start
        program, _ = load_program(Path(folder) / "m.pt2")
        size = (Path(folder) / "m.pt2").stat().st_size
        print(f"{args.model}: export {took:.1f} s, {size / 1e6:.1f} MB; {args.threads} thread(s)")
        with torch.no_grad():
            for rows in sizes:
                batch = inputs(schema, rows)
                torch.testing.assert_close(program(*batch)["prediction"], eager(*batch)["prediction"])
                fast = rate(program, batch, rows, args.seconds, args.repeats)
                slow = rate(eager, batch, rows, args.seconds, args.repeats)
                print(
                    f"  batch {rows:>5}: program {fast:>10,.0f} rows/s  eager {slow:>10,.0f} rows/s  "
                    f"program / eager: {fast / slow:.2f}"
                )


if __name__ == "__main__":
    main()
