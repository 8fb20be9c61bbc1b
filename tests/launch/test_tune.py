"""`recsys tune` (launch/tune.py, launch/tune_space.py): the search space builds valid trainer
configs for every model family, a running trial's metrics.jsonl is read and reported to Optuna as
the trainer appends it, a pruned trial's process group is stopped, bad input is one `error:` line,
and a real study (2 trials, then resumed to 3) leaves study.db, best.toml, trials.csv, search.png."""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import optuna
import pytest

from launch import tune, tune_space
from tests.helpers.data import synthetic
from tests.helpers.runs import ROOT, run_recsys
from trainer.config import load_config

optuna.logging.set_verbosity(optuna.logging.ERROR)


# ---- the space --------------------------------------------------------------------------------
def test_the_space_covers_every_registered_model():
    from models import MODELS

    assert set(tune_space.ALL) == set(MODELS)


@pytest.mark.parametrize("model", tune_space.ALL)
def test_every_sampled_config_is_a_valid_trainer_config(model):
    """Random draws of each family's space parse as trainer flags and pass the model's checks
    (dlrm: the bottom MLP ends in embedding_dim, the top one in 1)."""
    knobs = tune_space.knobs_for(model, set(), train_rows=1_000_000, nproc=2)
    defaults = tune.flatten(load_config(["--model", model]))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = tune_space.sample(trial, knobs)
        cfg = load_config(["--model", model, *tune_space.trainer_flags(params, defaults)])
        if hasattr(cfg.model, "check"):
            cfg.model.check()
        for name, value in params.items():
            knob, _, index = name.partition("[")
            held = tune.flatten(cfg)[knob]
            if index:
                assert held[int(index.rstrip("]"))] == value
            elif isinstance(value, str):
                assert held == [int(v) for v in value.split()]
            else:
                assert held == value
        if model in tune_space.DLRM:
            assert cfg.model.dense_arch_layer_sizes[-1] == cfg.model.embedding_dim
            assert cfg.model.over_arch_layer_sizes[-1] == 1
        study.tell(trial, 0.0)


def test_knobs_the_user_sets_are_not_sampled():
    fixed = tune_space.given_knobs("--optimizer.dense_lr 0.01 --model.deep_layer_sizes=64 --data x".split())
    assert fixed == {"optimizer.dense_lr", "model.deep_layer_sizes", "data.path"}
    names = {k.name for k in tune_space.knobs_for("deepfm", fixed, None, 1)}
    assert "optimizer.dense_lr" not in names and "model.deep_layer_sizes" not in names
    assert {"optimizer.sparse_lr", "model.dropout", "model.embedding_dim"} <= names
    # dlrm's bottom MLP ends in the embedding size: fixing the MLP fixes the size too
    names = {k.name for k in tune_space.knobs_for("dlrm", {"model.dense_arch_layer_sizes"}, None, 1)}
    assert "model.embedding_dim" not in names and "model.dense_arch_layer_sizes[0]" not in names
    assert "model.dropout" not in {k.name for k in tune_space.knobs_for("dlrm", set(), None, 1)}


def test_batch_sizes_fit_the_train_split():
    choices = (64, 128, 256, 512, 1024, 2048, 4096)
    assert tune_space.batch_choices(None, 8, choices) == choices
    assert tune_space.batch_choices(100_000, 2, choices) == (64, 128, 256, 512, 1024, 2048)  # <= 2500
    assert tune_space.batch_choices(2400, 1, choices) == (64,)  # <= 120
    assert tune_space.batch_choices(800, 2, choices) == (16,)  # none fits: the largest power of two that does


def test_docs_show_the_current_space():
    text = tune_space.table()
    assert all(f"`{k.name}`" in text for k in tune_space.SPACE)
    assert text in (ROOT / "docs" / "tuning.md").read_text(), "docs/tuning.md: paste launch.tune_space.table()"


def test_trial_defaults_give_way_to_the_users_flags_and_config(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text("[training]\nepochs = 5\n")
    extra = ["--config", str(base), "--training.early_stopping_patience", "9", "--derive_defaults", "false"]
    t = tune.Tune("dlrm", "d", 2, tmp_path, extra, [], {"derive_defaults": False}, tune.headline("binary"), 8000)
    args = t.trial_args(tmp_path / "trials" / "0", {"optimizer.dense_lr": 0.01, "data.batch_size": 100})
    assert args[args.index("--training.eval_every") + 1] == "10"  # 4 validations an epoch of 40 steps
    assert args.count("--training.epochs") == 0 and args.count("--training.early_stopping_patience") == 1
    assert args[args.index("--training.keep_best") + 1] == "true"
    assert args[args.index("--optimizer.dense_lr") + 1] == "0.01"
    assert args[-len(extra) :] == extra  # the user's flags last: they win
    # a trainer that derives epochs, early stopping and keep-best from the data chooses them itself
    t.defaults, t.extra = {"derive_defaults": True, "data.batch_size": 2000}, ["--training.eval_every", "7"]
    args = t.trial_args(tmp_path / "trials" / "0", {})
    assert args.count("--training.eval_every") == 1
    assert not set(tune.DERIVED_BY_TRAINER) & {a[2:] for a in args}
    assert args[args.index("--training.progress_bar") + 1] == "false"


# ---- a running trial --------------------------------------------------------------------------
def test_metrics_tail_reads_new_complete_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = tune.MetricsTail(path)
    assert tail.read() == []  # not written yet
    record = {"phase": "valid", "step": 10, "epoch": 0, "auc": 0.6}
    path.write_text(json.dumps({"phase": "train", "step": 5, "loss": 0.7}) + "\n" + json.dumps(record) + "\n")
    assert tail.read() == [record]
    assert tail.read() == []
    second = json.dumps({"phase": "valid", "step": 20, "auc": 0.65})
    with path.open("a") as f:
        f.write(second[:15])  # half a line: left for the next read
    assert tail.read() == []
    with path.open("a") as f:
        f.write(second[15:] + "\n")
    assert [r["step"] for r in tail.read()] == [20]
    path.write_text(json.dumps({"phase": "valid", "step": 10, "auc": 0.61}) + "\n")  # cut back (a resumed run)
    assert [r["auc"] for r in tail.read()] == [0.61]


def test_reporter_reports_each_validation_and_prunes_a_poor_trial(tmp_path):
    """Three trials reach auc 0.8 by their 2nd validation; a 4th at 0.55 is pruned there (median
    pruner: after 3 trials, not at the first validation), by validation index, not trainer step."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(**tune.PRUNER))
    for _ in range(3):
        good = study.ask()
        for k, value in enumerate((0.7, 0.8, 0.82)):
            good.report(value, k)
        study.tell(good, 0.82)
    trial = study.ask()
    path = tmp_path / "metrics.jsonl"
    reporter = tune.Reporter(trial, tune.MetricsTail(path), "auc")
    assert reporter.poll() is False  # nothing yet
    with path.open("a") as f:
        f.write(json.dumps({"phase": "valid", "step": 40, "auc": 0.55}) + "\n")
        f.write(json.dumps({"phase": "tables", "step": 40, "auc": 0.0}) + "\n")  # other records: ignored
    assert reporter.poll() is False  # the first validation is never pruned
    with path.open("a") as f:
        f.write(json.dumps({"phase": "valid", "step": 80, "auc": 0.56}) + "\n")
    assert reporter.poll() is True
    assert reporter.reported == [(40, 0.55), (80, 0.56)]
    assert study.trials[-1].intermediate_values == {0: 0.55, 1: 0.56}


def test_objective_is_the_best_validation_never_the_test():
    summary = {"best_valid": {"auc": 0.71}, "valid": {"auc": 0.69}, "test": {"auc": 0.99}}
    assert tune.objective_value(summary, "auc") == 0.71
    assert tune.objective_value({"valid": {"auc": 0.69}, "test": {"auc": 0.99}}, "auc") == 0.69
    assert tune.objective_value({"test": {"auc": 0.99}}, "auc") is None


def test_a_pruned_trial_is_stopped_with_its_whole_process_group(tmp_path):
    """The trial command's children (torchrun's ranks) go too."""
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    polls = []

    def poll() -> bool:
        polls.append(time.monotonic())
        return child_pid.is_file() and child_pid.read_text() != ""

    start = time.monotonic()
    code = tune.run_trial([sys.executable, "-c", script], tmp_path / "train.log", poll, interval_s=0.2)
    assert code is None and time.monotonic() - start < 20
    pid = int(child_pid.read_text())
    for _ in range(50):  # the child is gone (reaped by init) shortly after the group's SIGTERM
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {pid} of the pruned trial still runs")
    assert "started" in (tmp_path / "train.log").read_text()
    # a command that ends by itself: its exit status, polled once more at the end
    assert tune.run_trial([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "b.log", lambda: False) == 3


# ---- the command line -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "dlrm", "--data", "{missing}", "--trials", "2"], "does not exist"),
        (["--model", "nope", "--data", "{data}", "--trials", "2"], "unknown model 'nope'"),
        (["--model", "dlrm", "--data", "{data}", "--trials", "0"], "--trials must be at least 1"),
        (["--model", "dlrm", "--data", "{data}", "--trials", "2", "--", "--data", "x"], "not after --"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, flags, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text("{}")
    flags = [f.format(missing=tmp_path / "missing", data=data) for f in flags]
    code = tune.main([*flags, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


FAKE_TRAINER = """
import json, sys, time
from pathlib import Path

args = sys.argv[1:]
run = Path(args[args.index("--run-dir") + 1])
number = int(run.name)
if number == 4 or "--training.seed" in args:
    print("error (rank 0): a bad trial")
    sys.exit(2)
run.mkdir(parents=True, exist_ok=True)
lr = args[args.index("--optimizer.dense_lr") + 1]
(run / "config.toml").write_text(f'config = ""\\nrun_dir = "{{run}}"\\n\\n[optimizer]\\ndense_lr = {{lr}}\\n')
values = {{3: [0.5, 0.5], 5: [0.7, 0.9, 0.85]}}.get(number, [0.7, 0.8, 0.8])
with (run / "metrics.jsonl").open("a") as f:
    for k, auc in enumerate(values):
        f.write(json.dumps({{"phase": "valid", "step": 10 * (k + 1), "epoch": k, "auc": auc}}) + "\\n")
        f.flush()
        time.sleep(0.1)
if number == 3:
    time.sleep(120)  # pruned after its 2nd validation: stopped long before this ends
best = max(values)
summary = {{"headline": {{"metric": "auc", "higher_is_better": True}}, "best_valid": {{"auc": best}},
           "valid": {{"auc": values[-1]}}, "test": {{"auc": 0.123}}, "test_weights_step": 20}}
(run / "summary.json").write_text(json.dumps(summary))
"""


def test_a_study_of_fake_trials_prunes_fails_selects_on_valid(tmp_path, monkeypatch, capsys):
    """The whole study with a stand-in for the trainer (fast, deterministic by trial number): trials
    0-2 reach auc 0.8, 3 falls behind and is pruned at its 2nd validation (its process stopped), 4
    fails, 5 is the best (0.9); the selected config's test is the one printed."""
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.format())
    monkeypatch.setattr(tune.Tune, "command", lambda self, args: [sys.executable, str(fake), *args])
    monkeypatch.setattr(tune, "POLL_S", 0.2)
    data = tmp_path / "data"
    synthetic(data, rows=500, files=1, row_group_rows=100)
    run_dir = tmp_path / "tune"
    code = tune.main(["--model", "dlrm", "--data", str(data), "--run-dir", str(run_dir), "--trials", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"], out
    assert float(rows[3]["duration_s"]) < 60  # stopped, not waited for (it sleeps 120 s)
    assert rows[3]["last_valid"] == "0.5" and rows[5]["value"] == "0.9"
    assert "error (rank 0): a bad trial" in out  # the failed trial's line says why
    assert "auc 0.5000 when pruned" in out
    assert "best: trial 5, valid auc 0.9000" in out
    assert "scored once, weights of step 20): auc 0.1230" in out
    best = load_config(["--config", str(run_dir / "best.toml")])
    assert best.run_dir == str(run_dir / "best")
    assert f"{best.optimizer.dense_lr!r}" == rows[5]["optimizer.dense_lr"] or best.optimizer.dense_lr == pytest.approx(
        float(rows[5]["optimizer.dense_lr"]), rel=1e-5
    )
    # 5 finished trials (complete or pruned): the same command again has nothing to run
    assert tune.main(["--model", "dlrm", "--data", str(data), "--run-dir", str(run_dir), "--trials", "5"]) == 0
    assert "5 finished trial(s), 0 to run" in capsys.readouterr().out
    # another model is another study
    assert tune.main(["--model", "deepfm", "--data", str(data), "--run-dir", str(run_dir), "--trials", "5"]) == 2
    assert "searches model dlrm, not deepfm" in capsys.readouterr().err
    # a run directory holds one study's trials
    flags = ["--model", "dlrm", "--data", str(data), "--study", "failing", "--trials", "9"]
    assert tune.main([*flags, "--run-dir", str(run_dir)]) == 2
    assert "holds the trials of study 'tune'" in capsys.readouterr().err
    # a study whose every trial fails stops after MAX_FAILS_IN_A_ROW of them
    assert tune.main([*flags, "--run-dir", str(tmp_path / "failing"), "--", "--training.seed", "1"]) == 1
    captured = capsys.readouterr()
    assert f"stopping: {tune.MAX_FAILS_IN_A_ROW} trials in a row failed" in captured.out
    assert captured.out.count(" fail ") == tune.MAX_FAILS_IN_A_ROW
    assert captured.err.startswith("error: no trial completed")


@pytest.mark.slow
def test_tune_runs_trials_writes_its_outputs_and_resumes(tmp_path):
    """2 real trials (1 rank, 1 epoch), then the same command with --trials 3 runs exactly one more."""
    data = tmp_path / "data"
    synthetic(data, rows=2000, files=1, row_group_rows=200)
    run_dir = tmp_path / "tune"
    common = ["--model", "deepfm", "--data", str(data), "--run-dir", str(run_dir), "--nproc-per-node", "1"]
    extra = ["--", "--training.epochs", "1"]

    start = time.perf_counter()
    result = run_recsys("tune", *common, "--trials", "2", *extra)
    first_s = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "0 finished trial(s), 2 to run" in out
    assert out.count(" complete ") == 2, out
    assert "test of the selected config (trial" in out
    for name in ("study.db", "best.toml", "trials.csv", "search.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "search.png").read_bytes()[:4] == b"\x89PNG"

    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1"] and {r["state"] for r in rows} == {"COMPLETE"}
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{run_dir / 'study.db'}")
    best = study.best_trial
    summary = json.loads((run_dir / "trials" / str(best.number) / "summary.json").read_text())
    assert best.value == pytest.approx(summary["best_valid"]["auc"])  # selected on valid

    cfg = load_config(["--config", str(run_dir / "best.toml")])
    assert cfg.run_dir == str(run_dir / "best")
    assert cfg.model.name == "deepfm" and cfg.data.path == str(data)
    assert cfg.optimizer.dense_lr == best.params["optimizer.dense_lr"]
    assert cfg.optimizer.sparse_lr == best.params["optimizer.sparse_lr"]
    assert cfg.data.batch_size == best.params["data.batch_size"]
    assert cfg.model.embedding_dim == best.params["model.embedding_dim"]
    assert cfg.model.deep_layer_sizes == [int(v) for v in best.params["model.deep_layer_sizes"].split()]
    assert cfg.model.dropout == best.params["model.dropout"]
    assert cfg.training.epochs == 1 and cfg.training.progress_bar is False

    start = time.perf_counter()
    result = run_recsys("tune", *common, "--trials", "3", *extra)
    second_s = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 finished trial(s), 1 to run" in result.stdout
    assert result.stdout.count(" complete ") == 1, result.stdout
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "trials").iterdir()) == ["0", "1", "2"]
    assert len(list(csv.DictReader((run_dir / "trials.csv").open()))) == 3
    print(f"tune: 2 trials in {first_s:.0f} s, resumed 1 more in {second_s:.0f} s")
