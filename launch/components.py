"""TorchX components: the trainer (and the Criteo preparer) as jobs on any TorchX scheduler.

    # this machine, 2 ranks (the same as `recsys train --nproc-per-node 2`)
    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/demo.toml
    # trainer flags go after `--`, exactly as `python -m trainer` takes them
    torchx run -s local_cwd launch/components.py:train -j 1x2 --config configs/demo.toml -- \
        --data.batch_size 512 --run-dir runs/x
    # 2 nodes x 8 GPUs on Kubernetes (Volcano), or 2 nodes on Slurm; add --dryrun to see the request
    torchx run -s kubernetes -cfg queue=default launch/components.py:train -j 2x8 --gpu 8 \
        --image REPO/recsys-trainer:gpu ...
    torchx run -s slurm -cfg partition=gpu,time=2:00:00 launch/components.py:train -j 2x8 --gpu 8 ...
    # `torchx run launch/components.py:train --help` lists every option

Both components are `torchx.components.dist.ddp` underneath: every replica (node) runs
`torchrun --nnodes N --nproc_per_node M --rdzv_backend c10d -m <module> ...`, and torchrun gives each
process the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR the trainer reads (trainer/distributed.py).
Paths (`--config`, `--data.path`, `--run-dir`) are read on the nodes: relative to the repository for
local_cwd and slurm, to the image's WORKDIR (/app) for local_docker and kubernetes; put the data and
the run directory on storage every node mounts.
"""

# No `from __future__ import annotations` here: torchx reads the parameters' annotations at run
# time to type the command-line options (int, Dict[str, str], ...), and strings would not do.
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

DEFAULT_IMAGE = "recsys-trainer:cpu"
"""What `docker build -f docker/Dockerfile.cpu -t recsys-trainer:cpu .` builds (docker/Dockerfile for GPUs)."""


def train(
    *overrides: str,
    config: str = "",
    j: str = "1x2",
    image: str = DEFAULT_IMAGE,
    name: str = "/trainer",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 16384,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    debug: bool = False,
) -> specs.AppDef:
    """Train a recommendation model (DLRM, DCN-v2, Wide&Deep, DeepFM, two-tower) with the sharded
    TorchRec trainer: `torchrun -m trainer --config CONFIG OVERRIDES` on every node. Trainer flags
    go after `--`, e.g. `-- --data.path /mnt/data/criteo --run-dir /mnt/runs/exp1 --model dlrm_dcn`
    (`python -m trainer --help` lists them). Every process takes `cuda:LOCAL_RANK` with NCCL when
    it sees a GPU, else CPU with gloo. Rank 0 writes the run directory (config.toml, plan.txt,
    metrics.jsonl, tb/, summary.json): give `--run-dir` a path on shared storage.

    Args:
        overrides: trainer flags, `--section.key VALUE` (after `--`); aliases --model, --data, --run-dir
        config: TOML config file the trainer starts from, as seen on the nodes (empty: built-in defaults)
        j: {nnodes}x{nproc_per_node}, or {min_nnodes}:{max_nnodes}x{nproc_per_node} for an elastic job;
            with GPUs, nproc_per_node must not exceed the GPUs per node
        image: container image (local_docker, kubernetes); ignored by local_cwd and slurm
        name: job name as {experimentname}/{runname}, /{runname} or {experimentname}/
        h: a registered named resource (e.g. aws_p4d.24xlarge); takes precedence over cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables, e.g. NCCL_DEBUG=INFO,LOGLEVEL=INFO
        mounts: mounts for the data and the run directory, e.g.
            type=bind,src=/mnt/shared,dst=/mnt/shared or type=volume,src=PVC_NAME,dst=/mnt/shared
            (local_docker, kubernetes; slurm and local_cwd see the host's file systems)
        max_retries: times the job may be restarted after a failure; a restart resumes from the run
            directory's latest checkpoint (checkpoint.resume = auto)
        rdzv_backend: torchrun rendezvous backend (c10d: a store on the first node's rdzv_port)
        rdzv_port: port of the rendezvous store on the first node (multi-node jobs only)
        debug: set PyTorch's debug variables (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    args = (["--config", config] if config else []) + list(overrides)
    return _ddp(
        "trainer",
        args,
        j=j,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        env=env,
        mounts=mounts,
        max_retries=max_retries,
        rdzv_backend=rdzv_backend,
        rdzv_port=rdzv_port,
        debug=debug,
    )


def prepare(
    *args: str,
    j: str = "1x1",
    image: str = DEFAULT_IMAGE,
    name: str = "/prepare-criteo",
    h: Optional[str] = None,
    cpu: int = 16,
    memMB: int = 32768,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Convert Criteo click logs to a Parquet dataset on several nodes: `recsys prepare criteo ARGS`
    on every replica. The replicas share the input units and merge the vocabulary at gloo
    barriers, so the output is the same for any -j; a rerun with the same arguments resumes.
    Put --input and --out on storage every node mounts, e.g.
    `-j 4x1 -- --input '/mnt/criteo/day_*.gz' --test-files 'day_23*' --out /mnt/data/criteo-tb`.

    Args:
        args: `recsys prepare criteo` flags (after `--`); `recsys prepare criteo --help` lists them
        j: {nnodes}x1: replicas, one per node (each uses every core of its node through a process pool)
        image: container image (local_docker, kubernetes); ignored by local_cwd and slurm
        name: job name as {experimentname}/{runname}, /{runname} or {experimentname}/
        h: a registered named resource; takes precedence over cpu and memMB
        cpu: CPUs per node
        memMB: memory per node in MB
        env: extra environment variables, e.g. LOGLEVEL=INFO
        mounts: mounts for the input and output directories, e.g. type=bind,src=/mnt/shared,dst=/mnt/shared
        max_retries: times the scheduler may restart the job (finished units are kept)
        rdzv_port: port of the rendezvous store on the first node (multi-node jobs only)
    """
    if parse_nnodes(j)[2] != 1:
        raise ValueError(f"prepare runs one replica per node (-j NNODESx1); got -j {j}")
    return _ddp(
        "launch.cli",
        ["prepare", "criteo", *args],
        j=j,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=0,
        memMB=memMB,
        env=env,
        mounts=mounts,
        max_retries=max_retries,
        rdzv_backend="c10d",
        rdzv_port=rdzv_port,
        debug=False,
        role="prepare",
    )


def _ddp(module: str, args: List[str], *, j: str, gpu: int, h: Optional[str], role: str = "", **kwargs) -> specs.AppDef:
    """`dist.ddp` running `python -m module args` under torchrun, after checking -j against the GPUs."""
    nproc = parse_nnodes(j)[2]  # also rejects a malformed -j with torchx's own message
    gpus = specs.resource(h=h).gpu if h else gpu
    if gpus > 0 and nproc > gpus:
        raise ValueError(
            f"-j {j} starts {nproc} processes per node but a node has {gpus} GPUs; "
            "each process takes one GPU (cuda:LOCAL_RANK)"
        )
    app = ddp(*args, m=module, j=j, gpu=gpu, h=h, **kwargs)
    if role:
        app.roles[0].name = role
    return app
