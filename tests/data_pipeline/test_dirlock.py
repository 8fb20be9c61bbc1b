"""One writer per directory: a second trainer or preparer into a held directory fails at once with
one error naming the holder; the lock of a killed process is taken over with a note; a clean
release, or a torchrun restart of the same job, leaves nothing to report."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data_pipeline.dirlock import _HELD, LOCK_FILE, DirInUse, DirLock
from tests.helpers.runs import ROOT, one_error, run_recsys, run_trainer

DATA = ROOT / "tests" / "data" / "format_v1" / "data"
HOLD = (
    "import sys, time; from data_pipeline.dirlock import DirLock; DirLock(sys.argv[1], 'd').acquire(); "
    "print('held', flush=True); "
    "time.sleep(600)"
)


def _holder(directory) -> subprocess.Popen:
    """Another process that holds the lock of `directory` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_directory_is_refused_naming_the_holder_then_taken_over_when_it_dies(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(DirInUse, match=f"run directory {tmp_path} is in use by pid {proc.pid} on host "):
            DirLock(tmp_path, "run directory").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with DirLock(tmp_path, "run directory") as lock:
        assert f"took over the lock of pid {proc.pid} on host {socket.gethostname()}" in lock.note
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
    with DirLock(tmp_path, "run directory") as again:  # released cleanly: nothing to take over
        assert again.note == ""
        with DirLock(tmp_path, "run directory") as nested:  # this process again: no conflict
            assert nested.note == ""
    proc = _holder(tmp_path)  # and released: another process can take it
    proc.kill()
    proc.wait()


def _died_holding(directory) -> DirLock:
    """A lock taken and then dropped as a dying process drops it (its record left behind)."""
    lock = DirLock(directory, "run directory").acquire()
    os.close(lock._fd)
    _HELD.discard(lock._path)
    return lock


def test_a_restart_of_the_same_job_takes_the_lock_silently(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    _died_holding(tmp_path)
    assert _died_holding(tmp_path).note == ""  # torchrun's next attempt of job-1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    assert "took over the lock" in _died_holding(tmp_path).note


def test_a_second_trainer_on_a_held_run_directory_fails_before_touching_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        result = run_trainer(["--data", str(DATA), "--run-dir", str(run_dir), "--training.max_steps", "2"])
        assert f"error: run directory {run_dir} is in use by pid {proc.pid}" in one_error(result)
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
    finally:
        proc.kill()
        proc.wait()


def test_a_second_preparer_into_a_held_output_fails(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        result = run_recsys("prepare", "synthetic", "--rows", "2000", "--out", str(out))
        assert f"error: output directory {out} is in use by pid {proc.pid}" in one_error(result)
    finally:
        proc.kill()
        proc.wait()
    start = time.time()
    result = run_recsys("prepare", "synthetic", "--rows", "2000", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"note: took over the lock of pid {proc.pid}" in result.stdout
    assert (out / "dataset.json").stat().st_mtime >= start - 1
