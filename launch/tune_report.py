"""What a `recsys tune` study leaves in its run directory: one line per trial, trials.csv,
search.png, best.toml, and the summary with the selected config's single test (launch/tune.py runs
the study)."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic
from launch import tune_space
from trainer.config import toml_value
from trainer.headline import Headline

ERROR_LINE = re.compile(r"^(error\b|\w+(Error|Exception)\b)", re.IGNORECASE)
"""A line that states the error: the trainer's `error: ...`, or an exception's last line."""


def error_line(tail: str) -> str:
    """The line of a log tail that says what went wrong (the trainer's `error...` line, an
    exception's last line), else its last line."""
    lines = [line.strip() for line in tail.strip().splitlines() if line.strip()]
    return next((line for line in reversed(lines) if ERROR_LINE.match(line)), lines[-1] if lines else "")


def shown(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def trial_line(trial: Any, metric: str) -> str:
    """One line per trial: number, state, value, time, parameters."""
    state = trial.state.name.lower()
    seconds = f"{trial.duration.total_seconds():.0f} s" if trial.duration else "-"
    if state == "complete":
        outcome = f"{metric} {trial.value:.4f}"
    elif state == "pruned" and "last_valid" in trial.user_attrs:
        outcome = f"{metric} {trial.user_attrs['last_valid']:.4f} when pruned"
    elif state == "fail":
        outcome = f"({error_line(trial.user_attrs.get('error') or '')[:200] or 'no output'})"
    else:
        outcome = ""
    return f"trial {trial.number:>3}  {state:<8} {outcome:<24} {seconds:>6}  {tune_space.compact(trial.params)}"


def write_trials_csv(trials: list, path: Path) -> None:
    names = [k.name for k in tune_space.SPACE if any(k.name in t.params for t in trials)]
    head = ["number", "state", "value", "last_valid", "best_valid_step", "duration_s", *names]
    rows = []
    for t in trials:
        seconds = round(t.duration.total_seconds(), 1) if t.duration else None
        attrs = t.user_attrs
        row = [t.number, t.state.name, t.value, attrs.get("last_valid"), attrs.get("best_valid_step"), seconds]
        rows.append([shown(v) for v in row] + [shown(t.params.get(n)) for n in names])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        writer.writerows(rows)


def plot_search(trials: list, headline: Headline, path: Path) -> None:
    """The objective per trial (completed: dots; pruned: crosses at their last validation) and the
    best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and "last_valid" in t.user_attrs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter([t.number for t in done], [t.value for t in done], label="completed", zorder=3)
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.user_attrs["last_valid"] for t in pruned],
            marker="x",
            color="grey",
            label="pruned (last validation)",
        )
    best, xs, ys = None, [], []
    for t in done:
        if headline.better(t.value, best):
            best = t.value
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    direction = "higher" if headline.higher_is_better else "lower"
    ax.set_ylabel(f"valid {headline.name} (best of the trial)")
    ax.set_title(f"recsys tune: valid {headline.name} per trial ({direction} is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_best_toml(best: Any, run_dir: Path, study_name: str, metric: str, nproc: int) -> tuple[Path, str]:
    """best.toml: the best trial's resolved config with run_dir R/best; (path, where it came from)."""
    source = Path(best.user_attrs.get("run_dir", "")) / "config.toml"
    best_dir = run_dir / "best"
    if source.is_file():
        text, origin = source.read_text(), str(source)
    else:  # the trial ran on another machine (shared storage): resolve its flags here
        from trainer.config import load_config

        text, origin = load_config(best.user_attrs["args"]).to_toml(), "its flags (config.toml is not on this machine)"
    text = re.sub(r"^run_dir = .*$", lambda _: f"run_dir = {toml_value(str(best_dir))}", text, count=1, flags=re.M)
    path = run_dir / "best.toml"
    header = (
        f"# recsys tune: the best trial of study '{study_name}', trial {best.number} (valid {metric} "
        f"{best.value:.6g}),\n# its resolved config ({origin}) with run_dir {best_dir}. Retrain it:\n"
        f"#   recsys train --config {path} --nproc-per-node {nproc}\n"
    )
    write_text_atomic(path, header + text)
    return path, origin


def report(study: Any, tune: Any) -> int:
    """Write trials.csv, search.png and best.toml; print the summary and the selected config's test."""
    from trainer.numbers import format_metrics

    trials = sorted(study.trials, key=lambda t: t.number)
    run_dir, metric = tune.run_dir, tune.headline.name
    write_trials_csv(trials, run_dir / "trials.csv")
    plot_search(trials, tune.headline, run_dir / "search.png")
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    print(f"\nstudy '{study.study_name}': {len(trials)} trials ({counts}); in {run_dir}: trials.csv, search.png")
    if not states["COMPLETE"]:
        print("error: no trial completed; see the trials' train.log under " + str(run_dir / "trials"), file=sys.stderr)
        return 1
    best = study.best_trial
    direction = "higher" if tune.headline.higher_is_better else "lower"
    print(f"best: trial {best.number}, valid {metric} {best.value:.4f} ({direction} is better)")
    print(f"  {tune_space.compact(best.params)}")
    path, _ = write_best_toml(best, run_dir, study.study_name, metric, tune.nproc)
    print(f"  config: {path}  (recsys train --config {path} --nproc-per-node {tune.nproc})")
    summary_path = Path(best.user_attrs.get("run_dir", "")) / "summary.json"
    if not summary_path.is_file():
        host = best.user_attrs.get("host")
        print(f"test of the selected config: {summary_path} is not on this machine (the trial ran on {host})")
        return 0
    summary = json.loads(summary_path.read_text())
    step = summary.get("test_weights_step")
    print(
        f"test of the selected config (trial {best.number}, scored once, weights of step {step}): "
        f"{format_metrics(summary.get('test') or {})}"
    )
    return 0
