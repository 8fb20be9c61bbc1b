"""The TorchX components (launch/components.py) and .torchxconfig: real `torchx run -s local_cwd`
jobs (one node x 2 ranks, two simulated nodes x 1 rank, the Criteo preparer on 2 replicas), and the
requests the Slurm and Kubernetes schedulers would get (dry runs; no cluster here)."""

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from torchx.runner import get_runner
from torchx.specs import BindMount, VolumeMount
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.schema import DatasetSchema
from launch.components import prepare, train
from tests.helpers.data import criteo_lines, read_split, write_tsv
from tests.helpers.dist import free_port
from tests.helpers.runs import ROOT
from trainer.config import load_config

BIN = Path(sys.executable).parent  # torchx and torchrun of this environment
COMPONENT = "launch/components.py:train"


def torchx(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchx ARGS` from the repository root, reading only the repository's .torchxconfig."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCHXCONFIG": str(ROOT / ".torchxconfig"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return subprocess.run(
        [str(BIN / "torchx"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def torchrun_command(role) -> list[str]:
    """The role's `bash -c "torchrun ..."` as a list of words."""
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return shlex.split(role.args[1])


def module_args(role) -> tuple[str, list[str]]:
    """The module torchrun starts (`-m MODULE`) and the arguments it gets."""
    words = torchrun_command(role)
    i = words.index("-m")
    return words[i + 1], words[i + 2 :]


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# ---- real runs on this machine (local_cwd) ------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_synthetic(
        SyntheticSpec(rows=30_000, row_group_rows=2048),
        tmp_path_factory.mktemp("data") / "synthetic",
        log=lambda *_: None,
    )


def run_train(
    dataset, run_dir: Path, j: str, *component_args: str, trainer_args: tuple = ()
) -> subprocess.CompletedProcess:
    return torchx(
        "run",
        "-s",
        "local_cwd",
        COMPONENT,
        "-j",
        j,
        "--config",
        "configs/demo.toml",
        *component_args,
        "--",
        "--data.path",
        str(dataset.root),
        "--run-dir",
        str(run_dir),
        "--training.progress_bar",
        "false",
        *trainer_args,
    )


@pytest.fixture(scope="module")
def one_node_two_ranks(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "1x2"
    return run_train(dataset, run_dir, "1x2", trainer_args=SHARDED), run_dir


# The planner may replicate a small table on two hosts (slow links) and shard it on one, which is
# another (legitimate) training; the 1x2 == 2x1 comparison needs one plan, so both shard every table.
SHARDED = ("--sharding.sharding_types", "table_wise", "column_wise", "table_column_wise")


@pytest.mark.slow
def test_local_cwd_one_node_two_ranks_trains(dataset, one_node_two_ranks):
    result, run_dir = one_node_two_ranks
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] > 0
    assert summary["oracle_auc"] == dataset.splits["test"].oracle_auc
    assert summary["test"]["auc"] > 0.75, summary["test"]  # learns (oracle ~0.90 at this size)
    # the component passed --config and the overrides through to `python -m trainer`
    resolved = tomllib.loads((run_dir / "config.toml").read_text())
    assert resolved["config"] == "configs/demo.toml"
    assert resolved["data"]["batch_size"] == 256  # from configs/demo.toml
    assert resolved["data"]["path"] == str(dataset.root) and resolved["training"]["progress_bar"] is False


@pytest.mark.slow
def test_two_simulated_nodes_match_one_node(dataset, one_node_two_ranks, tmp_path):
    """-j 2x1: two torchrun agents meet at a c10d rendezvous on this host, as two nodes would. The
    world (2 ranks), seed, data split and sharding are the same as 1x2, so the results are too."""
    one, one_dir = one_node_two_ranks
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    run_dir = tmp_path / "2x1"
    # verbose: rank 1 (node 1) prints too (its third-party warnings), so both replicas show in the output
    two = run_train(dataset, run_dir, "2x1", "--rdzv_port", str(free_port()), trainer_args=("--verbose", *SHARDED))
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    output = two.stdout + two.stderr
    assert "trainer/0 [0]:" in output and "trainer/1 [0]:" in output  # two replicas (nodes), local rank 0 each
    a = json.loads((one_dir / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["world_size"] == 2 and b["steps"] == a["steps"] and b["global_batch_size"] == a["global_batch_size"]
    for split in ("valid", "test"):
        assert b[split] == pytest.approx(a[split], abs=1e-6), split
    # Same table -> rank placement. The planner labels the one-shard placement table_column_wise
    # with 2 ranks per host and column_wise with 1 rank per host: the same shards either way.
    placement = lambda s: {row.split()[0]: row.split()[2] for row in s["sharding_plan"]}  # noqa: E731
    assert placement(b) == placement(a)


@pytest.mark.slow
def test_prepare_component_on_two_replicas_matches_one_process(tmp_path):
    from launch.cli import main as recsys

    src = write_tsv(tmp_path / "day_0", criteo_lines(3000))
    args = [
        "--input",
        src,
        *"--num-embeddings 1000 --row-group-rows 2048 --chunk-mb 0.05 --min-count 2 --workers 1".split(),
    ]
    result = torchx(
        *"run -s local_cwd launch/components.py:prepare -j 2x1 --rdzv_port".split(),
        str(free_port()),
        "--",
        *args,
        "--out",
        str(tmp_path / "replicas"),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "prepare/0 [0]:" in result.stdout + result.stderr
    assert recsys(["prepare", "criteo", *args, "--out", str(tmp_path / "single")]) == 0  # one process
    a, b = DatasetSchema.load(tmp_path / "replicas"), DatasetSchema.load(tmp_path / "single")
    assert [f.num_embeddings for f in a.sparse] == [f.num_embeddings for f in b.sparse]
    for split in ("train", "valid", "test"):
        assert read_split(a.root, split).equals(read_split(b.root, split))


# ---- the AppDef and the cluster schedulers' requests (dry runs) ---------------------------------

CLUSTER_ARGS = dict(
    j="2x8",
    gpu=8,
    cpu=64,
    memMB=480_000,
    image="ghcr.io/acme/recsys-trainer:gpu",
    max_retries=3,
    mounts=["type=volume", "src=shared-pvc", "dst=/mnt/shared"],
    config="configs/demo.toml",
)
OVERRIDES = ("--data.path", "/mnt/shared/data/criteo", "--run-dir", "/mnt/shared/runs/exp1", "--model", "dlrm_dcn")


def test_train_appdef_for_a_cluster():
    app = train(*OVERRIDES, **CLUSTER_ARGS)
    (role,) = app.roles
    assert role.name == "trainer" and role.image == "ghcr.io/acme/recsys-trainer:gpu"
    assert role.num_replicas == 2 and role.min_replicas == 2
    assert role.resource.gpu == 8 and role.resource.cpu == 64 and role.resource.memMB == 480_000
    assert role.max_retries == 3
    assert role.mounts == [VolumeMount(src="shared-pvc", dst_path="/mnt/shared", read_only=False)]
    assert role.port_map == {"c10d": 29500}
    words = torchrun_command(role)
    assert words[0] == "torchrun" and flag(words, "--nnodes") == "2" and flag(words, "--nproc_per_node") == "8"
    assert flag(words, "--rdzv_backend") == "c10d" and flag(words, "--rdzv_endpoint").endswith(":29500")
    module, args = module_args(role)
    assert module == "trainer" and args == ["--config", "configs/demo.toml", *OVERRIDES]
    cfg = load_config(args)  # what every rank will parse
    assert (cfg.data.path, cfg.run_dir, cfg.model.name) == (
        "/mnt/shared/data/criteo",
        "/mnt/shared/runs/exp1",
        "dlrm_dcn",
    )


def test_elastic_range_and_named_resource():
    app = train(j="1:4x8", h="aws_p4d.24xlarge", image="img", mounts=["type=bind", "src=/fsx", "dst=/fsx", "readonly"])
    (role,) = app.roles
    assert (role.min_replicas, role.num_replicas) == (1, 4)
    assert flag(torchrun_command(role), "--nnodes") == "1:4"
    assert role.resource.gpu == 8  # from the named resource
    assert role.mounts == [BindMount(src_path="/fsx", dst_path="/fsx", read_only=True)]
    assert module_args(role) == ("trainer", [])  # no config: the trainer's defaults


def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(ValueError, match="GPUs"):
        train(j="1x4", gpu=2)
    with pytest.raises(ValueError, match="GPUs"):
        train(j="1x16", h="aws_p4d.24xlarge")
    with pytest.raises(ValueError, match="-j"):
        train(j="two")
    with pytest.raises(ValueError, match="one replica per node"):
        prepare(j="2x2")


def test_prepare_appdef():
    (role,) = prepare("--input", "/mnt/criteo/day_*.gz", "--out", "/mnt/data/criteo-tb", j="4x1", image="img").roles
    assert role.name == "prepare" and role.num_replicas == 4 and role.resource.gpu == 0
    assert module_args(role) == (
        "launch.cli",
        ["prepare", "criteo", "--input", "/mnt/criteo/day_*.gz", "--out", "/mnt/data/criteo-tb"],
    )


def test_component_cli_parsing():
    """What `torchx run launch/components.py:train ARGS` builds: torchx checks the component
    (typed parameters, a docstring entry for each) and trainer flags pass after `--`."""
    for name in (COMPONENT, "launch/components.py:prepare"):
        assert get_component(name).validation_errors == [], name
    fn = get_component(COMPONENT).fn
    app = materialize_appdef(
        fn,
        [
            *"-j 2x1 --gpu 1 --env A=1,B=2 --config c.toml -- --data.path /d --training.epochs 2".split(),
        ],
    )
    (role,) = app.roles
    assert role.num_replicas == 2 and role.resource.gpu == 1
    assert role.env["A"] == "1" and role.env["B"] == "2"
    assert module_args(role) == ("trainer", ["--config", "c.toml", "--data.path", "/d", "--training.epochs", "2"])


def test_slurm_dryrun():
    app = train(*OVERRIDES, **{**CLUSTER_ARGS, "mounts": None})
    scheduler = get_runner()._scheduler("slurm")
    request = scheduler.submit_dryrun(app, {"partition": "gpu", "time": "2:00:00"}).request
    assert list(request.replicas) == ["trainer-0", "trainer-1"]  # one heterogeneous group per node
    assert request.max_retries == 3
    for replica in request.replicas.values():
        assert replica.sbatch_opts["gpus-per-task"] == "8" and replica.sbatch_opts["ntasks-per-node"] == "1"
        assert replica.sbatch_opts["partition"] == "gpu" and replica.sbatch_opts["time"] == "2:00:00"
        words = shlex.split(replica.args[1])
        assert flag(words, "--rdzv_endpoint") == "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500"
        assert words[words.index("-m") + 1 :] == ["trainer", "--config", "configs/demo.toml", *OVERRIDES]
    script = request.materialize()
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script


def test_slurm_and_kubernetes_dryrun_from_the_command_line():
    result = torchx(
        *"run --dryrun -s slurm -cfg partition=gpu,time=2:00:00".split(),
        COMPONENT,
        *"-j 2x8 --gpu 8 --".split(),
        *OVERRIDES,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout.split("=== SCHEDULER REQUEST ===")[1]
    assert (
        len(re.findall(r"#SBATCH --job-name=trainer-\d .*--partition=gpu --time=2:00:00 .*--gpus-per-task=8", script))
        == 2
    )
    assert (
        script.count("-m trainer --config configs/demo.toml --data.path /mnt/shared/data/criteo") == 2
    )  # config from .torchxconfig
    # kubernetes: the request is a Volcano job built with the `kubernetes` package (not a dependency
    # here); without it the dry run fails in torchx's pod builder, after our component ran
    result = torchx(
        *"run --dryrun -s kubernetes".split(),
        COMPONENT,
        *"-j 2x8 --gpu 8 --image img:1 --".split(),
        *OVERRIDES,
        timeout=60,
    )
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        assert "No module named 'kubernetes'" in result.stderr, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "nvidia.com/gpu: '8'" in result.stdout and "image: img:1" in result.stdout


def test_kubernetes_dryrun():
    pytest.importorskip(
        "kubernetes", reason="the kubernetes package builds torchx's Volcano job; not a test dependency"
    )
    app = train(*OVERRIDES, **CLUSTER_ARGS)
    scheduler = get_runner()._scheduler("kubernetes")
    job = scheduler.submit_dryrun(app, {"queue": "default", "namespace": "ml"}).request.resource
    assert job["spec"]["queue"] == "default"
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"]
    for task in tasks:
        assert task["maxRetry"] == 3
        (container,) = task["template"].spec.containers
        assert container.image == "ghcr.io/acme/recsys-trainer:gpu"
        assert container.resources.limits["nvidia.com/gpu"] == "8"
        words = shlex.split(container.command[2])
        assert words[words.index("-m") + 1 :] == ["trainer", "--config", "configs/demo.toml", *OVERRIDES]
        assert "/mnt/shared" in [m.mount_path for m in container.volume_mounts]


# ---- .torchxconfig ---------------------------------------------------------------------------------


def test_torchxconfig_names_real_options():
    """Every key in .torchxconfig, and every commented-out `# key = value` example under a scheduler,
    is an option torchx knows; the component section names the train component's parameters."""
    text = (ROOT / ".torchxconfig").read_text()
    parser = configparser.ConfigParser()
    parser.optionxform = str  # torchx reads keys case-sensitively
    parser.read_string(text)
    runner = get_runner()
    examples: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if m := re.match(r"\[(.+)\]$", line):
            section = m.group(1)
        elif m := re.match(r"#\s*([\w-]+)\s*=\s*\S", line):
            examples.setdefault(section, set()).add(m.group(1))
    assert {"local_cwd", "local_docker", "kubernetes", "slurm"} <= set(parser.sections())
    for name in parser.sections():
        keys = set(parser[name]) | examples.get(name, set())
        if name.startswith("component:"):
            assert name == f"component:{COMPONENT}"
            assert keys <= set(get_component(COMPONENT).fn.__code__.co_varnames), keys
        elif name == "cli:run":
            assert keys <= {"scheduler", "component", "workspace", "scheduler_args", "parent_run_id"}, keys
            assert parser[name]["component"] == COMPONENT
        else:
            known = {opt for opt, _ in runner.scheduler_run_opts(name)}
            assert keys <= known, (name, keys - known)
    for name in parser.sections():
        for value in parser[name].values():
            assert "#" not in value, (name, value)  # an inline comment would become part of the value
