"""The serving benchmark runs at a tiny size and the program and the eager model agree (the script
asserts their predictions are close before timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_serving_times_the_program_against_the_eager_model():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--batch-sizes", "1,16"]
    cmd += ["--seconds", "0.05", "--repeats", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("program / eager: ") == 2
