"""The sharding plan past this machine: torchrec's planner, as `recsys train` calls it, for
MLPerf DLRM-DCNv2's Criteo-1TB tables on 8, 64 and 1,024 H100-class GPUs. No GPU needed: the
planner plans for a `Topology` with compute_device "cuda" and the stated memory and bandwidths.

    python benchmarks/plan_at_scale.py                     # 8, 64, 1024 GPUs at MLPerf's global batch
    python benchmarks/plan_at_scale.py --gpus 16 128 --batch-per-rank 8192 --plans

For each world it prints the plan (how many tables of each sharding type and kernel), each rank's
memory as the planner estimates it, the planner's estimated step time of the embeddings split into
compute and communication, the bytes each rank moves per step (input ids to the tables' owners,
pooled embeddings back, their gradients, replicated tables' all-reduce), and the dense part's
step time from its FLOPs at a stated share of the GPU's bf16 peak: which of compute, all-to-all and
input bounds the step. The figures are the planner's GPU-calibrated cost model and arithmetic, not
measurements: they say where the bottleneck moves, not what a cluster will do.

Why the trainer's own code: the plan is `trainer.distributed`'s topology and per-table constraints
over the model `recsys train --model dlrm_dcn` builds (MLPerf's MLP and cross-layer sizes), so
what this prints is what a run on that cluster would be given.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# MLPerf Training DLRM-DCNv2 (facebookresearch/dlrm, torchrec_dlrm/README.MD): the Criteo 1TB
# tables capped at 40M rows, and the multi-hot sizes of its synthetic multi-hot dataset.
TABLE_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
NUM_DENSE, EMBEDDING_DIM = 13, 128
BOTTOM, TOP, DCN_LAYERS, DCN_RANK = [512, 256, 128], [1024, 1024, 512, 256, 1], 3, 512
GLOBAL_BATCH = 65536
"""MLPerf DLRM-DCNv2's reference global batch (per rank: this / GPUs)."""

# H100 SXM (80 GB HBM3, NVLink 4: 900 GB/s both ways, so 450 one way; one 400 Gb/s NDR
# InfiniBand port a GPU: 50 GB/s), 2 TB of host memory a node of 8.
HBM_GB, HOST_GB_PER_RANK, GPUS_PER_HOST = 80.0, 256.0, 8
INTRA_HOST_GBPS, INTER_HOST_GBPS = 450.0, 50.0
BF16_PEAK_TFLOPS, DENSE_EFFICIENCY = 989.0, 0.4
"""Dense time = 6 x dense weights x rows / (peak x efficiency): 6 FLOPs per weight and row for
forward and backward; 40% of the bf16 dense peak is a stated guess for these GEMMs."""
PUBLISHED = {  # GPUs: (global batch, samples/s as logged, training only), NVIDIA H100, MLPerf Training v4.0
    8: (55296, 13.75e6, 15.6e6),  # mlcommons/training_results_v4.0 NVIDIA/results/eos_ngc24.04_merlin_hugectr
    128: (135168, 65.5e6, 73e6),  # .../eos_n16_ngc24.04_merlin_hugectr
}
"""HugeCTR on DGX H100 with its own embedding sharding: the `tracked_stats throughput` of the
dlrm_dcnv2 result logs (evaluation included; the 10 runs log 13.7-13.8M and 65-66M), and the
training-only rate from the same logs (epoch fraction x 4,195,197,692 samples / (run time -
evaluation time)), rounded."""
ELEMENT_BYTES, ID_BYTES = 4, 8
"""fp32 pooled embeddings and gradients (torchrec without quantised comms), int64 ids."""


@dataclass
class WorldPlan:
    gpus: int
    batch_per_rank: int
    kinds: dict[str, int]
    hbm_gb: list[float]
    ddr_gb: list[float]
    compute_ms: float
    comms_ms: float
    step_ms: float
    bytes_per_rank: dict[str, float]
    dense_ms: float
    plan_s: float
    plan_text: str


def pooling(table: str) -> int:
    """Ids a row of table `t_cat_<i>` (the trainer's name for feature cat_<i>)."""
    return MULTI_HOT[int(table.rsplit("_", 1)[1])]


def schema():
    from data_pipeline.schema import DatasetSchema, SparseFeature, SplitInfo

    sparse = [SparseFeature(f"cat_{i}", rows, multi_hot=True) for i, rows in enumerate(TABLE_ROWS)]
    dense = [f"int_{i}" for i in range(NUM_DENSE)]
    return DatasetSchema(Path("criteo-1tb"), "label", dense, sparse, {"train": SplitInfo("train")}, name="criteo-1tb")


def model() -> nn.Module:
    """`recsys train --model dlrm_dcn` at MLPerf's sizes, tables on `meta` as the trainer builds them."""
    from models.config import ModelConfig
    from models.registry import build_model

    cfg = ModelConfig(
        name="dlrm_dcn",
        embedding_dim=EMBEDDING_DIM,
        dense_arch_layer_sizes=BOTTOM,
        over_arch_layer_sizes=TOP,
        dcn_num_layers=DCN_LAYERS,
        dcn_low_rank_dim=DCN_RANK,
    )
    meta = torch.device("meta")
    return build_model(cfg, schema(), meta, meta)


def dense_weights(net: nn.Module) -> int:
    """Weights used once per row by the dense part (everything but the embedding tables)."""
    from torchrec import EmbeddingBagCollection

    tables = {id(p) for m in net.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in tables and p.dim() > 1)


def sharding_config():
    from trainer.config import ShardingConfig

    return ShardingConfig(
        hbm_cap_gb=HBM_GB,
        ddr_cap_gb=HOST_GB_PER_RANK,
        intra_host_bw_gbps=INTRA_HOST_GBPS,
        inter_host_bw_gbps=INTER_HOST_GBPS,
    )


def plan_world(net: nn.Module, gpus: int, batch_per_rank: int) -> WorldPlan:
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.sharding_plan import get_default_sharders

    from trainer.distributed import DistEnv, _estimate_per_rank, describe_plan, table_constraints, topology

    sharding = sharding_config()
    env = DistEnv(0, gpus, 0, min(gpus, GPUS_PER_HOST), torch.device("cuda"), "nccl")
    constraints = {
        name: replace(c, pooling_factors=[float(pooling(name))])
        for name, c in table_constraints(net, sharding, "cuda").items()
    }
    planner = EmbeddingShardingPlanner(
        topology=topology(env, sharding),
        batch_size=batch_per_rank,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(sharding.storage_reserve),
    )
    start = time.monotonic()
    plan = planner.plan(net, get_default_sharders())
    plan_s = time.monotonic() - start
    options = planner._best_plan  # the chosen ShardingOptions: torchrec keeps them only here
    compute, comms = [0.0] * gpus, [0.0] * gpus
    for option in options:
        for shard in option.shards:
            compute[shard.rank] += shard.perf.fwd_compute + shard.perf.bwd_compute + shard.perf.prefetch_compute
            comms[shard.rank] += shard.perf.fwd_comms + shard.perf.bwd_comms
    slowest = max(range(gpus), key=lambda r: compute[r] + comms[r])
    memory = _estimate_per_rank(planner, gpus) or []
    kinds: dict[str, int] = {}
    for option in options:
        key = f"{option.sharding_type}/{option.compute_kernel}"
        kinds[key] = kinds.get(key, 0) + 1
    return WorldPlan(
        gpus=gpus,
        batch_per_rank=batch_per_rank,
        kinds=kinds,
        hbm_gb=[m["hbm_gb"] for m in memory],
        ddr_gb=[m["ddr_gb"] for m in memory],
        compute_ms=compute[slowest],
        comms_ms=comms[slowest],
        step_ms=compute[slowest] + comms[slowest],
        bytes_per_rank=traffic(options, gpus, batch_per_rank),
        dense_ms=6 * dense_weights(net) * batch_per_rank / (BF16_PEAK_TFLOPS * 1e12 * DENSE_EFFICIENCY) * 1e3,
        plan_s=plan_s,
        plan_text=describe_plan(plan),
    )


def traffic(options, gpus: int, batch_per_rank: int) -> dict[str, float]:
    """Bytes a rank sends per training step, averaged over the ranks, by what they carry.

    ids        each row's ids go to every shard that needs them: one owner (table_wise), each
               column shard (column_wise, table_column_wise), the row shard holding them (row_wise,
               table_row_wise); replicated tables read their own;
    pooled     forward: a shard's pooled output for the whole global batch goes to each row's rank
               ((N-1)/N of it leaves); a row shard sends its partial sums (reduce-scatter);
    gradients  backward: the same volume as pooled, the other way;
    allreduce  data_parallel tables: ring all-reduce of the table's gradient, 2 (N-1)/N of it.
    """
    global_batch, away = batch_per_rank * gpus, (gpus - 1) / gpus
    sent = {"ids": 0.0, "pooled": 0.0, "gradients": 0.0, "allreduce": 0.0}
    for option in options:
        rows_in_batch = global_batch * pooling(option.name) * ID_BYTES * away
        if option.sharding_type == "data_parallel":
            sent["allreduce"] += option.num_shards * option.tensor.numel() * ELEMENT_BYTES * 2 * away
            continue
        row_split = option.sharding_type in ("row_wise", "table_row_wise", "grid_shard")
        columns = [s.size[1] for s in option.shards]
        sent["ids"] += rows_in_batch * (1 if row_split else len(columns))
        out = sum(global_batch * c * ELEMENT_BYTES * away for c in columns)
        sent["pooled"] += out
        sent["gradients"] += out
    return {k: v / gpus for k, v in sent.items()}


def samples_per_s(p: WorldPlan) -> float:
    """The pipeline overlaps the dense part with the embeddings' lookups and all-to-alls."""
    return p.batch_per_rank * p.gpus / (max(p.step_ms, p.dense_ms) / 1e3)


def report(plans: list[WorldPlan], reader_rows_per_s: float) -> None:
    net_gb = sum(TABLE_ROWS) * EMBEDDING_DIM * 4 / 1e9
    print(
        f"MLPerf DLRM-DCNv2 tables: {len(TABLE_ROWS)} tables, {sum(TABLE_ROWS) / 1e6:.1f}M rows x {EMBEDDING_DIM} "
        f"= {net_gb:.0f} GB of fp32 weights; {sum(MULTI_HOT)} ids a row. H100: {HBM_GB:g} GB HBM, "
        f"{INTRA_HOST_GBPS:g} GB/s NVLink, {INTER_HOST_GBPS:g} GB/s between hosts a GPU, {GPUS_PER_HOST} a host."
    )
    header = (
        "| GPUs | batch/rank | plan (tables: type/kernel) | HBM/rank GB (max, planner) | embedding step ms "
        "(compute + comms) | sent/rank/step MB (ids, pooled, grads, allreduce) | dense ms | bound | "
        "samples/s (est.) | reader workers/GPU |"
    )
    print(header)
    print("|---:|---:|---|---:|---:|---:|---:|---|---:|---:|")
    for p in plans:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(p.kinds.items(), key=lambda kv: -kv[1]))
        mb = p.bytes_per_rank
        parts = {"embedding compute": p.compute_ms, "embedding comms": p.comms_ms, "dense compute": p.dense_ms}
        rate = samples_per_s(p)
        print(
            f"| {p.gpus:,} | {p.batch_per_rank:,} | {kinds} | {max(p.hbm_gb, default=0):.1f} | "
            f"{p.step_ms:.2f} ({p.compute_ms:.2f} + {p.comms_ms:.2f}) | "
            f"{sum(mb.values()) / 1e6:,.0f} ({mb['ids'] / 1e6:,.0f}, {mb['pooled'] / 1e6:,.0f}, "
            f"{mb['gradients'] / 1e6:,.0f}, {mb['allreduce'] / 1e6:,.0f}) | {p.dense_ms:.2f} | "
            f"{max(parts, key=parts.get)} | {rate / 1e6:,.1f}M | "
            f"{math.ceil(rate / p.gpus / reader_rows_per_s)} |"
        )
    print(
        f"\nsamples/s (est.): global batch / max(embedding step, dense step), the two overlapped as "
        f"TrainPipelineSparseDist does; dense at {DENSE_EFFICIENCY:.0%} of {BF16_PEAK_TFLOPS:g} TFLOPS bf16. "
        f"Reader workers: rows/s each GPU consumes / {reader_rows_per_s:,.0f} rows/s a worker (--reader-rows-per-s)."
    )


def compare(net: nn.Module) -> None:
    """The planner's estimate at NVIDIA's MLPerf batch sizes against their published rates."""
    print(
        "\n| GPUs | global batch | estimate samples/s | NVIDIA MLPerf v4.0 (logged / training only) "
        "| estimate/published |"
    )
    print("|---:|---:|---:|---:|---:|")
    ratios = []
    for gpus, (batch, logged, training) in PUBLISHED.items():
        estimate = samples_per_s(plan_world(net, gpus, batch // gpus))
        ratios.append(f"{estimate / training:.2f} at {gpus} GPUs")
        print(
            f"| {gpus} | {batch:,} | {estimate / 1e6:.1f}M | {logged / 1e6:.1f}M / {training / 1e6:.1f}M | "
            f"{estimate / training:.2f} |"
        )
    print(f"estimate/published (training only): {', '.join(ratios)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 1024])
    parser.add_argument("--batch-per-rank", type=int, default=0, help=f"rows a rank (default: {GLOBAL_BATCH:,} / GPUs)")
    parser.add_argument(
        "--reader-rows-per-s",
        type=float,
        default=600_000,
        help="rows/s one reader worker decodes (default: the low end of bench_reader.py on this VM)",
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the plans at NVIDIA's published settings")
    parser.add_argument("--plans", action="store_true", help="also print each world's table-by-table plan")
    opts = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the planner's own tables and the Topology-factory warning
    net = model()
    plans = []
    for gpus in opts.gpus:
        plan = plan_world(net, gpus, opts.batch_per_rank or max(1, GLOBAL_BATCH // gpus))
        print(f"planned {gpus:,} GPUs in {plan.plan_s:.1f} s", flush=True)
        if opts.plans:
            print(plan.plan_text)
        plans.append(plan)
    report(plans, opts.reader_rows_per_s)
    if not opts.no_compare:
        compare(net)
    return 0


if __name__ == "__main__":
    sys.exit(main())
