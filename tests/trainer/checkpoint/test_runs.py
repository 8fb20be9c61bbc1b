"""Checkpoints in real 2-rank torchrun jobs: a run stopped, crashed inside a save, killed with
SIGKILL under `torchrun --max-restarts`, or preempted by a signal, then resumed, ends bit-identical
to an uninterrupted run (metrics, weights, fused and dense optimizer state, metrics.jsonl)."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.prepare.synthetic import SyntheticSpec
from data_pipeline.prepare.synthetic import prepare as prepare_synthetic
from tests.helpers.runs import run_recsys, run_trainer, start_trainer
from trainer.checkpoint import committed, locate
from trainer.tools.export import checkpoint_tensors

pytestmark = pytest.mark.slow

# 2 epochs of 62 steps (global batch 256 over 16k train rows); evaluations every 20 steps of an
# epoch and at its end; a checkpoint every 10 steps (+ the better evaluations, + the end); a
# cosine schedule with warmup; a loss record every 5 steps.
ARGS = [
    *"--data.batch_size 128 --training.epochs 2 --training.eval_every 20 --checkpoint.every_steps 10".split(),
    *"--model.embedding_dim 8 --model.dense_arch_layer_sizes 16 8 --model.over_arch_layer_sizes 16 1".split(),
    *"--optimizer.lr_schedule cosine --optimizer.warmup_steps 10 --training.log_every 5".split(),
    *"--training.progress_bar false".split(),
]
SAME = ("steps", "valid", "test", "best_valid", "best_valid_step", "test_weights_step")


def torchrun(data: Path, run_dir: Path, *args: str, restarts: int = 0, fault: str = "") -> subprocess.CompletedProcess:
    """The 2-rank training job of these tests, `args` appended."""
    args = ["--data", str(data), "--run-dir", str(run_dir), *ARGS, *args]
    return run_trainer(args, nproc=2, timeout=300, restarts=restarts, fault=fault)


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields, resume markers, memory readings (peak RSS is a
    measurement of the process, not of the training state) and table stats (counted per attempt)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["phase"] not in ("resume", "memory", "tables"):
            out.append({k: v for k, v in record.items() if k not in ("time", "samples_per_s")})
    return out


def tensorboard_steps(run_dir: Path) -> list[int]:
    """The steps of the train loss curve as TensorBoard shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def assert_same_run(clean: Path, other: Path, resumed_at: int | None = None) -> None:
    """`resumed_at`: a step between log records; the first loss record after it is a mean over
    fewer steps in the resumed run (the steps before the stop were never logged) and is skipped."""
    a, b = (json.loads((d / "summary.json").read_text()) for d in (clean, other))
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    partial = -(-resumed_at // 5) * 5 if resumed_at is not None else None  # ARGS: a record every 5 steps

    def logged(run_dir: Path) -> list[dict]:
        return [r for r in records(run_dir) if not (r["phase"] == "train" and r["step"] == partial)]

    assert logged(clean) == logged(other)
    last_a, last_b = locate(clean), locate(other)
    assert last_a.name == last_b.name == "step-00000124"
    for part in ("model", "optim"):  # weights, rowwise-Adagrad momentum of every table, Adam moments
        ta, tb = checkpoint_tensors(last_a, part), checkpoint_tensors(last_b, part)
        assert ta.keys() == tb.keys() and ta
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, different[:5]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    spec = SyntheticSpec(rows=20_000, files=2, row_group_rows=1024, max_vocab=2000)
    return prepare_synthetic(spec, tmp_path_factory.mktemp("ckpt") / "data", log=lambda *_: None).root


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    result = torchrun(data, run_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_stopped_and_resumed_run_is_bit_identical(data, clean, tmp_path):
    run_dir = tmp_path / "run"
    stopped = torchrun(data, run_dir, "--training.stop_at_step", "35")
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert "stopped at step 35" in stopped.stdout
    assert not (run_dir / "summary.json").exists()
    assert locate(run_dir).name == "step-00000035"  # mid-epoch, between evaluations and periodic saves
    # keep_last 2 + the best validation's checkpoint (step 20)
    assert [p.name for p in committed(run_dir / "checkpoints")] == ["step-00000020", "step-00000030", "step-00000035"]

    resumed = torchrun(data, run_dir)  # the same command: checkpoint.resume = "auto"
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "step-00000035 (step 35, epoch 0, batch 35" in resumed.stdout
    assert_same_run(clean, run_dir)


def test_crash_inside_a_save_leaves_the_previous_checkpoint(data, clean, tmp_path):
    run_dir = tmp_path / "run"
    crashed = torchrun(data, run_dir, fault="save@30:1")  # rank 1 raises after writing its shards of step 30
    assert crashed.returncode != 0
    assert "RECSYS_FAULT: rank 1 fails inside the save of step 30" in crashed.stderr
    root = run_dir / "checkpoints"
    half = root / ".tmp-step-00000030"
    assert half.is_dir() and any(half.glob("__1_*.distcp")) and not (half / "checkpoint.json").exists()
    assert not (root / "step-00000030").exists()
    assert locate(run_dir).name == "step-00000020"

    resumed = torchrun(data, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step-00000020 (step 20, epoch 0, batch 20" in resumed.stdout
    assert not half.exists()  # the interrupted save was cleaned up
    assert_same_run(clean, run_dir)


def test_data_parallel_tables_resume_bit_identical(data, tmp_path):
    """Replicated tables keep their own (unfused) optimizer state: it is saved and restored too."""
    dp = ["--sharding.sharding_types", "data_parallel"]
    clean, run_dir = tmp_path / "clean", tmp_path / "run"
    for result in (torchrun(data, clean, *dp), torchrun(data, run_dir, *dp, "--training.stop_at_step", "35")):
        assert result.returncode == 0, result.stderr[-4000:]
    resumed = torchrun(data, run_dir, *dp)
    assert resumed.returncode == 0 and "step-00000035 (step 35, epoch 0, batch 35" in resumed.stdout
    assert_same_run(clean, run_dir)


def test_sigkilled_rank_is_restarted_by_torchrun_and_finishes_like_the_clean_run(data, clean, tmp_path):
    """With async saves: training goes on while step 40's checkpoint is written, so a checkpoint
    that caught later weights (not a copy taken at its step) would resume into another run. (Sync
    saves are what every other test here resumes from.)"""
    run_dir = tmp_path / "run"
    # SIGKILL on the first attempt only
    result = torchrun(data, run_dir, "--checkpoint.async_save", "true", restarts=2, fault="kill@47:1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 1 kills itself (SIGKILL) after step 47" in result.stdout
    assert "exitcode: -9" in result.stderr or "(exitcode: -9)" in result.stderr
    assert "step-00000040 (step 40, epoch 0, batch 40" in result.stdout
    assert "took over the lock" not in result.stdout  # the restarted attempt is the same job
    assert_same_run(clean, run_dir)
    # the attempt that died had logged step 45's loss and memory after the checkpoint: those two
    # records were dropped (records() above equals the clean run's: no step twice)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in lines if r["phase"] == "resume"]
    assert len(resume) == 1 and resume[0]["attempt"] == 1 and resume[0]["step"] == 40
    assert resume[0]["dropped_records"] == 2
    assert [r["step"] for r in lines if r["phase"] == "train"].count(45) == 1
    assert tensorboard_steps(run_dir) == tensorboard_steps(clean)  # the dead attempt's step 45 was purged


def _trained_to(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run has logged a train record at `step` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        log = run_dir / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []
        if steps and max(steps) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} (exit code {proc.poll()})")


@pytest.mark.parametrize("how", ["SIGUSR1 to rank 1", "SIGTERM to recsys train"])
def test_a_preempted_run_saves_at_the_signal_and_resumes_bit_identical(data, clean, tmp_path, how):
    """SIGTERM to torchrun, as Kubernetes sends it, is the chaos test's second hit."""
    run_dir = tmp_path / "run"
    args = ["--data", str(data), "--run-dir", str(run_dir), *ARGS]
    proc = start_trainer(args, nproc=2, log_dir=tmp_path, recsys=how.endswith("recsys train"))
    try:
        _trained_to(run_dir, 15, proc)
        if how.startswith("SIGTERM"):
            proc.send_signal(signal.SIGTERM)  # what Kubernetes does to the pod's main process
        else:  # one rank alone, as `scancel --signal USR1` of one task would
            ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            rank0 = json.loads((run_dir / ".lock").read_text())["pid"]
            (rank1,) = [int(p) for p in ranks if int(p) != rank0]
            subprocess.run(["kill", "-USR1", str(rank1)], check=True)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    found = re.search(r"preempted \((SIGTERM|SIGUSR1)\) at step (\d+): checkpoint (\S+) ", out)
    assert found, (out[-2000:], err[-3000:])
    step = int(found.group(2))
    assert found.group(1) == how.split()[0] and 15 <= step < 124
    assert locate(run_dir).name == f"step-{step:08d}" and found.group(3) == str(locate(run_dir))
    assert f"exitcode: {128 + getattr(signal, how.split()[0])}" in err or how.startswith("SIGTERM")
    if how.endswith("recsys train"):  # the agent is recsys itself: 143, no traceback, no report
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "summary.json").exists()

    resumed = torchrun(data, run_dir)  # the same command
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {locate(run_dir).parent / f'step-{step:08d}'} (step {step}," in resumed.stdout
    assert_same_run(clean, run_dir, resumed_at=step)


CHAOS_SEED = 20261202
"""Seeds the chaos test's steps and ranks (a failure message names it; change it to explore)."""


def test_chaos_one_run_hit_three_ways_ends_like_the_uninterrupted_run(data, clean, tmp_path):
    """The same command run again after each hit: a SIGKILLed rank, SIGTERM to torchrun, a rank
    that fails inside a save; at random steps and ranks. The run that finally completes has the
    clean run's metrics, weights and optimizer state."""
    rng = random.Random(CHAOS_SEED)
    run_dir, args = tmp_path / "run", ["--data", str(data), "--run-dir", str(tmp_path / "run"), *ARGS]
    seen = f"seed {CHAOS_SEED}"

    kill_step, kill_rank = rng.randrange(12, 40), rng.randrange(2)
    killed = torchrun(data, run_dir, fault=f"kill@{kill_step}:{kill_rank}")
    assert killed.returncode != 0 and f"rank {kill_rank} kills itself (SIGKILL) after step {kill_step}" in (
        killed.stdout
    ), (seen, killed.stderr[-3000:])

    proc = start_trainer(args, nproc=2, log_dir=tmp_path / "preempted")
    try:
        _trained_to(run_dir, kill_step + rng.randrange(5, 20), proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = (tmp_path / "preempted" / "out").read_text()
    found = re.search(r"preempted \(SIGTERM\) at step (\d+)", out)
    assert found, (seen, out[-2000:], (tmp_path / "preempted" / "err").read_text()[-3000:])
    preempted = int(found.group(1))
    assert locate(run_dir).name == f"step-{preempted:08d}", seen  # saved at the signal

    save_step, save_rank = (preempted // 10 + rng.randrange(1, 3)) * 10, rng.randrange(2)
    assert save_step < 124, seen
    crashed = torchrun(data, run_dir, fault=f"save@{save_step}:{save_rank}")
    assert f"RECSYS_FAULT: rank {save_rank} fails inside the save of step {save_step}" in crashed.stderr, (
        seen,
        crashed.stderr[-3000:],
    )

    finished = torchrun(data, run_dir)
    assert finished.returncode == 0, (seen, finished.stderr[-4000:])
    assert_same_run(clean, run_dir, resumed_at=preempted)


# ---- what else a checkpoint of a sharded run is good for -----------------------------------------


class NotData:
    """Anything a pickle could smuggle into a model file."""


def test_export_and_predict_reproduce_the_trainers_test_metrics(data, clean, tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    from trainer.checkpoint import CheckpointError
    from trainer.tools.export import load_model_file

    model_file = tmp_path / "models" / "clean.pt"
    exported = run_recsys("export", str(clean), "--out", str(model_file))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "step-00000124" in exported.stdout
    blob = torch.load(model_file, weights_only=True)  # plain tensors, strings and numbers only
    assert blob["format"] == "recsys-trainer model" and blob["step"] == 124
    table = blob["state_dict"]["model.sparse_arch.embedding_bag_collection.embedding_bags.t_cat_25.weight"]
    assert type(table) is torch.Tensor and table.shape == (2000, 8)  # whole, not a shard

    preds = tmp_path / "preds.parquet"
    scored = run_recsys(
        "predict", "--model", str(model_file), "--data", str(data), "--split", "test", "--out", str(preds)
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    import pyarrow.parquet as pq

    out = pq.read_table(preds)
    assert out.column_names == ["row", "label", "prediction", "logit"] and out.num_rows == 2000
    assert out.column("row").to_pylist() == list(range(2000))
    auc = binary_auroc(
        torch.tensor(out.column("prediction").to_numpy()), torch.tensor(out.column("label").to_numpy()).long()
    ).item()
    summary = json.loads((clean / "summary.json").read_text())
    assert auc == pytest.approx(summary["test"]["auc"], abs=1e-5)  # one CPU process scores as the 2 sharded ranks did
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left

    best = run_recsys("export", str(clean), "--best", "--out", str(tmp_path / "models" / "best.pt"))
    assert best.returncode == 0, best.stderr[-3000:]
    best_blob = torch.load(tmp_path / "models" / "best.pt", weights_only=True)
    assert best_blob["step"] == summary["best_valid_step"] and best_blob["valid"] == summary["best_valid"]

    unsafe = tmp_path / "unsafe.pt"
    torch.save({**blob, "extra": NotData()}, unsafe)
    with pytest.raises(CheckpointError, match="not a readable model file"):
        load_model_file(unsafe)  # weights_only: the class is never imported nor built


def _grown_dataset(data: Path, root: Path) -> dict:
    """`data` with one more sparse column (`extra`, 50 ids) and cat_3's id space doubled."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = json.loads((data / "dataset.json").read_text())
    rng = np.random.default_rng(0)
    for info in raw["splits"].values():
        (root / info["path"]).mkdir(parents=True)
        for file in sorted((data / info["path"]).glob("*.parquet")):
            table = pq.read_table(file)
            table = table.append_column("extra", pa.array(rng.integers(0, 50, table.num_rows)))
            pq.write_table(table, root / info["path"] / file.name, row_group_size=1024)
    grown = {}
    for feature in raw["sparse"]:
        if feature["name"] == "cat_3":
            grown = {"before": feature["num_embeddings"], "after": 2 * feature["num_embeddings"]}
            feature["num_embeddings"] = grown["after"]
    raw["sparse"].append({"name": "extra", "num_embeddings": 50, "multi_hot": False})
    (root / "dataset.json").write_text(json.dumps(raw))
    return grown


def test_init_from_copies_grown_tables_and_initialises_new_ones(data, clean, tmp_path):
    grown = _grown_dataset(data, tmp_path / "data")
    run_dir = tmp_path / "run"
    # Learning rates 0: the weights the run saves at its end are the ones it started from.
    args = ["--data", str(tmp_path / "data"), "--run-dir", str(run_dir), *ARGS, "--checkpoint.init_from", str(clean)]
    result = run_trainer(
        [*args, "--optimizer.dense_lr", "0", "--optimizer.sparse_lr", "0", "--training.max_steps", "1"]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = result.stdout
    assert f"init_from {clean / 'checkpoints' / 'step-00000124'}" in report and "optimizer fresh, step 0" in report
    assert f"resized t_cat_3: {grown['before']} -> {grown['after']} rows ({grown['before']} copied" in report
    assert "new (initialised): t_extra [50, 8]" in report
    # DLRM's top MLP reads every pair of features: one more feature, a wider first layer
    assert "re-initialised: model.over_arch.model.0._mlp.0._linear.weight" in report

    before, after = checkpoint_tensors(locate(clean)), checkpoint_tensors(locate(run_dir))
    table = "model.sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
    assert torch.equal(after[table.format("t_cat_3")][: grown["before"]], before[table.format("t_cat_3")])
    assert after[table.format("t_cat_3")][grown["before"] :].abs().sum() > 0  # new rows: initialised, not zero
    assert after[table.format("t_extra")].shape == (50, 8)
    same = [k for k in before if k in after and before[k].shape == after[k].shape]
    assert len(same) == len(before) - 2  # all but t_cat_3 and the top MLP's first layer
    assert all(torch.equal(before[k], after[k]) for k in same)


def test_data_and_checkpoints_on_s3_survive_a_crash_inside_a_save_and_resume_bit_identical(data, clean, tmp_path, s3):
    """Object stores have no rename: the save writes step-N/ in place and checkpoint.json last."""
    from data_pipeline.storage import location, read_table, refresh
    from tests.helpers.object_store import upload

    remote_data = upload(data, "datasets/synthetic")
    checkpoints = "s3://recsys/runs/ckpt"
    run_dir = tmp_path / "run"
    args = ["--data", remote_data, "--checkpoint.dir", checkpoints]
    crashed = run_trainer([*args, "--run-dir", str(run_dir), *ARGS], nproc=2, timeout=300, fault="save@30:1")
    assert crashed.returncode != 0 and "fails inside the save of step 30" in crashed.stderr, crashed.stderr[-3000:]
    half = locate(checkpoints).parent / "step-00000030"
    assert any(half.glob("__1_*.distcp")) and not (half / "checkpoint.json").exists()
    assert locate(checkpoints).name == "step-00000020"

    resumed = run_trainer([*args, "--run-dir", str(run_dir), *ARGS], nproc=2, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {checkpoints}/step-00000020 (step 20" in resumed.stdout
    refresh(half)  # this process listed it before the run
    steps = [p for p in half.parent.iterdir() if p.name.startswith("step-")]
    assert steps and all((p / "checkpoint.json").exists() for p in steps)  # nothing half-written is left
    a, b = (json.loads((d / "summary.json").read_text()) for d in (clean, run_dir))
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert records(clean) == records(run_dir)
    last = locate(checkpoints)
    assert str(last) == f"{checkpoints}/step-00000124"
    for part in ("model", "optim"):
        ta, tb = checkpoint_tensors(locate(clean), part), checkpoint_tensors(last, part)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    # serving from the bucket: a model file exported there, predictions and an evaluation written there
    from trainer.tools.evaluate import evaluate
    from trainer.tools.export import export, predict

    export(checkpoints, "s3://recsys/models/m.pt")
    remote = predict("s3://recsys/models/m.pt", remote_data, "test", "s3://recsys/preds/test.parquet")
    export(clean, tmp_path / "m.pt")
    local = predict(tmp_path / "m.pt", data, "test", tmp_path / "test.parquet")
    assert remote == local and remote["rows"] > 0
    assert read_table(location("s3://recsys/preds/test.parquet")).equals(read_table(tmp_path / "test.parquet"))
    result, out = evaluate(checkpoints, remote_data, out="s3://recsys/eval")
    assert str(out) == "s3://recsys/eval" and json.loads((out / "metrics.json").read_text()) == json.loads(
        json.dumps(result)
    )
    assert result["overall"]["auc"] == pytest.approx(local["auc"], abs=1e-6)
