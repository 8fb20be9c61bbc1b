"""The report's matplotlib figures: training curves, throughput, calibration and per-segment bars,
each a function from run data to a Figure, and `save_figure` to write one as a PNG."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from data_pipeline.atomic import write_atomic  # noqa: E402
from trainer.headline import Headline  # noqa: E402
from trainer.tools.report_run import Evaluation, Run, eval_headline, number, run_title  # noqa: E402

DPI = 120
CURVES_SIZE = (8.0, 6.5)  # inches; two stacked panels
THROUGHPUT_SIZE = (8.0, 5.0)
CALIBRATION_SIZE = (7.0, 7.0)
CALIBRATION_BINS = 15
MAX_SEGMENTS = 25  # the largest segments of a spec that get a bar
RESUME_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1}


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
    point = dict(markeredgecolor="k", linestyle="none")  # one marked point, no line
    label = f"best valid {name} {best:.4f} (step {int(best_step)})"
    ax.plot([best_step], [best], marker="*", markersize=16, color="C2", label=label, **point)
    test, test_step = run.test
    if isinstance(test.get(name), (int, float)) and test_step is not None:
        label = f"test {name} {test[name]:.4f} (weights of step {test_step})"
        ax.plot([test_step], [test[name]], marker="X", markersize=11, color="C3", label=label, **point)
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
