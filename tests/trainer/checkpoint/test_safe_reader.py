"""A checkpoint cannot run code: a `.metadata` crafted to write a marker file when unpickled (its
checksum in checkpoint.json rewritten to match, as an attacker would) is refused with one clear
error by every command that loads a checkpoint, and the marker never appears. Plain DCP would run
it: the first test proves the payload works."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from tests.helpers.runs import ROOT, one_error, run_recsys, run_trainer
from trainer.checkpoint import CheckpointError
from trainer.checkpoint.safe_reader import read_metadata
from trainer.checkpoint.store import sha256

FIXTURE = ROOT / "tests" / "data" / "format_v1"
STEP = Path("checkpoints") / "step-00000016"
REFUSED = "not a checkpoint this trainer wrote"


class _Payload:
    """Unpickles by writing `marker`, then returns the real metadata read from `real`."""

    def __init__(self, marker: Path, real: Path) -> None:
        self.marker, self.real = marker, real

    def __reduce__(self):
        marker, real = str(self.marker), str(self.real)
        code = f"(open({marker!r}, 'w').close(), __import__('pickle').load(open({real!r}, 'rb')))[1]"
        return (eval, (code,))


def _poison(run: Path, metadata: bytes) -> None:
    """Replace the checkpoint's `.metadata` and rewrite its recorded size and sha256."""
    step = run / STEP
    (step / ".metadata").write_bytes(metadata)
    meta = json.loads((step / "checkpoint.json").read_text())
    meta["files"][".metadata"] = {"bytes": len(metadata), "sha256": sha256(step / ".metadata")}
    (step / "checkpoint.json").write_text(json.dumps(meta))


@pytest.fixture
def poisoned(tmp_path) -> tuple[Path, Path]:
    """(a copy of the format-1 run with a code-running .metadata, the marker it would write)."""
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(FIXTURE / "run", run)
    real = tmp_path / "real.metadata"
    shutil.copy(run / STEP / ".metadata", real)
    _poison(run, pickle.dumps(_Payload(marker, real)))
    return run, marker


def test_plain_dcp_runs_the_payload_and_ours_refuses_it(poisoned):
    run, marker = poisoned
    assert len(dcp.FileSystemReader(run / STEP).read_metadata().state_dict_metadata) == 38
    assert marker.exists()  # the payload works, and still returns the real metadata
    marker.unlink()
    with pytest.raises(CheckpointError, match="names builtins.eval"):
        read_metadata(run / STEP)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "export", "auto-resume", "resume", "init_from"])
def test_every_command_refuses_a_code_running_checkpoint(poisoned, tmp_path, command):
    run, marker = poisoned
    data = FIXTURE / "data"
    train = ["--config", str(run / "config.toml"), "--data", str(data), "--training.progress_bar", "false"]
    if command == "evaluate":
        result = run_recsys("evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "e"))
    elif command == "export":
        result = run_recsys("export", str(run), "--out", str(tmp_path / "model.pt"))
        assert not (tmp_path / "model.pt").exists()
    elif command == "auto-resume":
        result = run_trainer([*train, "--run-dir", str(run)])
    elif command == "resume":
        result = run_trainer([*train, "--run-dir", str(tmp_path / "new"), "--checkpoint.resume", str(run / STEP)])
    else:
        result = run_trainer([*train, "--run-dir", str(tmp_path / "new"), "--checkpoint.init_from", str(run)])
    assert REFUSED in one_error(result)
    assert not marker.exists()


def test_metadata_must_hold_tensors_in_the_directory(tmp_path):
    """Pickles that would still reach DCP's unsafe paths: a non-tensor entry (DCP loads those with
    torch.load(weights_only=False); its class cannot even be named) or a data file outside."""
    real = read_metadata(FIXTURE / "run" / STEP)
    key = next(iter(real.state_dict_metadata))
    index, info = next(iter(real.storage_data.items()))
    cases = {
        "names .*BytesStorageMetadata": replace(real, state_dict_metadata={key: BytesStorageMetadata()}),
        "is a int; only tensors": replace(real, state_dict_metadata={key: 3}),
        "points outside the directory": replace(real, storage_data={index: replace(info, relative_path="../x")}),
    }
    for i, (why, metadata) in enumerate(cases.items()):
        run = tmp_path / str(i)
        shutil.copytree(FIXTURE / "run", run)
        metadata.storage_meta = None
        _poison(run, pickle.dumps(metadata))
        with pytest.raises(CheckpointError, match=why):
            read_metadata(run / STEP)
