"""A checkpoint that is corrupt, half-written, not ours, or from another model or config gives one
clear error naming what differs, before anything is loaded; `resume = "auto"` steps over a corrupt
latest checkpoint to the one before it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from data_pipeline.schema import DatasetSchema
from tests.helpers.runs import ROOT, one_error, run_trainer, trainer_command
from trainer.checkpoint import (
    CheckpointError,
    IncompatibleCheckpoint,
    check_compatible,
    committed,
    locate,
    read_meta,
    verify_files,
)
from trainer.config import load_config
from trainer.defaults import resolve

ARGS = [
    *"--data.batch_size 256 --training.max_steps 6 --checkpoint.every_steps 3 --training.eval_every 3".split(),
    *"--model.embedding_dim 8 --model.dense_arch_layer_sizes 16 8 --model.over_arch_layer_sizes 16 1".split(),
    *"--training.progress_bar false".split(),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run directory with checkpoints step-3 and step-6) of a one-process run."""
    root = tmp_path_factory.mktemp("errors")
    data = prepare_synthetic(
        SyntheticSpec(rows=8000, files=2, row_group_rows=500, max_vocab=2000), root / "data", log=lambda *_: None
    ).root
    result = run_trainer(["--data", str(data), "--run-dir", str(root / "run"), *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in committed(root / "run" / "checkpoints")] == ["step-00000003", "step-00000006"]
    return data, root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_corrupt_files_are_named(run, tmp_path):
    path = locate(_copy(run[1], tmp_path))
    meta = read_meta(path)
    assert verify_files(path, meta) == []
    shard = sorted(path.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other contents
    shard.write_bytes(bytes(data))
    assert verify_files(path, meta) == [f"{shard.name} does not hold what was written (sha256 differs)"]
    shard.write_bytes(bytes(data[:100]))
    assert verify_files(path, meta) == [f"{shard.name} has 100 bytes, {len(data)} were written"]
    (path / "rank-00000.pt").unlink()
    assert "rank-00000.pt is missing" in verify_files(path, meta)


def test_what_is_not_a_committed_checkpoint(run, tmp_path):
    run_dir = _copy(run[1], tmp_path)
    assert locate(run_dir) == run_dir / "checkpoints" / "step-00000006"  # a run directory: its latest
    assert locate(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-00000006"
    half = run_dir / "checkpoints" / ".tmp-step-00000009"
    shutil.copytree(run_dir / "checkpoints" / "step-00000006", half)
    (half / "checkpoint.json").unlink()
    assert locate(run_dir).name == "step-00000006"  # never the interrupted save
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        locate(half)
    with pytest.raises(CheckpointError, match="does not exist"):
        locate(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        locate(run[0])  # a dataset directory
    (run_dir / "checkpoints" / "step-00000006" / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_meta(run_dir / "checkpoints" / "step-00000006")


def test_another_model_or_dataset_is_named(run, tmp_path):
    data, run_dir = run
    path = locate(run_dir)
    meta = read_meta(path)
    schema = DatasetSchema.load(data)

    def resolved(*args: str):
        """The config as the run's ranks have it (run_trainer's fixed defaults, `auto` resolved)."""
        cfg = load_config(["--derive_defaults", "false", "--data", str(data), *ARGS, *args])
        resolve(cfg, schema, 2)
        return cfg

    same = resolved("--run-dir", str(run_dir))
    assert check_compatible(meta, same, schema, path) == []
    changed = resolved("--run-dir", str(run_dir), "--optimizer.dense_lr", "0.01")
    assert check_compatible(meta, changed, schema, path) == ["optimizer.dense_lr: 0.001 in the checkpoint, 0.01 now"]
    other = resolved(
        *"--model dlrm_dcn --model.embedding_dim 16 --model.dense_arch_layer_sizes 16 16".split(),
        *"--optimizer.sparse adagrad".split(),
    )
    with pytest.raises(IncompatibleCheckpoint) as error:
        check_compatible(meta, other, schema, path)
    for line in (
        "model.name: 'dlrm' in the checkpoint, 'dlrm_dcn' now",
        "model.embedding_dim: 8 in the checkpoint, 16 now",
        "optimizer.sparse: 'rowwise_adagrad' in the checkpoint, 'adagrad' now",
        "--checkpoint.init_from",
    ):
        assert line in str(error.value)
    raw = json.loads((data / "dataset.json").read_text())
    raw["sparse"][3]["num_embeddings"] += 5
    raw["sparse"] = raw["sparse"][:-1]
    bigger = DatasetSchema(**{**schema.__dict__, "sparse": [type(schema.sparse[0])(**f) for f in raw["sparse"]]})
    with pytest.raises(IncompatibleCheckpoint) as error:
        check_compatible(meta, same, bigger, path)
    n = schema.sparse[3].num_embeddings
    assert f"sparse feature cat_3: {n} ids in the checkpoint's dataset, {n + 5} now" in str(error.value)
    assert "sparse feature cat_25: in the checkpoint's dataset, not in this one" in str(error.value)


@pytest.mark.slow
def test_resume_errors_on_the_command_line(run, tmp_path):
    data, run_dir = run
    copy = _copy(run_dir, tmp_path)
    shard = sorted((copy / "checkpoints" / "step-00000006").glob("__0_*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    corrupt = one_error(
        run_trainer(
            [
                "--data",
                str(data),
                "--run-dir",
                str(tmp_path / "new"),
                *ARGS,
                "--checkpoint.resume",
                str(copy / "checkpoints" / "step-00000006"),
            ]
        )
    )
    assert "is corrupt" in corrupt and shard.name in corrupt
    other = one_error(
        run_trainer(
            [
                "--data",
                str(data),
                "--run-dir",
                str(tmp_path / "new"),
                *ARGS,
                "--model",
                "dlrm_dcn",
                "--checkpoint.resume",
                str(run_dir),
            ]
        )
    )
    assert "model.name: 'dlrm' in the checkpoint, 'dlrm_dcn' now" in other
    never = one_error(
        run_trainer(["--data", str(data), "--run-dir", str(run_dir), *ARGS, "--checkpoint.resume", "never"])
    )
    assert "holds checkpoints (latest step-00000006)" in never


@pytest.mark.slow
def test_auto_resume_steps_over_a_corrupt_latest_checkpoint(run, tmp_path):
    data, run_dir = run
    copy = _copy(run_dir, tmp_path)
    shard = sorted((copy / "checkpoints" / "step-00000006").glob("__0_*.distcp"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    result = run_trainer(["--data", str(data), "--run-dir", str(copy), *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: checkpoint" in result.stdout and "step-00000006 is corrupt" in result.stdout
    assert "resumed from " + str(copy / "checkpoints" / "step-00000003") in result.stdout
    assert json.loads((copy / "summary.json").read_text())["steps"] == 6


def _in_own_mount_namespace() -> bool:
    """Whether this machine lets a test mount a small tmpfs of its own (`unshare -rm`: a user and
    mount namespace, root or not, nothing mounted outside it)."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _in_own_mount_namespace(), reason="no unshare -rm here (user namespaces off)")
def test_a_full_disk_at_a_save_is_named_and_leaves_the_last_checkpoint(run, tmp_path):
    """checkpoint.dir on a tmpfs with room for one checkpoint and a half: step 3 is committed,
    step 6 runs out of space; one error says so (not torch's "unexpected pos"), step 3 stays."""
    data, _ = run
    one = sum(f.stat().st_size for f in locate(run[1] / "checkpoints" / "step-00000003").iterdir())
    full = tmp_path / "full"
    full.mkdir()
    command = trainer_command(["--data", str(data), "--run-dir", str(tmp_path / "run"), *ARGS])
    command += ["--checkpoint.dir", str(full)]
    size = one * 3 // 2 // 4096 * 4096 + 8192
    script = f'mount -t tmpfs -o size={size} tmpfs {full} && "$@"; rc=$?; ls -a {full}; exit $rc'
    unshared = ["unshare", "-rm", "sh", "-c", script, "sh", *command]
    result = subprocess.run(unshared, capture_output=True, text=True, timeout=300, cwd=ROOT)
    line = one_error(result).splitlines()[0]
    assert "no space left on device writing checkpoint" in line and ".tmp-step-00000006" in line, line
    listing = result.stdout.split()
    assert "step-00000003" in listing and "step-00000006" not in listing, result.stdout[-2000:]


def test_resuming_on_changed_data_says_what_changed(run, tmp_path):
    """Rows appended to the train split and a rewritten valid split: the run resumes (training on
    new data is a use) and says what changed, and that the order of the epoch is not the saved one."""
    data, run_dir = run
    copy, changed = _copy(run_dir, tmp_path), tmp_path / "data"
    shutil.copytree(data, changed)
    raw = json.loads((changed / "dataset.json").read_text())
    shutil.copy(changed / "test" / "part-00000.parquet", changed / "train" / "part-99999.parquet")
    valid = sorted((changed / "valid").glob("*.parquet"))
    valid[0].write_bytes((changed / "test" / "part-00000.parquet").read_bytes())
    rows = {s: sum(pq.read_metadata(f).num_rows for f in (changed / s).glob("*.parquet")) for s in raw["splits"]}
    for split, info in raw["splits"].items():
        info["rows"] = rows[split]
    (changed / "dataset.json").write_text(json.dumps(raw))
    args = ["--data", str(changed), "--run-dir", str(copy), *ARGS, "--training.max_steps", "8"]
    result = run_trainer(args)
    assert result.returncode == 0, result.stderr[-3000:]
    before = read_meta(locate(run_dir))["dataset"]["splits"]["train"]["rows"]
    assert f"the train split's files changed since the checkpoint ({before:,} rows then, {rows['train']:,} now)" in (
        result.stdout
    )
    assert "the valid split's files changed since the checkpoint" in result.stdout
    assert "the train split's files changed: the data order differs from the original run's" in result.stdout
    unchanged = run_trainer(["--data", str(data), "--run-dir", str(_copy(run_dir, tmp_path / "again")), *ARGS])
    assert unchanged.returncode == 0 and "files changed" not in unchanged.stdout
