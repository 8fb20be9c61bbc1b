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
import re
import sys
from pathlib import Path
from typing import Any

from data_pipeline.atomic import write_text_atomic
from trainer.numbers import format_number
from trainer.tools.report_document import Block, Heading, Image, Table, Text, to_html, to_markdown
from trainer.tools.report_plots import (
    plot_calibration,
    plot_segments,
    plot_throughput,
    plot_training_curves,
    save_figure,
)
from trainer.tools.report_run import (
    Evaluation,
    ReportError,
    Run,
    eval_headline,
    load_evaluations,
    load_run,
    number,
    run_title,
)


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
