"""`recsys tune`: hyperparameter search with Optuna, each trial a real training run.

    recsys tune --model deepfm --data data/criteo --nproc-per-node 8 --trials 40 [--timeout S]
                [--run-dir R] [--storage URL] [--study NAME] [--seed S] [-- extra trainer flags]

A trial samples the model family's knobs (launch/tune_space.py), then runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m trainer --model M --data D
--run-dir R/trials/<n> <sampled flags> <TRIAL_DEFAULTS> <extra flags>` in a process group of its
own. While it trains, each new "valid" record of its metrics.jsonl is reported to Optuna (step k:
the trial's k-th validation), and the median pruner may stop it (SIGTERM to the group, then
SIGKILL). The objective is the trial's best validation headline (auc, rmse or recall@K:
trainer/headline.py); test metrics never take part in the selection. The study (TPE, seeded) lives
in R/study.db, or any Optuna RDB storage (--storage), and rerunning the same command resumes it.

Outputs in R: best.toml (the best trial's resolved config, run_dir R/best: `recsys train
--config R/best.toml` retrains it), trials.csv, search.png; then the single test of the selected
config (the best trial's own test, scored with its best validation's weights) is printed.
See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic
from launch import tune_space
from launch.tune_report import report, trial_line
from trainer.headline import Headline, headline

TRIAL_DEFAULTS: dict[str, str] = {
    "training.epochs": "20",
    "training.keep_best": "true",
    "training.early_stopping_patience": "6",
    "training.progress_bar": "false",
    "checkpoint.enabled": "false",
}
"""Flags every trial gets unless the user sets the knob (after `--`, or in a `--config` TOML given
there): enough epochs, early stopping (6 validations: 1.5 epochs at EVALS_PER_EPOCH), the test
scored with the best validation's weights, no progress bar in the logs, and no checkpoints (a
trial is not resumed; R/best is retrained from best.toml)."""
DERIVED_BY_TRAINER = ("training.epochs", "training.keep_best", "training.early_stopping_patience")
"""The TRIAL_DEFAULTS a trainer that derives its defaults from the data (`derive_defaults`, on)
chooses itself: not forced then. Once every trainer does, drop them from TRIAL_DEFAULTS."""

EVALS_PER_EPOCH = 4
"""Trials validate this many times an epoch (`training.eval_every` from the train rows, the trial's
batch size and the ranks, unless the user sets it): the pruner compares trials at their k-th
validation, so k means the same share of an epoch in every trial, whatever its batch size."""

PRUNER = dict(n_startup_trials=3, n_warmup_steps=1)
"""Median pruning: no trial is stopped before 3 trials have completed, nor at its first validation."""
KILL_GRACE_S = 15.0
"""Seconds a pruned trial's processes get to exit after SIGTERM before SIGKILL."""
POLL_S = 1.0
"""How often a running trial's metrics.jsonl is read."""
ERROR_TAIL_LINES = 15
FINISHED = ("COMPLETE", "PRUNED")
"""Trial states that count toward --trials: a failed trial is replaced by another."""
MAX_FAILS_IN_A_ROW = 3
"""Stop the search after this many failed trials in a row (something is wrong with every trial),
or after as many failures in all as --trials (or this, if more)."""


class TuneError(Exception):
    """Bad input: one `error:` line, exit status 2."""


class TrialFailed(Exception):
    """A trial's training run exited non-zero (or left no validation): the trial fails, the study goes on."""


# ---- reading a running trial ------------------------------------------------------------------
class MetricsTail:
    """The records a trainer appends to its metrics.jsonl, read as they come: each `read()` returns
    the complete lines added since the last one (a half-written last line waits for the next)."""

    def __init__(self, path: str | Path, phase: str = "valid") -> None:
        self.path, self.phase = Path(path), phase
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # cut back (a resumed run drops a failed attempt's records): start over
            self.offset = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in chunk[:end].splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("phase") == self.phase:
                records.append(record)
        return records


class Reporter:
    """Reports each new validation of a trial to Optuna (step k: its k-th validation with the
    metric) and says whether the pruner wants the trial stopped."""

    def __init__(self, trial: Any, tail: MetricsTail, metric: str) -> None:
        self.trial, self.tail, self.metric = trial, tail, metric
        self.reported: list[tuple[int, float]] = []
        """(trainer step, value) of each validation reported."""

    def poll(self) -> bool:
        """Read and report the new validations; True if the trial should be pruned."""
        new = False
        for record in self.tail.read():
            value = record.get(self.metric)
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            self.trial.report(float(value), len(self.reported))
            self.reported.append((int(record.get("step", 0)), float(value)))
            new = True
        return new and bool(self.trial.should_prune())


# ---- running a trial --------------------------------------------------------------------------
def stop_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL after `grace_s` seconds if it is still there."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_trial(cmd: list[str], log_path: Path, poll: Callable[[], bool], interval_s: float | None = None) -> int | None:
    """Run `cmd` in its own process group, output to `log_path`, calling `poll` every `interval_s`
    (default POLL_S; and once more at the end); stops the group when `poll` says so. Returns the
    exit status, or None when stopped."""
    interval_s = interval_s or POLL_S
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                try:
                    code = proc.wait(timeout=interval_s)
                except subprocess.TimeoutExpired:
                    if poll():
                        stop_group(proc)
                        return None
                    continue
                poll()  # the last validations (the pruner may use them for later trials)
                return code
        finally:
            if proc.poll() is None:  # an exception here (Ctrl-C): leave nothing running
                stop_group(proc)


TORCHRUN_TRAILER = re.compile(r"torch/distributed/elastic/.*failed \(exitcode: ")
"""torchrun's line that starts its report of a failed rank (a traceback of its own and a banner)."""


def log_tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a failed trial's log before torchrun's own report of the failure."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    cut = next((i for i, line in enumerate(text) if TORCHRUN_TRAILER.search(line)), len(text))
    return "\n".join((text[:cut] or text)[-lines:])


def objective_value(summary: dict, metric: str) -> float | None:
    """The trial's best validation value of `metric`, else its last one (valid only, never test)."""
    for key in ("best_valid", "valid"):
        value = (summary.get(key) or {}).get(metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            return float(value)
    return None


# ---- the study --------------------------------------------------------------------------------
@dataclasses.dataclass
class Tune:
    """One search: what every trial shares, and the objective that runs a trial."""

    model: str
    data: str
    nproc: int
    run_dir: Path
    extra: list[str]
    knobs: list[tune_space.Knob]
    defaults: dict[str, Any]
    """The run's config without the sampled knobs, as {"section.key": value}."""
    headline: Headline
    train_rows: int | None = None
    dataset: str = ""
    """The dataset as the study records it: its name and split sizes (the path may differ between machines)."""

    def trial_args(self, trial_dir: Path, params: dict[str, Any]) -> list[str]:
        given = tune_space.given_knobs(self.extra) | config_knobs(self.extra)
        if self.defaults.get("derive_defaults"):
            given |= set(DERIVED_BY_TRAINER)
        forced = [t for knob, value in TRIAL_DEFAULTS.items() if knob not in given for t in (f"--{knob}", value)]
        if "training.eval_every" not in given and self.train_rows:
            batch = params.get("data.batch_size", self.defaults.get("data.batch_size"))
            steps = self.train_rows // self.nproc // batch
            forced += ["--training.eval_every", str(max(1, round(steps / EVALS_PER_EPOCH)))]
        sampled = tune_space.trainer_flags(params, self.defaults)
        return ["--model", self.model, "--data", self.data, "--run-dir", str(trial_dir), *sampled, *forced, *self.extra]

    def command(self, args: list[str]) -> list[str]:
        """The trial's command line: the trainer on --nproc-per-node ranks of this machine."""
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.nproc)]
        return [*torchrun, "-m", "trainer", *args]

    def objective(self, trial: Any) -> float:
        import optuna

        params = tune_space.sample(trial, self.knobs)
        trial_dir = self.run_dir / "trials" / str(trial.number)
        if trial_dir.exists():  # a trial number is new to the study: anything here is stale
            shutil.rmtree(trial_dir)
        args = self.trial_args(trial_dir, params)
        trial.set_user_attr("run_dir", str(trial_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("args", args)
        cmd = self.command(args)
        reporter = Reporter(trial, MetricsTail(trial_dir / "metrics.jsonl"), self.headline.name)
        log_path = trial_dir / "train.log"
        code = run_trial(cmd, log_path, reporter.poll)
        if reporter.reported:
            trial.set_user_attr("last_valid", reporter.reported[-1][1])
        if code is None:
            step, value = reporter.reported[-1]
            raise optuna.TrialPruned(f"at validation {len(reporter.reported)} (step {step}): {value:.4f}")
        if code != 0:
            tail = log_tail(log_path)
            trial.set_user_attr("error", tail[-2000:])
            raise TrialFailed(f"exit status {code}; log {log_path}:\n{tail}")
        summary_path = trial_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        metric = (summary.get("headline") or {}).get("metric", self.headline.name)
        value = objective_value(summary, metric)
        if value is None and reporter.reported:
            value = reporter.reported[-1][1]
        if value is None:
            raise TrialFailed(f"no validation {metric} in {summary_path} or {reporter.tail.path}")
        for key in ("best_valid_step", "steps", "stopped_early", "train_time_s"):
            if key in summary:
                trial.set_user_attr(key, summary[key])
        return value


def config_knobs(extra: list[str]) -> set[str]:
    """The knobs a `--config FILE` among the extra flags sets ("section.key")."""
    for i, flag in enumerate(extra):
        name, eq, value = flag.partition("=")
        if name in ("--config", "-c"):
            path = Path(value if eq else (extra[i + 1] if i + 1 < len(extra) else ""))
            try:
                raw = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                return set()  # the trainer reports it
            knobs = set()
            for key, value in raw.items():
                knobs |= {f"{key}.{k}" for k in value} if isinstance(value, dict) else {key}
            return knobs
    return set()


def flatten(cfg: Any) -> dict[str, Any]:
    """A Config as {"section.key": value}."""
    return cfg.knobs()


def run_headline(cfg: Any, schema: Any) -> Headline:
    """The metric the trainer will select on (what trainer/evaluator.py decides): recall@K for a
    model with towers on a dataset that lists its catalogue, else auc (binary) or rmse."""
    from trainer.catalogue import supports_retrieval

    top_k = cfg.training.top_k
    retrieval = cfg.model.name in tune_space.TOWERS and bool(top_k) and supports_retrieval(schema)
    return headline(schema.task, min(top_k) if retrieval else None)


RUN_DIR_FILE = "tune.json"
"""Names the study a run directory belongs to: its trials/<n> are that study's trial numbers."""


def public_url(url: str) -> str:
    """A storage URL as messages and files show it: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: opening the storage says so
        return url


def claim_run_dir(run_dir: Path, study: str, url: str) -> None:
    """Mark `run_dir` as the study's (TuneError if it holds another study's trials)."""
    mine = {"study": study, "storage": public_url(url)}
    path = run_dir / RUN_DIR_FILE
    if path.is_file():
        held = json.loads(path.read_text())
        if held != mine:
            raise TuneError(
                f"{run_dir} holds the trials of study '{held.get('study')}' in {held.get('storage')}; "
                "choose another --run-dir for this one"
            )
    else:
        write_text_atomic(path, json.dumps(mine, indent=2) + "\n")


def open_study(args: argparse.Namespace, run_dir: Path, direction: str, trials: int, dataset: str) -> Any:
    """The study (created, or loaded to resume), checked to be this search's (model, `dataset`,
    ranks); its sampler is seeded with --seed plus the trials it holds, so a resumed study does not
    redraw the first trials' values."""
    import optuna
    from optuna.storages import RDBStorage

    url = args.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    claim_run_dir(run_dir, args.study, url)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)
        study = optuna.create_study(storage=storage, study_name=args.study, direction=direction, load_if_exists=True)
    except Exception as e:  # a malformed URL, a missing driver, an unreachable server
        first = str(e).splitlines()[0] if str(e) else ""
        raise TuneError(f"storage {public_url(url)}: {type(e).__name__}: {first}") from None
    where = f"study '{args.study}' in {public_url(url)}"
    ours = {"model": args.model, "dataset": dataset, "nproc_per_node": args.nproc_per_node}
    for key, value in ours.items():
        held = study.user_attrs.get(key)
        if held is None:
            study.set_user_attr(key, value)
        elif held != value:
            raise TuneError(
                f"{where} searches {key} {held}, not {value}; choose another --study or --run-dir to start a new one"
            )
    if study.direction.name.lower() != direction:
        raise TuneError(f"{where} is set to {study.direction.name.lower()}, not {direction}")
    n = len(study.trials)
    study.sampler = optuna.samplers.TPESampler(
        seed=args.seed + n, multivariate=True, n_startup_trials=max(2, min(10, trials // 3))
    )
    study.pruner = optuna.pruners.MedianPruner(**PRUNER)
    return study


def finished(study: Any) -> int:
    return sum(t.state.name in FINISHED for t in study.trials)


# ---- the command line -------------------------------------------------------------------------
def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="recsys tune",
        description="Hyperparameter search (Optuna TPE + median pruning); every trial is a training run. "
        "Trainer flags after `--` go to every trial and fix those knobs.",
    )
    parser.add_argument("--model", required=True, help=f"model family: {', '.join(tune_space.ALL)}")
    parser.add_argument("--data", required=True, help="dataset directory (dataset.json + Parquet splits)")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, help="ranks per trial")
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    parser.add_argument("--run-dir", default="", help="output directory (default runs/tune-<model>)")
    parser.add_argument("--storage", default="", help="Optuna RDB storage URL (default sqlite:///<run-dir>/study.db)")
    parser.add_argument("--study", default="tune", help="study name in the storage (default tune)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    return parser.parse_args(argv[:cut]), argv[cut + 1 :]


def prepare(args: argparse.Namespace, extra: list[str]) -> Tune:
    """Check the input and resolve the run's config without the sampled knobs; TuneError if bad."""
    from data_pipeline.schema import SPLITS, DataError, DatasetSchema, check_files
    from trainer.config import load_config

    if args.trials < 1:
        raise TuneError(f"--trials must be at least 1, got {args.trials}")
    if args.nproc_per_node < 1:
        raise TuneError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.model not in tune_space.ALL:
        raise TuneError(f"unknown model '{args.model}'; choose from {', '.join(tune_space.ALL)}")
    if args.timeout is not None and args.timeout <= 0:
        raise TuneError(f"--timeout must be positive, got {args.timeout}")
    fixed = tune_space.given_knobs(extra) & {"model.name", "data.path", "run_dir"}
    if fixed:
        raise TuneError(f"set {', '.join(sorted(fixed))} with recsys tune's own flags, not after --")
    try:
        schema = DatasetSchema.load(args.data)
        for split in SPLITS:
            check_files(schema, split)
    except DataError as e:
        raise TuneError(str(e)) from None
    try:
        cfg = load_config(["--model", args.model, "--data", args.data, *extra])
    except ValueError as e:
        raise TuneError(f"trainer flags after --: {e}") from None
    run_dir = Path(args.run_dir or f"runs/tune-{args.model}")
    fixed = tune_space.given_knobs(extra) | config_knobs(extra)
    train_rows = schema.splits["train"].rows
    knobs = tune_space.knobs_for(args.model, fixed, train_rows, args.nproc_per_node)
    nproc, head = args.nproc_per_node, run_headline(cfg, schema)
    dataset = f"{schema.name} (" + ", ".join(f"{k} {v.rows}" for k, v in sorted(schema.splits.items())) + " rows)"
    return Tune(args.model, args.data, nproc, run_dir, extra, knobs, flatten(cfg), head, train_rows, dataset)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        tune = prepare(args, extra)
        tune.run_dir.mkdir(parents=True, exist_ok=True)
        direction = "maximize" if tune.headline.higher_is_better else "minimize"
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study = open_study(args, tune.run_dir, direction, args.trials, tune.dataset)
    except TuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = finished(study)
    todo = args.trials - done
    print(
        f"recsys tune: {args.model} on {args.data}, {args.nproc_per_node} rank(s) per trial; selecting on valid "
        f"{tune.headline.name} ({'higher' if tune.headline.higher_is_better else 'lower'} is better); "
        f"study '{args.study}' has {done} finished trial(s), {max(todo, 0)} to run; "
        f"trial logs: {tune.run_dir / 'trials'}/<n>/train.log",
        flush=True,
    )
    print("space: " + ", ".join(k.name for k in tune.knobs), flush=True)
    if todo > 0:
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        fails = {"in_a_row": 0, "all": 0}
        enough = tuple(TrialState[name] for name in FINISHED)

        def after_trial(study: Any, trial: Any) -> None:
            print(trial_line(trial, tune.headline.name), flush=True)
            failed = trial.state == TrialState.FAIL
            fails["in_a_row"] = fails["in_a_row"] + 1 if failed else 0
            fails["all"] += failed
            if fails["in_a_row"] >= MAX_FAILS_IN_A_ROW or fails["all"] >= max(MAX_FAILS_IN_A_ROW, todo):
                row = fails["in_a_row"] >= MAX_FAILS_IN_A_ROW
                which = f"{fails['in_a_row']} trials in a row" if row else f"{fails['all']} trials"
                print(f"stopping: {which} failed; see their train.log", flush=True)
                study.stop()

        started = time.perf_counter()
        try:
            study.optimize(
                tune.objective,
                timeout=args.timeout,
                catch=(TrialFailed,),
                # until the study holds --trials finished ones (other workers on its storage add theirs)
                callbacks=[after_trial, MaxTrialsCallback(args.trials, states=enough)],
            )
        except KeyboardInterrupt:
            print("\ninterrupted: the running trial was stopped; rerun the same command to resume", flush=True)
            report(study, tune)
            return 130
        print(f"searched for {time.perf_counter() - started:.0f} s", flush=True)
    return report(study, tune)


if __name__ == "__main__":
    sys.exit(main())
