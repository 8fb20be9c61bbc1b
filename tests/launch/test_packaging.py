"""What the package ships and asks for: the presets inside the wheel and `recsys configs`, the
optional features behind extras with one error line naming the extra when one is missing, and a
run without TensorBoard that keeps its metrics.jsonl."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from launch.presets import presets
from tests.helpers.data import synthetic
from tests.helpers.runs import ROOT, one_error, run_recsys

IGNORED = (".venv", ".git", "data", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")


def test_the_wheel_ships_the_presets(tmp_path):
    # built from a copy of the checkout: setuptools writes build/ and *.egg-info into the source tree
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("recsys_trainer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("/")[-1] for n in names if n.startswith("launch/configs/")}
    assert shipped == {f"{name}.toml" for name in presets()} and "demo.toml" in shipped
    assert not any(n.startswith(("tests/", "benchmarks/", "configs/")) for n in names)


def test_recsys_configs_lists_and_copies_the_presets(tmp_path):
    listed = run_recsys("configs")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  ")] == list(presets())
    copied = run_recsys("configs", "cp", "demo", str(tmp_path))
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "demo.toml").read_text() == (ROOT / "configs" / "demo.toml").read_text()
    assert tomllib.loads((tmp_path / "demo.toml").read_text())["model"]["name"]
    assert "exists; --force replaces it" in one_error(run_recsys("configs", "cp", "demo", str(tmp_path)))
    assert run_recsys("configs", "cp", "demo", str(tmp_path), "--force").returncode == 0
    assert "no preset 'nope'; the presets are: " in one_error(run_recsys("configs", "cp", "nope"))


def _without(module: str, *args: str, entry: str = "launch.cli") -> subprocess.CompletedProcess:
    """`recsys ARGS` (or `python -m trainer ARGS`, one rank in this process: entry "trainer.__main__")
    in an interpreter where `module` cannot be imported, as if it were not installed."""
    code = f"import sys; sys.modules[{module!r}] = None; from {entry} import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, module, extra", [("tune", "optuna", "tune"), ("report", "matplotlib", "report")])
def test_a_command_whose_extra_is_missing_names_it(command, module, extra):
    message = one_error(_without(module, command, "--help"))
    assert message.startswith(f"error: recsys {command} needs {module}: pip install 'recsys-trainer[{extra}]'")


@pytest.mark.slow
def test_without_tensorboard_a_run_keeps_metrics_jsonl_unless_tensorboard_was_asked_for(tmp_path):
    data = synthetic(tmp_path / "data", rows=1000)
    args = ["--data", str(data.root), "--run-dir", str(tmp_path / "run"), "--training.max_steps", "3"]
    args += ["--training.progress_bar", "false", "--derive_defaults", "false", "--data.batch_size", "64"]
    done = _without("tensorboard", *args, entry="trainer.__main__")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: TensorBoard is not installed: curves go to metrics.jsonl only" in done.stdout
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0 and not (tmp_path / "run" / "tb").exists()
    assert tomllib.loads((tmp_path / "run" / "config.toml").read_text())["logging"]["backends"] == []
    asked = _without(
        "tensorboard", *args, "--run-dir", str(tmp_path / "run2"), "--logging.backends", "tensorboard",
        entry="trainer.__main__",
    )  # fmt: skip
    assert "logging.backends tensorboard: not installed here" in one_error(asked)
