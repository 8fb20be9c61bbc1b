"""The trainer benchmark runs end to end at a tiny size, and its two sides train the same thing:
the minimal loop's losses equal the trainer's, window by window, on 2 gloo ranks (the
speed figures themselves are checked by running the benchmark, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_trainer_compares_the_same_training(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_trainer.py"),
        *"--rows 30000 --global-batch 256 --warmup 20 --steps 20 --worlds 2 --loader-batches 5".split(),
        *"--big-table-rows 0 --data-dir".split(),
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["worlds"]
    assert set(results) == {"2"}
    for world, r in results.items():
        assert len(r["trainer"]) == len(r["minimal"]) == 2 and len(r["streamed"]) == 1
        assert min(r["trainer"] + r["minimal"] + r["streamed"]) > 0
        # every logged window (20 steps each: the warmup's and the timed one) of both trainer runs
        # equals the minimal runs' and the streamed one's: same model, same batches, same order
        assert all(len(x) == 2 for x in r["losses"]["trainer"] + r["losses"]["minimal"] + r["losses"]["streamed"])
        for t in r["losses"]["trainer"]:
            for m in r["losses"]["minimal"] + r["losses"]["streamed"]:
                assert max(abs(a - b) for a, b in zip(t, m)) < 1e-5, (world, t, m)
        assert len(r["loader_per_rank"]) == int(world) and min(r["loader_per_rank"]) > 0
        assert all(peak > base for base, peak in zip(r["rss_base_gb"], r["peak_rss_gb"]))
        assert len(r["estimate"]) == int(world) and all(e["ddr_gb"] > 0 for e in r["estimate"])
    table = (out / "results.md").read_text()
    assert "trainer / minimal" in table and "loader / trainer" in table and "planner estimate" in table
