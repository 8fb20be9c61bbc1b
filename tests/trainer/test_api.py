"""The Python API as a notebook uses it: the documented example run as written (in a fresh
interpreter whose sys.argv holds a Jupyter kernel's flags), errors raised rather than printed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from data_pipeline.dirlock import DirLock
from data_pipeline.schema import DataError
from tests.helpers.data import synthetic
from tests.helpers.runs import ROOT
from trainer import TrainingFailed, load_config, train
from trainer.api import explicit_toml, set_knobs

FAST = ["--training.max_steps", "30", "--training.progress_bar", "false"]


def docstring_example() -> str:
    import trainer.api

    lines = trainer.api.__doc__.splitlines()[1:]
    end = next(i for i, line in enumerate(lines) if line and not line.startswith("    "))
    return textwrap.dedent("\n".join(lines[:end]))


@pytest.mark.slow
def test_the_documented_example_runs_as_written_under_a_kernel_argv(tmp_path):
    data = synthetic(tmp_path / "data", rows=4000)
    example = docstring_example().replace('"data/synthetic"', repr(str(data.root)))
    example = example.replace('"runs/nb"', repr(str(tmp_path / "nb")) + ", " + ", ".join(map(repr, FAST)))
    results = tmp_path / "results.json"
    # the two calls write one run directory: the second resumes the first's finished run (nothing left to train)
    script = "\n".join(
        [
            "import sys, json",
            "sys.argv = ['ipykernel_launcher.py', '-f', '/tmp/kernel-1.json']  # what Jupyter passes",
            example.replace("summary = train(cfg, nproc", "one = summary\nsummary = train(cfg, nproc"),
            f"json.dump({{'one': one, 'two': summary}}, open({str(results)!r}, 'w'))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(results.read_text())
    assert out["one"]["world_size"] == 1 and out["one"]["steps"] == 30
    assert 0.5 < out["one"]["test"]["auc"] <= 1
    assert out["two"]["steps"] == 30 and out["two"]["test"]["auc"] == pytest.approx(out["one"]["test"]["auc"])
    assert f"{out['one']['test']['auc']:.4f}" in result.stdout


def test_load_config_never_reads_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    assert load_config().model.name == "dlrm"


def test_knobs_set_in_python_are_kept_from_the_derived_defaults():
    cfg = load_config(["--model", "wide_deep"])
    cfg.data.batch_size = 96
    assert {"model.name", "data.batch_size"} <= set_knobs(cfg)
    assert "optimizer.dense_lr" not in set_knobs(cfg)
    toml = explicit_toml(cfg)
    assert "[data]\nbatch_size = 96" in toml and 'name = "wide_deep"' in toml and "dense_lr" not in toml


def test_bad_data_raises_before_anything_starts(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        train(["--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failing_rank_raises_its_error_line(tmp_path):
    data = synthetic(tmp_path / "data", rows=4000)
    run_dir = tmp_path / "run"
    lock = DirLock(run_dir, "run directory")
    lock.acquire()  # another job holds the run directory
    try:
        with pytest.raises(TrainingFailed, match=r"^error: run directory .* is in use"):
            train(["--data", str(data.root), "--run-dir", str(run_dir), *FAST], nproc_per_node=2)
    finally:
        lock.release()
    assert not (run_dir / "summary.json").exists()
