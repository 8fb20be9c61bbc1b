"""Running the real entry points as a user would, in subprocesses from the repository root: the
per-rank trainer (alone or under torchrun) and the `recsys` command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root."""


def _env(fault: str = "") -> dict[str, str]:
    """This environment with one intra-op thread per process (as torchrun gives each rank) and the
    fault hook set only when asked (trainer/faults.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RECSYS_FAULT", None)
    if fault:
        env["RECSYS_FAULT"] = fault
    return env


def trainer_command(args: list[str], nproc: int = 0, restarts: int | None = None, derive: bool = False) -> list[str]:
    """`python -m trainer ARGS`, under `torchrun --standalone --nproc-per-node NPROC` when nproc > 0
    (with `--max-restarts RESTARTS` when given). With the fixed defaults (`--derive_defaults
    false`) unless `derive`: most tests pin what they exercise; the derived defaults have tests of
    their own."""
    if not derive and "--derive_defaults" not in args:
        args = ["--derive_defaults", "false", *args]
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if restarts is not None:
            launcher.append(f"--max-restarts={restarts}")
    return [*launcher, "-m", "trainer", *args]


def run_trainer(
    args: list[str],
    nproc: int = 0,
    timeout: int = 600,
    restarts: int | None = None,
    fault: str = "",
    derive: bool = False,
) -> subprocess.CompletedProcess:
    """Run `trainer_command(...)` to its end, RECSYS_FAULT=`fault` when given."""
    return subprocess.run(
        trainer_command(args, nproc, restarts, derive), cwd=ROOT, env=_env(fault), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def start_trainer(
    args: list[str], nproc: int = 0, log_dir: Path | None = None, recsys: bool = False
) -> subprocess.Popen:
    """`trainer_command(ARGS, NPROC)` started in the background, or with `recsys` the same job as
    `recsys train ARGS --nproc-per-node NPROC`; stdout/stderr to log_dir/{out,err}."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    command = trainer_command(args, nproc)
    if recsys:
        command = [sys.executable, "-m", "launch.cli", "train", *command[command.index("trainer") + 1 :]]
        command += ["--nproc-per-node", str(nproc)]
    with open(log_dir / "out", "w") as out, open(log_dir / "err", "w") as err:
        return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=out, stderr=err)


def run_recsys(*args: str, timeout: int = 600, fault: str = "") -> subprocess.CompletedProcess:
    """`recsys ARGS` (`python -m launch.cli`), RECSYS_FAULT=`fault` when given."""
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT,
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error(result: subprocess.CompletedProcess) -> str:
    """Assert a command failed as bad input must (exit 2, no traceback, exactly one line starting
    with "error"); returns stderr from that line on (a message may list details below it)."""
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-4000:])
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-4000:]
    return result.stderr[result.stderr.index(errors[0]) :]


SEGFAULT = "Signal 11 (SIGSEGV)"
"""torchrun's words for a rank killed by a segmentation fault."""


def train(data, run_dir, *flags: str, nproc: int = 2, timeout: int = 600, derive: bool = False) -> dict:
    """A training run as `recsys train --data DATA --run-dir RUN_DIR FLAGS --nproc-per-node NPROC`
    runs it (torchrun, no progress bar); asserts it exits 0 and returns its summary.json.

    A fresh run (no RUN_DIR yet) whose rank died of SIGSEGV is run once more from scratch, with a
    warning: seen in a CI run on the loaded 2-core VM (rank 0, inside gloo's all_to_all_single under
    the train pipeline, a two_tower run), not in 10 reruns of that test since. Any other failure,
    or a second crash, fails the test."""
    args = ["--data", str(data), "--run-dir", str(run_dir), "--training.progress_bar", "false", *flags]
    fresh = not Path(run_dir).exists()
    result = run_trainer(args, nproc=nproc, timeout=timeout, derive=derive)
    if result.returncode != 0 and fresh and SEGFAULT in result.stderr:
        warnings.warn(f"a rank segfaulted (gloo); running {run_dir} again once", stacklevel=2)
        shutil.rmtree(run_dir, ignore_errors=True)
        result = run_trainer(args, nproc=nproc, timeout=timeout, derive=derive)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(run_dir) / "summary.json").read_text())
