"""The `recsys` front door: help, version, unknown commands, and torchrun's flags passed through."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from launch.cli import COMMANDS, split_torchrun_flags
from models import MODELS
from models.config import MODEL_NAMES
from tests.helpers.data import synthetic
from tests.helpers.runs import ROOT, one_error, run_recsys


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_command_and_exits_0(flag):
    result = run_recsys(flag)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


def test_version_is_the_installed_package_version():
    result = run_recsys("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"recsys {version('recsys-trainer')}"


def test_no_command_or_an_unknown_one_exits_2():
    assert run_recsys().returncode == 2
    assert "unknown command 'trian'" in one_error(run_recsys("trian"))
    assert "unknown kind 'csv'" in one_error(run_recsys("prepare", "csv"))


def test_train_help_names_the_command_and_lists_choices():
    result = run_recsys("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: recsys train" in result.stdout
    assert "--optimizer.dense {adam,adamw,adagrad,sgd}" in result.stdout
    assert "--model.name {" + ",".join(MODEL_NAMES) + "}" in result.stdout


def test_the_checks_before_launch_load_no_torchrec():
    """`recsys train` reads the config, the dataset and the directories before torchrun starts: a
    bad one is one error line in about two seconds, not the seven torchrec's imports take."""
    heavy = "('torchrec', 'fbgemm_gpu')"
    code = (
        "import sys; import trainer.config, trainer.defaults, trainer.preflight, models; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout[-2000:], done.stderr[-2000:])


def test_the_model_choices_are_the_registry():
    assert list(MODELS) == list(MODEL_NAMES)


@pytest.mark.parametrize(
    "line, torchrun, trainer",
    [
        ("--model dlrm --nproc-per-node 2", ["--nproc-per-node", "2"], ["--model", "dlrm"]),
        (
            "--nnodes 2 --data d --max-restarts=3 --rdzv-endpoint h:29400 --standalone --run-dir r",
            ["--nnodes", "2", "--max-restarts=3", "--rdzv-endpoint", "h:29400", "--standalone"],
            ["--data", "d", "--run-dir", "r"],
        ),
        # torchrun's -m/--help/--run-path are not passed: recsys runs `-m trainer`, --help is the trainer's
        ("--help --module x --log_dir l", ["--log_dir", "l"], ["--help", "--module", "x"]),
    ],
)
def test_torchrun_flags_are_told_apart_from_the_trainers(line, torchrun, trainer):
    assert split_torchrun_flags(line.split()) == (torchrun, trainer)


def test_torchrun_flags_pass_through_to_a_real_run(tmp_path):
    """--max-restarts and a c10d rendezvous reach torchrun: rank 1 is killed after step 3 and the
    job restarts and finishes (without the flag it would fail); no --standalone is added because
    the line names a rendezvous endpoint."""
    from trainer.distributed import free_port

    data = synthetic(tmp_path / "data", rows=4000)
    run_dir = tmp_path / "run"
    result = run_recsys(
        "train", "--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        "--max-restarts=1", "--nproc-per-node", "2", "--data", str(data.root), "--run-dir", str(run_dir),
        "--derive_defaults", "false", "--data.batch_size", "64", "--training.max_steps", "8",
        "--checkpoint.every_steps", "2", "--training.progress_bar", "false",
        fault="kill@3:1", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RECSYS_FAULT: rank 1 kills itself" in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2
