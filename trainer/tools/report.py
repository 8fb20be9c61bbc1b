"""`recsys report RUN_DIR [--out DIR]`: a run directory -> plots and a report a team can share.

    OUT/training_curves.png          train loss and the headline validation metric vs step
    OUT/throughput.png               learning rate and samples/s vs step
    OUT/calibration_<split>.png      reliability diagram (from `recsys evaluate` predictions)
    OUT/segments_<split>_<spec>.png  headline metric and calibration per segment
    OUT/report.md                    summary and evaluation tables, the images and how to read them
    OUT/report.html                  the same in one self-contained file (images embedded)

OUT defaults to RUN_DIR/report. Only metrics.jsonl or summary.json is required: a section whose
input is missing (an older run, no `recsys evaluate` yet) becomes a one-line note.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from data_pipeline.atomic import write_atomic, write_text_atomic  # noqa: E402
from trainer.headline import Headline, headline  # noqa: E402
from trainer.numbers import format_number  # noqa: E402

DPI = 120
CURVES_SIZE = (8.0, 6.5)  # inches; two stacked panels
THROUGHPUT_SIZE = (8.0, 5.0)
CALIBRATION_SIZE = (7.0, 7.0)
CALIBRATION_BINS = 15
MAX_SEGMENTS = 25  # the largest segments of a spec that get a bar
RESUME_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1}


class ReportError(Exception):
    """A run directory no report can be made from; the message is the error line."""


# ---- the document: built once, written as Markdown and as HTML --------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name in the output directory
    caption: str


Block = Heading | Text | Table | Image


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown; images are relative links, so the folder can be moved whole."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append(block.text)
        elif isinstance(block, Table):
            cells = [[c.replace("|", "\\|") for c in row] for row in [block.header, *block.rows]]
            out.append(
                "\n".join(
                    [
                        "| " + " | ".join(cells[0]) + " |",
                        "|" + "---|" * len(block.header),
                        *("| " + " | ".join(row) + " |" for row in cells[1:]),
                    ]
                )
            )
        else:
            out.append(f"![{block.name[:-4]}]({block.name})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
figure{margin:1.5em 0}figcaption{color:#555;font-style:italic}"""


def to_html(blocks: list[Block], out_dir: Path, title: str) -> str:
    """One file to mail or attach: the images are embedded as base64 data URLs."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(block.text)) + "</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        else:
            data = base64.b64encode((out_dir / block.name).read_bytes()).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---- reading a run directory --------------------------------------------------------------------


@dataclass
class Run:
    dir: Path
    summary: dict[str, Any]
    records: dict[str, list[dict[str, Any]]]  # phase -> records in step order, one per step

    def series(self, phase: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the `phase` records that hold a number under `key`."""
        points = [(r["step"], r[key]) for r in self.records.get(phase, []) if isinstance(r.get(key), (int, float))]
        return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)

    @property
    def headline(self) -> str | None:
        """The metric that decides "better": as summary.json names it; for a run still training
        (or one from before summary.json named it), the first metric a validation reports, which
        is where the trainer puts its headline."""
        named = (self.summary.get("headline") or {}).get("metric")
        if named:
            return named
        for metrics in [
            *(r for r in self.records.get("valid", [])),
            self.summary.get("valid"),
            self.summary.get("test"),
        ]:
            names = [
                k
                for k, v in (metrics or {}).items()
                if k not in ("time", "phase", "step", "epoch") and isinstance(v, (int, float))
            ]
            if names:
                return names[0]
        return None

    @property
    def test(self) -> tuple[dict[str, Any], int | None]:
        """The test metrics and the step of the weights tested (summary first, else the log)."""
        tests = self.records.get("test", [])
        metrics = self.summary.get("test") or (
            {k: v for k, v in tests[-1].items() if k not in ("time", "phase", "step")} if tests else {}
        )
        step = self.summary.get("test_weights_step", tests[-1]["step"] if tests else None)
        return metrics, step

    @property
    def resume_steps(self) -> list[int]:
        return [r["step"] for r in self.records.get("resume", [])]


def read_records(path: Path) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl by phase; a torn last line (a crash mid-write) is skipped, and a step logged
    twice (an older run's failed attempt) keeps its latest record."""
    by_phase: dict[str, dict[int, dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and "phase" in record:
            by_phase.setdefault(record["phase"], {})[record["step"]] = record
    return {phase: [steps[s] for s in sorted(steps)] for phase, steps in by_phase.items()}


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory")
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics.exists() and not summary.exists():
        raise ReportError(
            f"{run_dir} holds neither metrics.jsonl nor summary.json: not a run directory (the trainer's --run-dir)"
        )
    try:
        loaded = json.loads(summary.read_text()) if summary.exists() else {}
    except json.JSONDecodeError as e:
        raise ReportError(f"{summary} is not valid JSON ({e})") from e
    return Run(run_dir, loaded if isinstance(loaded, dict) else {}, read_records(metrics) if metrics.exists() else {})


@dataclass
class Evaluation:
    """One split's `recsys evaluate` output: RUN_DIR/eval/<split>/."""

    split: str
    metrics: dict[str, Any]
    predictions: Path | None


def load_evaluations(run_dir: Path) -> tuple[list[Evaluation], list[str]]:
    """The evaluations found, and a note for each one that could not be read."""
    found, notes = [], []
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            notes.append(f"Skipped {path}: not valid JSON ({e}).")
            continue
        predictions = path.parent / "predictions.parquet"
        found.append(Evaluation(path.parent.name, metrics, predictions if predictions.exists() else None))
    return found, notes


# ---- plots --------------------------------------------------------------------------------------


def smooth(values: np.ndarray, span: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), so the start is not pulled to 0."""
    alpha, avg, out = 2 / (span + 1), 0.0, np.empty_like(values)
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        out[i] = avg / (1 - (1 - alpha) ** (i + 1))
    return out


def mark_resumes(ax: Axes, steps: list[int], label: bool) -> None:
    """A vertical line where training restarted from a checkpoint."""
    for i, step in enumerate(steps):
        ax.axvline(step, **RESUME_STYLE, label="resumed from checkpoint" if label and i == 0 else None)


def clip_spikes(ax: Axes, values: np.ndarray) -> None:
    """Keep early spikes (the first steps' loss) from flattening the rest of the curve."""
    if len(values) < 10:
        return
    low, high = float(np.min(values)), float(np.quantile(values, 0.98))
    if np.max(values) > high + (high - low):
        pad = 0.08 * (high - low)
        ax.set_ylim(low - pad, high + 4 * pad)


def finish(ax: Axes) -> None:
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def run_title(run: Run) -> str:
    s = run.summary
    dataset = Path(str(s["dataset"])).name if s.get("dataset") else None
    return " on ".join(str(x) for x in (s.get("model"), dataset) if x) or run.dir.name


def plot_training_curves(run: Run) -> Figure | None:
    """Loss on top, the headline validation metric below: the first place to look for over- or
    under-fitting and for where the best weights came from."""
    steps, loss = run.series("train", "loss")
    name = run.headline
    valid_steps, valid = run.series("valid", name) if name else (np.array([]), np.array([]))
    if not len(steps) and not len(valid_steps):
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=CURVES_SIZE, dpi=DPI, sharex=True, layout="constrained")
    fig.suptitle(f"{run_title(run)}: training curves")
    if len(steps):
        top.plot(steps, loss, color="C0", alpha=0.3, linewidth=1, label="train loss (per log interval)")
        top.plot(steps, smooth(loss, max(3.0, len(loss) / 15)), color="C0", linewidth=2, label="train loss (smoothed)")
        clip_spikes(top, loss)
    log_steps, logloss = run.series("valid", "logloss")
    if len(log_steps):
        top.plot(log_steps, logloss, "o-", color="C1", markersize=4, label="valid logloss")
    top.set_ylabel("loss")
    top.set_title("Loss (lower is better)", fontsize=10)
    if len(valid_steps):
        plot_headline(bottom, run, name, valid_steps, valid)
    else:
        bottom.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("step")
    for i, ax in enumerate((top, bottom)):
        mark_resumes(ax, run.resume_steps, label=i == 0)
        finish(ax)
    return fig


def plot_headline(ax: Axes, run: Run, name: str, steps: np.ndarray, values: np.ndarray) -> None:
    """Validation headline metric with the best validation, the test result and the references
    (oracle AUC on synthetic data, the most-popular baseline for retrieval)."""
    better = "higher" if Headline(name).higher_is_better else "lower"
    ax.plot(steps, values, "o-", color="C2", markersize=4, label=f"valid {name}")
    best_step, best = run.summary.get("best_valid_step"), (run.summary.get("best_valid") or {}).get(name)
    if best_step is None or best is None:
        i = int(np.argmin(values) if better == "lower" else np.argmax(values))
        best_step, best = steps[i], values[i]
    ax.plot(
        [best_step],
        [best],
        marker="*",
        markersize=16,
        color="C2",
        markeredgecolor="k",
        linestyle="none",
        label=f"best valid {name} {best:.4f} (step {int(best_step)})",
    )
    test, test_step = run.test
    if isinstance(test.get(name), (int, float)) and test_step is not None:
        ax.plot(
            [test_step],
            [test[name]],
            marker="X",
            markersize=11,
            color="C3",
            markeredgecolor="k",
            linestyle="none",
            label=f"test {name} {test[name]:.4f} (weights of step {test_step})",
        )
    oracle = run.summary.get("valid_oracle_auc") if name == "auc" else None
    if oracle:
        ax.axhline(
            oracle, color="k", linestyle=":", linewidth=1.2, label=f"oracle valid auc {oracle:.4f} (the data's ceiling)"
        )
    baseline = ((run.summary.get("most_popular") or {}).get("valid") or {}).get(name)
    if isinstance(baseline, (int, float)):
        ax.axhline(baseline, color="C7", linestyle="-.", linewidth=1.2, label=f"most-popular baseline {baseline:.4f}")
    ax.set_ylabel(name)
    ax.set_title(f"Validation {name} ({better} is better)", fontsize=10)


def plot_throughput(run: Run) -> Figure | None:
    """Learning rate and throughput: schedule bugs, warm-up and slow steps (input stalls,
    checkpoint saves, a slower restart) show here."""
    lr_steps, lr = run.series("train", "lr")
    rate_steps, rate = run.series("train", "samples_per_s")
    if not len(lr_steps) and not len(rate_steps):
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=THROUGHPUT_SIZE, dpi=DPI, sharex=True, layout="constrained")
    fig.suptitle(f"{run_title(run)}: learning rate and throughput")
    top.plot(lr_steps, lr, color="C4", drawstyle="steps-post", label="learning rate")
    top.set_ylabel("learning rate")
    top.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    bottom.plot(rate_steps, rate, color="C0", alpha=0.3, linewidth=1, label="per log interval")
    if len(rate):
        bottom.plot(rate_steps, smooth(rate, max(3.0, len(rate) / 15)), color="C0", linewidth=2, label="smoothed")
        clip_spikes(bottom, rate)
    average = run.summary.get("samples_per_s")
    if isinstance(average, (int, float)):
        bottom.axhline(
            average, color="k", linestyle=":", linewidth=1.2, label=f"run average {average:,.0f} (summary.json)"
        )
    bottom.set_ylabel("samples/s (all ranks)")
    bottom.set_xlabel("step")
    bottom.set_ylim(bottom=0)
    for i, ax in enumerate((top, bottom)):
        mark_resumes(ax, run.resume_steps, label=i == 0)
        finish(ax)
    return fig


@dataclass
class Bins:
    """Equal-count bins of the predictions: mean prediction, mean label, its standard error."""

    predicted: np.ndarray
    observed: np.ndarray
    error: np.ndarray


def calibration_bins(prediction: np.ndarray, label: np.ndarray, weight: np.ndarray, bins: int) -> Bins:
    """Equal-count bins (not equal-width): every point rests on the same number of rows."""
    order = np.argsort(prediction, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, len(order))) if len(p)]
    predicted, observed, error = [], [], []
    for part in parts:
        w = weight[part]
        mean_label = np.average(label[part], weights=w)
        predicted.append(np.average(prediction[part], weights=w))
        observed.append(mean_label)
        spread = np.average((label[part] - mean_label) ** 2, weights=w)
        error.append(math.sqrt(spread / len(part)))
    return Bins(np.array(predicted), np.array(observed), np.array(error))


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, label, weight) of the scored rows; rows of weight 0 are padding, not data."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in ("prediction", "label", "weight") if c in names])
    prediction = table.column("prediction").to_numpy().astype(float)
    label = table.column("label").to_numpy().astype(float)
    weight = table.column("weight").to_numpy().astype(float) if "weight" in names else np.ones_like(label)
    keep = (weight > 0) & np.isfinite(prediction)
    return prediction[keep], label[keep], weight[keep]


def plot_calibration(evaluation: Evaluation) -> Figure | None:
    """Reliability diagram: do predicted probabilities (or values) match what happens?"""
    assert evaluation.predictions is not None
    prediction, label, weight = read_predictions(evaluation.predictions)
    if not len(prediction):
        return None
    binary = evaluation.metrics.get("task", "binary") == "binary"
    bins = calibration_bins(prediction, label, weight, CALIBRATION_BINS)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=CALIBRATION_SIZE,
        dpi=DPI,
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 1]},
    )
    what = "predicted probability" if binary else "prediction"
    fig.suptitle(
        f"Calibration on the {evaluation.split} split ({len(prediction):,} rows, "
        f"{len(bins.predicted)} equal-count bins)"
    )
    values = np.concatenate([bins.predicted, bins.observed - bins.error, bins.observed + bins.error])
    low, high = (0.0, float(min(1.0, values.max() * 1.08))) if binary else (float(values.min()), float(values.max()))
    pad = 0.0 if binary else 0.05 * (high - low)
    low, high = low - pad, high + pad
    top.plot([low, high], [low, high], color="k", linestyle=":", linewidth=1.2, label="perfect calibration")
    top.errorbar(
        bins.predicted,
        bins.observed,
        yerr=bins.error,
        fmt="o-",
        color="C0",
        markersize=5,
        capsize=3,
        label=("observed positive rate" if binary else "mean actual label") + " (± 1 s.e.)",
    )
    top.set_xlim(low, high)
    top.set_ylim(low, high)
    top.set_ylabel("observed positive rate" if binary else "mean actual label")
    top.set_title("Above the diagonal: the model under-predicts; below: it over-predicts", fontsize=10)
    inside = prediction[(prediction >= low) & (prediction <= high)]
    bottom.hist(inside, bins=50, range=(low, high), color="C0", alpha=0.7)
    shown = f" ({len(inside) / len(prediction):.1%} of rows in range)" if len(inside) < len(prediction) else ""
    bottom.set_title(f"Distribution of the {what}{shown}", fontsize=10)
    bottom.set_xlabel(what)
    bottom.set_ylabel("rows")
    for ax in (top, bottom):
        finish(ax)
    return fig


def eval_headline(evaluation: Evaluation) -> str:
    """The evaluation's headline (metrics.json names it; older ones: the task's)."""
    return evaluation.metrics.get("headline") or headline(evaluation.metrics.get("task", "binary")).name


def number(value: Any) -> float:
    """A metric value as a float; null (e.g. AUC of a one-class segment) becomes NaN."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def segment_figsize(count: int) -> tuple[float, float]:
    """Taller for more segments so every label stays readable."""
    return 10.0, max(3.5, 1.6 + 0.32 * count)


def largest_segments(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MAX_SEGMENTS largest, in the spec's own order (buckets stay sorted)."""
    largest = sorted(range(len(rows)), key=lambda i: -np.nan_to_num(number(rows[i].get("count"))))[:MAX_SEGMENTS]
    return [rows[i] for i in sorted(largest)]


def plot_segments(evaluation: Evaluation, spec: str, rows: list[dict[str, Any]]) -> Figure:
    """The headline metric (and calibration, where reported) per segment: horizontal bars, so
    long segment labels stay readable; the overall value is the dashed reference."""
    shown = largest_segments(rows)
    name = eval_headline(evaluation)
    panels = [name] + (["calibration"] if any(isinstance(r.get("calibration"), (int, float)) for r in shown) else [])
    fig, axes = plt.subplots(
        1, len(panels), figsize=segment_figsize(len(shown)), dpi=DPI, sharey=True, layout="constrained", squeeze=False
    )
    more = f", the {len(shown)} largest of {len(rows)}" if len(shown) < len(rows) else ""
    fig.suptitle(f"Segments '{spec}' on the {evaluation.split} split{more}")
    labels = [str(r.get("segment")) for r in shown]
    y = np.arange(len(shown))
    overall = evaluation.metrics.get("overall") or {}
    for ax, metric in zip(axes[0], panels):
        values = np.array([number(r.get(metric)) for r in shown])
        base = 0.5 if metric == "auc" else 0.0  # AUC bars start at chance, so differences show
        ax.barh(y, np.nan_to_num(values - base), left=base, color="C0" if metric == name else "C1", alpha=0.8)
        reference = 1.0 if metric == "calibration" else number(overall.get(metric))
        if not math.isnan(reference):
            ax.axvline(
                reference,
                color="k",
                linestyle="--",
                linewidth=1.2,
                label="perfect (1.0)" if metric == "calibration" else f"overall {reference:.4f}",
            )
        for yi, value, row in zip(y, values, shown):
            text = "n/a" if math.isnan(value) else f"{value:.3f}"
            ax.text(
                0.01,
                yi,
                f" {text}   n={int(number(row.get('count'))):,}" if row.get("count") is not None else f" {text}",
                va="center",
                ha="left",
                fontsize=8,
                transform=ax.get_yaxis_transform(),
                color="white" if not math.isnan(value) and value > 0 else "k",
            )
        finite = values[np.isfinite(values)]
        if len(finite) and metric != "calibration":
            top = max(finite.max(), reference if not math.isnan(reference) else 0)
            ax.set_xlim(base, top + 0.05 * (top - base))
        ax.set_xlabel(
            metric
            + {"calibration": " (mean prediction / observed rate)", "auc": " (axis starts at chance, 0.5)"}.get(
                metric, ""
            )
        )
        ax.set_title(f"{metric} per segment" + (" (1 = calibrated)" if metric == "calibration" else ""), fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_yticks(y, labels)
    axes[0][0].invert_yaxis()
    axes[0][0].set_ylabel(spec)
    return fig


def save_figure(fig: Figure, path: Path) -> None:
    """PNG at the figure's own size (no tight bbox, so sizes are predictable), written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


# ---- the report's sections ----------------------------------------------------------------------


def header_blocks(run: Run) -> list[Block]:
    s = run.summary
    facts = [
        f"{k.replace('_', ' ')} {format_number(s[k])}"
        for k in ("world_size", "device", "steps", "epochs", "global_batch_size")
        if s.get(k) is not None
    ]
    blocks: list[Block] = [
        Heading(1, f"Run report: {run_title(run)}"),
        Text(
            f"Run directory `{run.dir}`"
            + (f"; dataset `{s['dataset']}`" if s.get("dataset") else "")
            + (". " + ", ".join(facts) + "." if facts else ".")
        ),
    ]
    if not s:
        blocks.append(
            Text("No summary.json (the run has not finished, or failed): the tables come from metrics.jsonl.")
        )
    return blocks


def metrics_table(run: Run) -> Table | None:
    """Rows: metrics; columns: last validation, best validation, test."""
    s = run.summary
    valid = s.get("valid") or (run.records.get("valid") or [{}])[-1]
    best, test = s.get("best_valid") or {}, run.test[0]
    names = [k for k in dict.fromkeys([*valid, *best, *test]) if k not in ("time", "phase", "step", "epoch")]
    if not names:
        return None
    last_step = (run.records.get("valid") or [{}])[-1].get("step", s.get("steps"))
    header = [
        "metric",
        f"valid, last (step {format_number(last_step)})",
        f"valid, best (step {format_number(s.get('best_valid_step'))})",
        f"test (weights of step {format_number(run.test[1])})",
    ]
    return Table(header, [[n, *(format_number(m.get(n)) for m in (valid, best, test))] for n in names])


def facts_table(run: Run) -> Table:
    """Oracle, speed, checkpoints, restarts: the numbers a reader asks about next."""
    s, rows = run.summary, []
    if s.get("oracle_auc") is not None:
        rows.append(["oracle test AUC (best possible on this synthetic data)", format_number(s["oracle_auc"])])
    if s.get("samples_per_s") is not None:
        rows.append(["throughput", f"{s['samples_per_s']:,.0f} samples/s"])
    if s.get("train_time_s") is not None:
        rows.append(["training time", f"{s['train_time_s']:,.1f} s"])
    if s.get("stopped_early"):
        rows.append(["stopped early", "yes (no better validation within the patience)"])
    ck = s.get("checkpoints") or {}
    if ck:
        size = f", {ck['bytes'] / 1e6:,.1f} MB each" if ck.get("bytes") else ""
        rows.append(
            [
                "checkpoints",
                f"{format_number(ck.get('saved'))} saved in {format_number(ck.get('dir'))}{size}; "
                f"{number(ck.get('save_s')):.2f} s saving, {number(ck.get('stall_s')):.2f} s training stalled",
            ]
        )
    resumes = run.records.get("resume", [])
    if resumes or s.get("resumed_from"):
        steps = ", ".join(str(r["step"]) for r in resumes)
        rows.append(
            [
                "restarts",
                f"{len(resumes)} (resumed at step {steps})" if resumes else f"resumed from {s['resumed_from']}",
            ]
        )
    return Table(["", "value"], rows)


def summary_blocks(run: Run) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Summary")]
    table = metrics_table(run)
    blocks.append(table if table else Text("No validation or test metrics recorded."))
    facts = facts_table(run)
    if facts.rows:
        blocks.append(facts)
    return blocks


def curve_blocks(run: Run, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Training")]
    figures = [
        (
            "training_curves.png",
            plot_training_curves(run),
            "Top: train loss per log interval (faint) and smoothed, with the validation log loss; the gap between "
            "them grows when the model overfits. Bottom: the headline validation metric; the star is the best "
            "validation, the X the test result, dashed vertical lines are restarts from a checkpoint.",
        ),
        (
            "throughput.png",
            plot_throughput(run),
            "Top: the learning rate schedule. Bottom: training throughput over all ranks; dips are input stalls, "
            "evaluations or checkpoint saves, a lasting drop after a restart points at the new machine.",
        ),
    ]
    for name, fig, caption in figures:
        if fig is None:
            blocks.append(Text(f"No {name[:-4].replace('_', ' ')} plot: metrics.jsonl holds no training records."))
            continue
        save_figure(fig, out / name)
        blocks.append(Image(name, caption))
    return blocks


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "spec"


def segment_table(rows: list[dict[str, Any]]) -> Table:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "segment"]
    return Table(["segment", *keys], [[str(r.get("segment")), *(format_number(r.get(k)) for k in keys)] for r in rows])


def evaluation_blocks(evaluation: Evaluation, out: Path) -> list[Block]:
    """One split's evaluation: what was scored, the overall and per-segment tables, the plots."""
    m = evaluation.metrics
    blocks: list[Block] = [Heading(2, f"Evaluation: {evaluation.split} split")]
    about = [f"{k} {format_number(m[k])}" for k in ("checkpoint", "step", "data", "task") if m.get(k) is not None]
    if about:
        blocks.append(Text("; ".join(about) + "."))
    overall = m.get("overall") or {}
    if overall:
        blocks.append(Table(["metric", "value"], [[k, format_number(v)] for k, v in overall.items()]))
    if evaluation.predictions is None:
        blocks.append(Text("No predictions.parquet: no calibration plot."))
    else:
        fig = plot_calibration(evaluation)
        if fig is None:
            blocks.append(Text("predictions.parquet holds no scored rows: no calibration plot."))
        else:
            name = f"calibration_{slug(evaluation.split)}.png"
            save_figure(fig, out / name)
            blocks.append(
                Image(name, CALIBRATION_CAPTION if m.get("task", "binary") == "binary" else REGRESSION_CAPTION)
            )
    for spec, rows in (m.get("segments") or {}).items():
        blocks.append(Heading(3, f"Segments: {spec}"))
        if not rows:
            blocks.append(Text("No segments."))
            continue
        blocks.append(segment_table(rows))
        name = f"segments_{slug(evaluation.split)}_{slug(spec)}.png"
        save_figure(plot_segments(evaluation, spec, rows), out / name)
        blocks.append(
            Image(
                name,
                f"{eval_headline(evaluation)} per '{spec}' segment, n = rows; the dashed line is the "
                "overall value. Calibration (right, where reported) is mean prediction / observed "
                "rate: above 1 the model over-predicts that segment, below 1 it under-predicts.",
            )
        )
    return blocks


CALIBRATION_CAPTION = (
    "Reliability diagram: each point is one equal-count bin of rows, its mean predicted probability "
    "against the observed positive rate (bars: ±1 standard error). Points above the diagonal: the "
    "model under-predicts; below: it over-predicts. Below: how the predictions are spread."
)
REGRESSION_CAPTION = (
    "Predicted vs actual: each point is one equal-count bin of rows, its mean prediction against the "
    "mean label. Points above the diagonal: the model under-predicts; below: it over-predicts."
)


def build_report(run_dir: Path, out: Path) -> list[Path]:
    """Write the plots, report.md and report.html to `out`; returns the files written."""
    run = load_run(run_dir)
    evaluations, notes = load_evaluations(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = [*header_blocks(run), *summary_blocks(run), *curve_blocks(run, out)]
    if not evaluations:
        blocks += [
            Heading(2, "Evaluation"),
            Text(
                "No evaluation yet: `recsys evaluate` writes RUN_DIR/eval/<split>/ "
                "(per-segment metrics and calibration)."
            ),
        ]
    blocks += [Text(note) for note in notes]
    for evaluation in evaluations:
        blocks += evaluation_blocks(evaluation, out)
    write_text_atomic(out / "report.md", to_markdown(blocks))
    write_text_atomic(out / "report.html", to_html(blocks, out, f"Run report: {run_title(run)}"))
    return [out / b.name for b in blocks if isinstance(b, Image)] + [out / "report.md", out / "report.html"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (the trainer's --run-dir)")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/report)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = build_report(args.run_dir, args.out or args.run_dir / "report")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
