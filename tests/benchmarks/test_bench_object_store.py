"""The object-store benchmark runs at a tiny size against the tests' S3 server and both sides read
the same rows (the script exits with an error otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_object_store_reads_the_same_rows_from_s3_and_disk():
    pytest.importorskip("moto.server")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_object_store.py"), "--rows", "20000", "--repeats", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "s3 / local: " in done.stdout
