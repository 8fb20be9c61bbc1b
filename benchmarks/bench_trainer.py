"""Trainer throughput against the minimal TorchRec loop, the loader, scaling and memory per rank.

    python benchmarks/bench_trainer.py            # ~6 min: world sizes 1 and 2, plus the big-table run
    python benchmarks/bench_trainer.py --quick    # ~3 min: fewer steps, no big-table run
    python benchmarks/bench_trainer.py --config configs/demo.toml --global-batch 512 --warmup 100 --steps 400 \
        --big-table-rows 0 --data.num_workers 0     # any --section.key VALUE overrides the trainer config

Model: DLRM at MLPerf's MLP sizes (`configs/bench_dlrm.toml`: bottom 512-256-128, top
1024-1024-512-256-1, embedding dim 128) over the synthetic generator's 26 tables (10 to 100k rows),
the same global batch at every world size (`data.batch_size` = global batch / world size).

Each world size is one torchrun job; on every rank it runs, in this order (symmetric, so a drift of
the shared machine's speed during the job hits every side alike):

  trainer   `Trainer(cfg, env, schema).run()`, what `recsys train` runs: Parquet through the loader
            workers, TrainPipelineSparseDist, learning-rate schedule, table statistics, loss and
            memory logging, TensorBoard, progress bar, and at the end the valid and test
            evaluations (outside the timed steps, as in the summary's samples/s). Checkpoints off.
  minimal   the loop torchrec's examples use: the same DMP model and optimizer
            (`trainer.build.build_sharded`), the same batches read into memory beforehand, then
            `pipeline.progress(batches)` and nothing else.
  streamed  the minimal loop fed live by the trainer's train loader: what reading Parquet costs.
  minimal, trainer   again.

Throughput is samples/s (global) over the steps after the first `--warmup` (the trainer's logged
windows, the loop's own clock), averaged over the two runs of each. Then `loader`: the trainer's
train loader alone on every rank at once, batches drawn and dropped: the rate the data could be
fed at (the target is >= 3x what the trainer consumes). Memory: peak RSS per rank after the first
trainer run (the process's first large allocation) against the RSS before the model existed and the
planner's estimate of the rank's tables (their shards, optimizer state and lookup buffers). The
loader's worker processes are not in a rank's RSS (`benchmarks/bench_reader.py` measures them).

The big-table run (skipped by --quick) declares one table of `--big-table-rows` rows (2 GB at dim
128; the data's ids use a few of them, as hashed ids would) and gives each of 2 ranks a host
budget (`sharding.ddr_cap_gb`) below that table's size, so the planner must split it; it trains
`--steps` steps and reports the plan and the memory of each rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "bench_dlrm.toml"
BIG_TABLE = "cat_0"


# ---- parent: data, one torchrun job per world size, the tables -----------------------------------


def dataset(root: Path, rows: int) -> Path:
    from data_pipeline.prepare.synthetic import SyntheticSpec
    from data_pipeline.prepare.synthetic import prepare as prepare_synthetic

    out = root / f"synthetic-{rows}"
    prepare_synthetic(SyntheticSpec(rows=rows), out, overwrite=True, log=lambda line: print(line, flush=True))
    return out


def big_table_dataset(src: Path, rows: int) -> Path:
    """`src` with table `BIG_TABLE` declared `rows` rows long: the same files (linked), a bigger id space."""
    from data_pipeline.schema import DatasetSchema

    out = src.parent / f"{src.name}-{BIG_TABLE}-{rows}"
    out.mkdir(exist_ok=True)
    schema = DatasetSchema.load(src)
    for split in schema.splits.values():
        link = out / split.path
        if not link.exists():
            link.symlink_to(src.resolve() / split.path)
    schema.root = out
    schema.sparse = [dataclasses.replace(f, num_embeddings=rows) if f.name == BIG_TABLE else f for f in schema.sparse]
    schema.save()
    return out


def run_job(world: int, args: argparse.Namespace, data: Path, name: str, order: str, extra: list[str]) -> dict:
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        __file__,
        "worker",
        "--data",
        str(data),
        "--out",
        str(out),
        "--global-batch",
        str(args.global_batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--config",
        args.config,
        "--order",
        order,
        "--loader-batches",
        str(args.loader_batches if "minimal" in order else 0),
        "--",
        *args.overrides,
        *extra,
    ]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(out / "job.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"[{name}] failed (exit {rc}); see {out / 'job.log'}:\n" + (out / "job.log").read_text()[-3000:])
    result = json.loads((out / "result.json").read_text())
    print(f"[{name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(results: dict[int, dict], big: dict | None, args: argparse.Namespace) -> str:
    lines = [
        f"machine: {platform.machine()} {os.cpu_count()} cores ({_cpu_model()}), torch {_versions()}",
        f"config: {Path(args.config).name}; global batch {args.global_batch}; "
        f"{args.steps} timed steps after {args.warmup} warmup steps",
        "",
        "| world | batch/rank | threads/rank | minimal loop samples/s | minimal loop fed by the loader "
        "| trainer samples/s | trainer / minimal |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for world, r in results.items():
        m, t = mean(r["minimal"]), mean(r["trainer"])
        spread = f" ({', '.join(f'{x:,.0f}' for x in r['minimal'])} / {', '.join(f'{x:,.0f}' for x in r['trainer'])})"
        streamed = f"{mean(r['streamed']):,.0f}" if r.get("streamed") else ""
        lines.append(
            f"| {world} | {args.global_batch // world} | {r['threads']} | {m:,.0f} | {streamed} | {t:,.0f} "
            f"| **{t / m:.3f}**{spread} |"
        )
    lines += [
        "",
        "Same training on both sides: the mean loss of every logged window, trainer against minimal loop, "
        "differs by at most " + ", ".join(f"{loss_gap(r):.1e} (world {w})" for w, r in results.items()) + ".",
    ]
    lines += [
        "",
        "| world | trainer samples/s per rank | loader alone samples/s per rank (min over ranks) | loader / trainer | "
        "scaling vs world 1 (minimal, trainer) |",
        "|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(results.values()))
    for world, r in results.items():
        per_rank = mean(r["trainer"]) / world
        loader = min(r["loader_per_rank"])
        scaling = (
            f"{mean(r['minimal']) / mean(first['minimal']):.2f}x, {mean(r['trainer']) / mean(first['trainer']):.2f}x"
        )
        lines.append(f"| {world} | {per_rank:,.0f} | {loader:,.0f} | **{loader / per_rank:.1f}x** | {scaling} |")
    lines += [
        "",
        "| run | rank | RSS before model GB | peak RSS while training GB (max over ranks) | peak RSS GB "
        "(with valid/test) | peak - before | tables + optimizer state allocated GB | planner estimate GB (host) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = [(f"world {w}", r) for w, r in results.items()] + ([("big table", big)] if big else [])
    for name, r in runs:
        for rank, (base, peak, tables) in enumerate(zip(r["rss_base_gb"], r["peak_rss_gb"], r["table_gb"])):
            estimate = r["estimate"][rank]["ddr_gb"] if r["estimate"] else float("nan")
            training = r.get("train_peak_rss_gb_max") or float("nan")
            lines.append(
                f"| {name} | {rank} | {base:.2f} | {training:.2f} | {peak:.2f} | {peak - base:.2f} "
                f"| {tables:.3f} | {estimate:.3f} |"
            )
    if big:
        lines += [
            "",
            f"big table: {BIG_TABLE} declared {args.big_table_rows:,} rows x {args.embedding_dim} "
            f"({args.big_table_rows * args.embedding_dim * 4 / 1e9:.2f} GB of weights), "
            f"sharding.ddr_cap_gb {args.big_table_cap_gb} per rank; trained {mean(big['trainer']):,.0f} samples/s; "
            f"plan of {BIG_TABLE}: {big['plan']['t_' + BIG_TABLE]}",
        ]
    return "\n".join(lines)


def loss_gap(result: dict) -> float:
    """The largest difference between any trainer run's and any minimal (or streamed) run's window losses."""
    others = result["losses"]["minimal"] + result["losses"].get("streamed", [])
    return max(abs(a - b) for t in result["losses"]["trainer"] for m in others for a, b in zip(t, m, strict=True))


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _versions() -> str:
    import torch

    return torch.__version__


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 timed steps, no big-table run")
    parser.add_argument("--rows", type=int, default=400_000, help="synthetic rows (80%% train)")
    parser.add_argument("--config", default=str(CONFIG), help="the trainer config (model, optimizers, log_every)")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing starts (a multiple of log_every)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (a multiple of log_every, 20)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loader-batches", type=int, default=100, help="batches per rank for the loader-alone rate")
    parser.add_argument("--big-table-rows", type=int, default=4_000_000, help="0: skip the big-table run")
    parser.add_argument("--big-table-cap-gb", type=float, default=1.6, help="host budget per rank in the big-table run")
    parser.add_argument(
        "--data-dir", default=str(ROOT / "data" / "bench_trainer"), help="where the datasets are cached"
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_trainer"))
    args, overrides = parser.parse_known_args(argv)
    if overrides and not (overrides[0].startswith("--") and "." in overrides[0]):
        parser.error(f"unknown arguments {overrides}; config overrides are --section.key VALUE")
    args.overrides = overrides
    if args.quick:
        args.steps, args.big_table_rows, args.loader_batches = 40, 0, 60
    with open(args.config, "rb") as f:
        toml = tomllib.load(f)
    log_every = toml.get("training", {}).get("log_every", 50)
    args.embedding_dim = toml.get("model", {}).get("embedding_dim", 16)
    per_epoch = int(args.rows * 0.8) // args.global_batch  # the generator's train share
    if args.warmup % log_every or args.steps % log_every or per_epoch < args.warmup + args.steps + 4:
        parser.error(
            f"--warmup and --steps must be multiples of training.log_every ({log_every}) and fit in one "
            f"epoch of {per_epoch} batches (--rows {args.rows}, --global-batch {args.global_batch})"
        )
    data = dataset(Path(args.data_dir), args.rows)
    results = {
        w: run_job(w, args, data, f"world{w}", "trainer,minimal,streamed,minimal,trainer", []) for w in args.worlds
    }
    big = None
    if args.big_table_rows:
        big = run_job(
            2,
            args,
            big_table_dataset(data, args.big_table_rows),
            "big_table",
            "trainer",
            ["--sharding.ddr_cap_gb", str(args.big_table_cap_gb), "--sharding.min_partition", "64"],
        )
    text = report(results, big, args)
    (Path(args.out) / "results.md").write_text(text + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"worlds": results, "big_table": big}, indent=1) + "\n")
    print("\n" + text)
    return 0


# ---- worker: one rank of a torchrun job ----------------------------------------------------------


def _rss_now_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def epoch_loader(cfg, env, schema):
    """This rank's train loader at epoch 0: the batches the trainer's first epoch starts with."""
    from trainer.build import train_loader

    loader = train_loader(cfg, env, schema)
    loader.set_epoch(0)
    return loader


def trainer_run(cfg, env, schema, run_dir: Path, warmup: int) -> dict:
    """One Trainer run: its summary, this rank's table bytes, and (rank 0 only, from its log) the
    samples/s over the logged windows after `warmup` steps, the mean loss of every logged window
    and the peak RSS over training (the last memory record, before the evaluations)."""
    import torch.distributed as dist

    from trainer.observe import peak_rss_gb
    from trainer.train import Trainer

    if env.is_main and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: its log appends to an old metrics.jsonl otherwise
    dist.barrier()
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    trainer = Trainer(cfg, env, schema)
    run = {"table_bytes": table_bytes(trainer.model, trainer.optimizer), "rate": 0.0, "losses": [], "train_peak": None}
    run["summary"] = trainer.run()
    run["peak"] = peak_rss_gb()
    del trainer
    if not env.is_main:
        return run
    every, seconds, samples = cfg.training.log_every, 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["phase"] == "memory":
            run["train_peak"] = record["peak_rss_gb_max"]
        if record["phase"] == "train":
            run["losses"].append(record["loss"])
            if record["step"] - every >= warmup:
                window = every * cfg.data.batch_size * env.world_size
                samples, seconds = samples + window, seconds + window / record["samples_per_s"]
    run["rate"] = samples / seconds
    return run


def minimal_rate(cfg, env, schema, batches, warmup: int, steps: int) -> tuple[float, list[float]]:
    """The same model and batches through torchrec's pipeline, nothing else: (samples/s (global)
    after `warmup` steps, the mean loss over ranks of every log_every steps, read after the
    clock stops, to check that both loops trained the same thing)."""
    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from trainer.build import build_sharded

    torch.manual_seed(cfg.training.seed)
    model, optimizer, _, _ = build_sharded(cfg, env, schema)
    model.train()
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    feed = iter(batches)
    losses = []
    for _ in range(warmup):
        losses.append(pipeline.progress(feed)[0].detach())
    _sync(env.device)
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(pipeline.progress(feed)[0].detach())
    _sync(env.device)
    rate = steps * cfg.data.batch_size * env.world_size / (time.perf_counter() - start)
    every = cfg.training.log_every
    means = torch.stack(losses).float().view(-1, every).mean(1)
    dist.all_reduce(means)
    return rate, (means / env.world_size).tolist()


def table_bytes(model, optimizer) -> int:
    """Bytes of this rank's embedding table shards and their (fused) optimizer state: what the
    planner's storage estimate covers besides the lookup buffers."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from trainer.distributed import local_state_tensors

    def local(value) -> int:
        if isinstance(value, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
        if isinstance(value, dict):
            return sum(local(v) for v in value.values())
        return 0  # plain tensors are the data-parallel dense part

    weights = sum(t.numel() * t.element_size() for k, t in local_state_tensors(model).items() if "#" in k)
    return weights + local(optimizer.state_dict()["state"])


def loader_rate(cfg, env, schema, count: int) -> float:
    """Rows/s of this rank's train loader alone (all ranks at once), after its first batch."""
    import torch.distributed as dist

    loader = epoch_loader(cfg, env, schema)
    count = min(count, len(loader) - 1)
    dist.barrier()
    batches = iter(loader)
    next(batches)  # the workers' start
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    rate = count * cfg.data.batch_size / (time.perf_counter() - start)
    batches.close()
    return rate


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--order", required=True)
    parser.add_argument("--loader-batches", type=int, required=True)
    args, overrides = parser.parse_known_args(argv)
    overrides = [a for a in overrides if a != "--"]

    import itertools

    import torch
    import torch.distributed as dist

    from data_pipeline.schema import DatasetSchema
    from trainer.config import load_config
    from trainer.distributed import init_distributed

    env = init_distributed()
    schema = DatasetSchema.load(args.data)
    total = args.warmup + args.steps
    cfg = load_config(
        [
            "--config",
            args.config,
            "--data",
            args.data,
            "--data.batch_size",
            str(args.global_batch // env.world_size),
            "--training.max_steps",
            str(total),
            *overrides,
        ]
    )
    if cfg.training.mixed_precision == "auto":  # the minimal loop runs fp32: compare at one precision
        cfg.training.mixed_precision = "fp32"
    if cfg.training.threads:  # as the Trainer does, for the minimal loop too
        torch.set_num_threads(cfg.training.threads)
    rss_base = _rss_now_gb()
    rates = {"trainer": [], "minimal": [], "streamed": []}
    losses = {"trainer": [], "minimal": [], "streamed": []}  # per run: the mean loss of each log_every window
    first = None  # the first trainer run: its memory is the trainer's, not the minimal loop's batches'
    batches = None
    for i, kind in enumerate(args.order.split(",")):
        if kind == "trainer":
            run = trainer_run(cfg, env, schema, Path(args.out) / f"trainer-{i}", args.warmup)
            first = first or run
            rate, window_losses = run["rate"], run["losses"]
        elif kind == "streamed":  # the minimal loop fed by the trainer's loader as it reads: what data loading costs
            rate, window_losses = minimal_rate(
                cfg, env, schema, epoch_loader(cfg, env, schema), args.warmup, args.steps
            )
        else:
            if batches is None:  # the batches the trainer's first epoch starts with, in memory
                batches = list(itertools.islice(iter(epoch_loader(cfg, env, schema)), total + 4))
            rate, window_losses = minimal_rate(cfg, env, schema, batches, args.warmup, args.steps)
        rates[kind].append(rate)
        losses[kind].append(window_losses)
        if env.is_main:
            print(f"[bench] {kind}: {rate:,.0f} samples/s", flush=True)
    loader = loader_rate(cfg, env, schema, args.loader_batches) if args.loader_batches else 0.0

    mine = {
        "rss_base": rss_base,
        "peak": first and first["peak"],
        "loader": loader,
        "table_gb": first["table_bytes"] / 1e9 if first else 0.0,
    }
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if env.is_main:
        summary = first["summary"] if first else {}
        plan = {line.split()[0]: " ".join(line.split()[1:3]) for line in summary.get("sharding_plan", [])}
        result = {
            **rates,
            "losses": losses,
            "threads": torch.get_num_threads(),
            "estimate": summary.get("planner_estimate_per_rank"),
            "plan": plan,
            "train_peak_rss_gb_max": first and first["train_peak"],
            "rss_base_gb": [r["rss_base"] for r in everyone],
            "peak_rss_gb": [r["peak"] for r in everyone],
            "loader_per_rank": [r["loader"] for r in everyone],
            "table_gb": [r["table_gb"] for r in everyone],
        }
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
