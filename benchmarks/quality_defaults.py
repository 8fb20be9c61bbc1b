"""`python benchmarks/quality.py defaults`: the quality a user gets from the default commands alone.

    python benchmarks/quality.py defaults                          # every dataset at 10k, 100k and 1M rows
    python benchmarks/quality.py defaults --sizes 10000 --only census   # the runs whose label contains 'census'
    python benchmarks/quality.py defaults --only criteo-100000/dlrm --rerun

Every run is `recsys prepare KIND` with only its required flags, then `recsys train --model M --data D
--nproc-per-node 2` (plus --run-dir and --training.progress_bar false): batch size, learning rates,
epochs, early stopping, keep-best, embedding dimension and MLP widths are the trainer's derived
defaults (trainer/defaults.py; listed per run after the table from summary.json's `derived`). Next
to each run: baselines fitted in this script on the same train rows and scored on the same test rows,
then one Markdown table, the exact commands, the derived settings, a targets line per dataset and
the wall time of each dataset. Data lives under data/quality/defaults/, runs under
runs/quality/defaults/<dataset>-<rows>/<model> (both git-ignored); a run whose summary.json was
written for the same command and the same prepared dataset is read back (quality.train; --rerun
trains again). --only selects runs by their label `<dataset>-<rows>/<model>`; a dataset with no
selected run is not generated, prepared or fitted. --sizes applies to the generated datasets (census,
criteo, avazu); MovieLens and the demo data have one size.

How the baselines see the same split as the model:
  census, avazu  `recsys prepare tabular` splits by `assign_splits(labels, 80/10/10, seed 0)`, a pure
                 function of the label column: `quality.tabular_split` reads the CSV with the
                 preparer's `read_table`, labels it with its `LabelSpec` and calls `assign_splits`.
  criteo         `recsys prepare criteo` draws each line's split from a generator seeded by (--seed,
                 the file name, the unit of the file), line by line: `criteo_lines` parses the TSV with
                 the preparer's own `plan_units` and `UnitParser` under the options its CLI gives
                 for the default command (`criteo.parse`), so every line gets the split, label, log1p
                 counts and raw categorical values the preparer saw; the split sizes are checked
                 against dataset.json.
  movielens      the ratings are read back from the prepared train/valid/test Parquet files.
  synthetic      the oracle AUC of the test split is in the run's summary.json.

Baselines:
  LR             scikit-learn LogisticRegression on one-hot categoricals (nulls a level) and
                 numerics (median-filled, a missing flag, standardised); lbfgs, C picked by valid AUC.
  GBDT           scikit-learn HistGradientBoostingClassifier on the raw columns (quality.census_baselines).
  hashed LR      FeatureHasher (2^20 features, alternate_sign off) of "column=value" for every
                 categorical (a null is the value ""), plus the log1p counts standardised (criteo), into
                 SGDClassifier(loss="log_loss", averaged; lbfgs/liblinear take minutes a fit on 2^20
                 columns); alpha picked by valid AUC.
  bias           MovieLens: the global mean, and mean + user bias + item bias (quality.bias_baseline).
  oracle         the true probabilities of the generator's click/income model on the test rows.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import quality
from census_like import auc
from quality import ROOT, print_table, shown

# ---- what runs: each dataset's rows, models and commands ----------------------------------------

DATA = quality.DATA / "defaults"  # relative to ROOT, as quality.py's
RUNS = quality.RUNS / "defaults"
GENERATED = None  # Dataset.rows for a generated dataset: the --sizes


@dataclass(frozen=True)
class Dataset:
    name: str
    rows: int | None  # None: each of --sizes (generated); else the one size of the data
    models: tuple[str, ...]
    generate: str  # the command that writes {input} ("" when the input exists)
    prepare: str  # `recsys prepare` with only its required flags
    metric: str  # the test headline: auc (higher is better) or rmse
    target: str
    suffix: str = ".csv"


DATASETS = (
    Dataset(
        "census", GENERATED, ("wide_deep", "dlrm", "deepfm"),
        "python benchmarks/census_like.py --rows {rows} --out {input}",
        "recsys prepare tabular --input {input} --label income --positive '>50K' --out {data}",
        "auc", "wide_deep test AUC within 0.005 of GBDT",
    ),
    Dataset(
        "criteo", GENERATED, ("dlrm", "wide_deep"),
        "python benchmarks/click_logs.py criteo --rows {rows} --out {input}",
        "recsys prepare criteo --input {input} --out {data}",
        "auc", "dlrm and wide_deep test AUC >= hashed LR", suffix=".tsv",
    ),
    Dataset(
        "avazu", GENERATED, ("wide_deep", "dlrm"),
        "python benchmarks/click_logs.py avazu --rows {rows} --out {input}",
        "recsys prepare tabular --input {input} --label click --out {data}",
        "auc", "wide_deep and dlrm test AUC >= hashed LR",
    ),
    Dataset(
        "movielens", 100_000, ("dlrm", "dlrm_dcn", "wide_deep", "deepfm", "two_tower"),
        "",
        "recsys prepare movielens --input ../shared/data/movielens-100k --out {data}",
        "rmse", "best test RMSE <= 0.91",
    ),
    Dataset(
        "synthetic", 500_000, ("dlrm",),
        "",
        "recsys prepare synthetic --rows 500000 --out {data}",
        "auc", "gap to the oracle AUC <= 0.015",
    ),
)  # fmt: skip
TRAIN = "recsys train --model {model} --data {data} --nproc-per-node 2 --run-dir {run}"
SHOWN_EXTRA = " --training.progress_bar false"  # quality.train adds it to every run
HASH_FEATURES = 2**20
LR_C = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SGD_ALPHA = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)


@dataclass
class Baseline:
    name: str
    value: float
    detail: str = ""


@dataclass
class Result:
    """One dataset at one size: its baselines (the first is the reference) and its runs' summaries."""

    label: str
    dataset: Dataset
    rows: int
    baselines: list[Baseline] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""  # a failed step (generate, prepare, a run): the rest of the benchmark goes on


# ---- baselines ------------------------------------------------------------------------------------


def _logistic(x, labels: np.ndarray, split: np.ndarray, hashed: bool) -> tuple[float, float]:
    """A logistic regression fitted on x's train rows for every regularisation of the grid; (test AUC,
    the regularisation with the best valid AUC). One-hot: LogisticRegression (lbfgs, warm-started
    along C); hashed: SGDClassifier(log_loss, averaged), as lbfgs/liblinear take minutes a fit on
    2^20 columns."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    parts = [x[split == s] for s in range(3)]
    ys = [labels[split == s] for s in range(3)]
    lr = LogisticRegression(solver="lbfgs", max_iter=300, warm_start=True)
    scores = []
    for reg in SGD_ALPHA if hashed else LR_C:
        model = (
            SGDClassifier(loss="log_loss", alpha=reg, average=True, max_iter=20, random_state=0)
            if hashed
            else lr.set_params(C=reg)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(parts[0], ys[0])
        scores.append((*(auc(model.decision_function(parts[s]), ys[s]) for s in (1, 2)), reg))
    _, test_auc, reg = max(scores, key=lambda s: s[0])
    return test_auc, reg


def _standardised(dense: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean, std = dense[train].mean(0), dense[train].std(0)
    return (dense - mean) / np.where(std > 0, std, 1)


BLOCK = 100_000  # rows turned into "name=value" strings at a time


def hashed_lr(names: list[str], values, dense: np.ndarray | None, labels, split) -> Baseline:
    """Hashed logistic regression: "name=value" of every categorical (`values(lo, hi)`: the string
    values of rows lo..hi, [rows, names], "" for null) through FeatureHasher(2^20), the dense columns
    standardised beside them."""
    import scipy.sparse as sp
    from sklearn.feature_extraction import FeatureHasher

    start = time.monotonic()
    hasher = FeatureHasher(n_features=HASH_FEATURES, input_type="string", alternate_sign=False)
    prefixes = np.array([f"{n}=" for n in names])
    blocks = [
        hasher.transform(np.char.add(prefixes, values(lo, lo + BLOCK)).tolist()) for lo in range(0, len(labels), BLOCK)
    ]
    x = sp.vstack(blocks).tocsr()
    if dense is not None and dense.shape[1]:
        x = sp.hstack([x, sp.csr_matrix(_standardised(dense.astype(np.float64), split == 0))]).tocsr()
    test_auc, alpha = _logistic(x, labels, split, hashed=True)
    detail = f"FeatureHasher 2^20, SGD log loss, alpha {alpha:g} by valid AUC, {time.monotonic() - start:.0f} s"
    return Baseline("hashed LR", test_auc, detail)


def onehot_lr(table, label: str, labels: np.ndarray, split: np.ndarray) -> Baseline:
    """LogisticRegression on one-hot categoricals and standardised numerics (median-filled, with a missing flag)."""
    import pyarrow.compute as pc
    import scipy.sparse as sp
    from sklearn.preprocessing import OneHotEncoder

    start, train = time.monotonic(), split == 0
    codes, numeric = [], []
    for name in table.column_names:
        if name == label:
            continue
        column = table[name]
        if quality.pa_is_numeric(column.type):
            x = pc.fill_null(pc.cast(column, "float64"), np.nan).to_numpy()
            missing = np.isnan(x)
            x = np.where(missing, np.nanmedian(x[train]) if (~missing[train]).any() else 0.0, x)
            numeric += [x, missing.astype(np.float64)] if missing[train].any() else [x]
        else:  # codes of the string values (null: "")
            codes.append(pc.dictionary_encode(pc.fill_null(pc.cast(column, "string"), "").combine_chunks()).indices)
    codes = np.stack([c.to_numpy() for c in codes], 1)
    onehot = OneHotEncoder(handle_unknown="ignore").fit(codes[train])
    x = sp.hstack([onehot.transform(codes), sp.csr_matrix(_standardised(np.stack(numeric, 1), train))])
    test_auc, c = _logistic(x.tocsr(), labels, split, hashed=False)
    return Baseline("LR", test_auc, f"one-hot + standardised, C {c:g} by valid AUC, {time.monotonic() - start:.0f} s")


def _as_strings(column) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(pc.cast(column, "string"), "").to_numpy(zero_copy_only=False), dtype=str)


def _oracle(source: Path, labels: np.ndarray, test: np.ndarray) -> list[Baseline]:
    truth = ROOT / source.with_name(source.name + ".truth.npz")
    prob = np.load(truth)["prob"] if truth.exists() else None
    if prob is None or len(prob) != len(labels):  # (a generated file has no malformed lines to skip)
        return []
    return [Baseline("oracle", auc(prob[test], labels[test]), "the generator's true probabilities")]


def tabular_baselines(source: Path, data: Path, label: str, positive, with_gbdt: bool) -> list[Baseline]:
    table, labels, split = quality.tabular_split(source, label, positive)
    _check_split(data, split)
    if with_gbdt:
        _, gbdt = quality.census_baselines(source, label, positive)
        out = [Baseline(k.split(" (")[0], v, k.split(" (", 1)[1].rstrip(")")) for k, v in gbdt.items()]
        return [*out, onehot_lr(table, label, labels, split), *_oracle(source, labels, split == 2)]
    names = [n for n in table.column_names if n not in (label, "id")]

    def values(lo: int, hi: int) -> np.ndarray:
        return np.stack([_as_strings(table[n].slice(lo, hi - lo)) for n in names], 1)

    return [hashed_lr(names, values, None, labels, split), *_oracle(source, labels, split == 2)]


def criteo_lines(tsv: Path) -> dict[str, np.ndarray]:
    """Every clean line of a Criteo TSV as `recsys prepare criteo --input TSV --out D` parses it: split
    (0/1/2), label, dense (the preparer's log1p counts), values (uint64 raw categoricals), missing."""
    from data_pipeline.prepare import criteo
    from data_pipeline.prepare.criteo_parse import UnitParser, plan_units

    opts, _, _ = criteo.parse(["--input", str(ROOT / tsv), "--out", "unused"])
    parts = {k: [] for k in ("split", "label", "dense", "values", "missing")}
    for unit in plan_units([str(ROOT / tsv)], opts.chunk_bytes):
        for parsed in UnitParser(unit, opts):
            for k, v in parts.items():
                v.append(getattr(parsed, k))
    return {k: np.concatenate(v) for k, v in parts.items()}


def criteo_baselines(source: Path, data: Path) -> list[Baseline]:
    lines = criteo_lines(source)
    split, labels = lines["split"].astype(np.int64), lines["label"].astype(np.int64)
    _check_split(data, split)
    names = [f"cat_{j}" for j in range(lines["values"].shape[1])]

    def values(lo: int, hi: int) -> np.ndarray:
        return np.where(lines["missing"][lo:hi], "", lines["values"][lo:hi].astype(str))

    return [hashed_lr(names, values, lines["dense"], labels, split), *_oracle(source, labels, split == 2)]


def _check_split(data: Path, split: np.ndarray) -> None:
    from data_pipeline.schema import SPLITS, DatasetSchema

    prepared = {s: info.rows for s, info in DatasetSchema.load(ROOT / data).splits.items()}
    derived = {s: int((split == i).sum()) for i, s in enumerate(SPLITS)}
    if prepared != derived:
        sys.exit(f"error: the baselines' split {derived} is not the prepared dataset's {prepared} ({data})")


def movielens_baselines(data: Path) -> list[Baseline]:
    base = quality.bias_baseline(*(quality._ratings(data, s) for s in ("train", "valid", "test")))
    return [
        Baseline("user+item bias", base["bias"][0], f"ALS, L2 {base['bias_lambda']} by valid RMSE"),
        Baseline("global mean", base["global_mean"][0], "train mean rating"),
    ]


def baselines(ds: Dataset, source: Path, data: Path) -> list[Baseline]:
    """The dataset's baselines, the reference (the one the diff column and the target use) first."""
    if ds.name == "census":
        return tabular_baselines(source, data, "income", (">50K",), with_gbdt=True)
    if ds.name == "avazu":
        return tabular_baselines(source, data, "click", ("1",), with_gbdt=False)
    if ds.name == "criteo":
        return criteo_baselines(source, data)
    if ds.name == "movielens":
        return movielens_baselines(data)
    return []  # synthetic: the oracle AUC comes with each run


# ---- running ------------------------------------------------------------------------------------


def _generate(ds: Dataset, rows: int, source: Path, data: Path, commands: list[str]) -> None:
    command = ds.generate.format(rows=rows, input=source)
    commands.append(command)
    truth = ROOT / source.with_name(source.name + ".truth.json")
    if ds.name == "census":
        wanted = {"rows": rows, "seed": 0}
    else:
        import click_logs

        wanted = {"kind": ds.name, "rows": rows, "seed": 0, "version": click_logs.VERSION}
    if (ROOT / source).exists() and truth.exists():
        have = json.loads(truth.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            return
    print(f"$ {command}", flush=True)
    subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, check=True)
    if (ROOT / data).exists():  # a new input: the default command (no --overwrite) prepares afresh
        shutil.rmtree(ROOT / data)


def run_dataset(ds: Dataset, rows: int, models: list[str], opts) -> Result:
    result, start = Result(f"{ds.name}-{rows}", ds, rows), time.monotonic()
    try:
        _run_dataset(result, models, opts)
    except (SystemExit, subprocess.CalledProcessError) as e:  # quality.prepare/train exit with the log tail
        result.error = str(e.code if isinstance(e, SystemExit) else e).strip()
        print(result.error, flush=True)
    result.seconds = time.monotonic() - start
    print(f"  {result.label}: {result.seconds / 60:.1f} min", flush=True)
    return result


def _run_dataset(result: Result, models: list[str], opts) -> None:
    ds, rows, label = result.dataset, result.rows, result.label
    print(f"\n== {label}: {', '.join(models)}", flush=True)
    source, data = DATA / f"{label}{ds.suffix}", DATA / label
    if ds.generate:
        _generate(ds, rows, source, data, result.commands)
    prep = shlex.split(ds.prepare.format(input=source, data=data))[1:]
    result.commands.append(shown(prep))
    quality.prepare(prep)
    result.baselines = baselines(ds, source, data)
    for b in result.baselines:
        print(f"  baseline {b.name}: {b.value:.4f} ({b.detail})", flush=True)
    data_key = json.loads((ROOT / data / "dataset.json").read_text())
    for model in models:
        args = shlex.split(TRAIN.format(model=model, data=data, run=RUNS / label / model))[1:]
        result.runs[model] = quality.train(args, opts.rerun, data_key)
        result.commands.append(shown(args) + SHOWN_EXTRA)


def plan(opts) -> list[tuple[Dataset, int, list[str]]]:
    """(dataset, rows, selected models) of every dataset size with a selected run."""
    out = []
    for ds in DATASETS:
        for rows in sorted(opts.sizes) if ds.rows is GENERATED else [ds.rows]:
            models = [m for m in ds.models if not opts.only or any(o in f"{ds.name}-{rows}/{m}" for o in opts.only)]
            if models:
                out.append((ds, rows, models))
    return out


def run(opts) -> int:
    """Every selected run, then the report; returns how many dataset sizes had a failed step."""
    results = []
    for ds, rows, models in plan(opts):
        if ds.name == "movielens" and not (ROOT / quality.MOVIELENS_INPUT).is_dir():
            print(f"movielens: skipped, {quality.MOVIELENS_INPUT} (relative to the repository root) is not there")
            continue
        results.append(run_dataset(ds, rows, models, opts))
    report(results)
    return sum(bool(r.error) for r in results)


# ---- the report -----------------------------------------------------------------------------------


def _metric(summary: dict, metric: str) -> float:
    return float(summary["test"].get(metric, float("nan")))


def _reference(result: Result, summary: dict) -> Baseline | None:
    if result.dataset.name == "synthetic":
        return Baseline("oracle", summary["oracle_auc"]) if summary.get("oracle_auc") else None
    return result.baselines[0] if result.baselines else None


def table_rows(result: Result) -> list[list[str]]:
    rows, metric = [], result.dataset.metric
    for model, s in result.runs.items():
        value, ref = _metric(s, metric), _reference(result, s)
        shown_baselines = result.baselines or ([ref] if ref else [])
        rows.append(
            [
                result.label,
                f"{result.rows:,}",
                model,
                f"{metric.upper()} {value:.4f}",
                " · ".join(f"{b.name} {b.value:.4f}" for b in shown_baselines),
                f"{value - ref.value:+.4f} vs {ref.name}" if ref else "",
                str(s["steps"]),
                f"{s['train_time_s']:.0f}",
            ]
        )
    return rows


def target(result: Result) -> str:
    """'met' / 'missed' (with the numbers) of the dataset's target."""
    runs, name = result.runs, result.dataset.name
    ref = result.baselines[0] if result.baselines else None
    if result.error:
        return f"not run (failed: {_last_line(result.error)})"

    def verdict(ok: bool, text: str) -> str:
        return f"{'met' if ok else 'missed'} ({text})"

    if name == "census":
        if "wide_deep" not in runs or ref is None:
            return "not run (needs wide_deep and GBDT)"
        value = _metric(runs["wide_deep"], "auc")
        return verdict(value - ref.value >= -0.005, f"wide_deep {value:.4f}, {ref.name} {ref.value:.4f}")
    if name in ("criteo", "avazu"):
        if not {"dlrm", "wide_deep"} <= set(runs) or ref is None:
            return "not run (needs dlrm, wide_deep and hashed LR)"
        values = {m: _metric(runs[m], "auc") for m in ("dlrm", "wide_deep")}
        text = ", ".join(f"{m} {v:.4f}" for m, v in values.items()) + f", {ref.name} {ref.value:.4f}"
        return verdict(min(values.values()) >= ref.value, text)
    if name == "movielens":
        if not runs:
            return "not run"
        best = min(runs, key=lambda m: _metric(runs[m], "rmse"))
        return verdict(_metric(runs[best], "rmse") <= 0.91, f"best {best} RMSE {_metric(runs[best], 'rmse'):.4f}")
    if "dlrm" not in runs or not runs["dlrm"].get("oracle_auc"):
        return "not run (needs dlrm and the oracle AUC)"
    s = runs["dlrm"]
    gap = s["oracle_auc"] - _metric(s, "auc")
    return verdict(gap <= 0.015, f"dlrm {_metric(s, 'auc'):.4f}, oracle {s['oracle_auc']:.4f}, gap {gap:.4f}")


def derived_line(label: str, model: str, summary: dict) -> str:
    settings = ", ".join(f"{k.split('.')[-1]} {v['value']}" for k, v in summary.get("derived", {}).items())
    stop = f"; stopped early at step {summary['steps']}" if summary.get("stopped_early") else ""
    best = f"; tested the weights of step {summary['test_weights_step']}" if summary.get("test_weights_step") else ""
    return f"- {label}/{model}: {settings or '(none derived)'}{stop}{best}"


def _last_line(text: str) -> str:
    """The last non-empty line of a failure's log tail (the exception, the `error:` line)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def _listing(title: str, lines: list[str]) -> None:
    if lines:
        print(f"{title}\n")
        print("\n".join(lines) + "\n")


def report(results: list[Result]) -> None:
    if not results:
        print("defaults: nothing selected")
        return
    rows = [row for r in results for row in table_rows(r)]
    commands = [c for r in results for c in r.commands]
    header = ["dataset", "rows", "model", "test", "baselines (same split)", "diff", "steps", "train s"]
    print_table("Default commands only (2 ranks): test headline vs same-split baselines", header, rows, commands)
    _listing(
        "Derived defaults (summary.json `derived`):",
        [derived_line(r.label, m, s) for r in results for m, s in r.runs.items()],
    )
    _listing("Baselines:", [f"- {r.label} {b.name}: {b.detail}" for r in results for b in r.baselines if b.detail])
    _listing("Targets:", [f"- {r.label}: {r.dataset.target}: {target(r)}" for r in results])
    _listing("Failed (the log tail above):", [f"- {r.label}: {_last_line(r.error)}" for r in results if r.error])
    _listing(
        "Wall time (generate, prepare, baselines, train or read back):",
        [f"- {r.label}: {r.seconds / 60:.1f} min" for r in results],
    )
