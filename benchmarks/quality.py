"""Model quality on three datasets, through the real CLI: `recsys prepare`, then `recsys train` on 2 ranks.

    python benchmarks/quality.py synthetic     # every binary model vs the oracle AUC (~20 min)
    python benchmarks/quality.py movielens     # rating RMSE/MAE vs global-mean and bias baselines (~6 min)
    python benchmarks/quality.py census        # census-style CSV: AUC vs gradient-boosted trees (~4 min)
    python benchmarks/quality.py retrieval     # two-tower Recall@10/NDCG@10 vs most popular (~8 min)
    python benchmarks/quality.py defaults --sizes 10000,100000   # only the default commands (quality_defaults.py)
    python benchmarks/quality.py all           # the four above
    python benchmarks/quality.py movielens --only deepfm   # the runs whose label contains 'deepfm'
    python benchmarks/quality.py census --rerun            # train again instead of reading old results

Each section prepares its data once under data/quality/ (git-ignored; a preparer run again with the
same inputs says "up to date"), trains every listed run as a subprocess
`recsys train ... --nproc-per-node 2 --run-dir runs/quality/<section>/<label>`, reads the run's
`summary.json`, and prints a Markdown table followed by the exact commands. A run whose directory
already holds a `summary.json` written for the same command is read back, not trained again
(--rerun forces training). The runs of a section are the settings tried for BENCHMARKS.md: the
first run of each model is the plain preset, the others change one or two things.

  synthetic  `recsys prepare synthetic --rows 4000000` (the demo's generator, 8x the rows): test AUC,
             the oracle AUC of the test split (from the click model that drew the labels) and the gap.
  movielens  ../shared/data/movielens-100k (skipped with a message when absent), `recsys prepare
             movielens` (random 80/10/10, seed 0), rating regression: test RMSE and MAE, next to two
             baselines fitted on the train split in numpy: the global mean, and mean + user bias +
             item bias (alternating least squares with L2, regularisation picked on valid).
  census     benchmarks/census_like.py writes 100k census-style rows with known true probabilities;
             `recsys prepare tabular --cross education,occupation`: test AUC, the oracle AUC of the
             test rows, and scikit-learn's HistGradientBoostingClassifier on the raw columns of the
             same train/test rows (re-derived with the preparer's `assign_splits`), if importable.
  retrieval  ../shared/data/movielens-100k, `recsys prepare movielens --implicit --split
             leave-last-out` (each user's last rating is the test item, the one before it valid; 4
             sampled negatives per positive): test Recall@K / NDCG@K over the whole catalogue with
             each user's earlier items hidden, and the most-popular baseline (train counts) scored
             by the same code in the same run (`most_popular` in summary.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = Path("data/quality")  # relative to ROOT, which every command runs in
RUNS = Path("runs/quality")
MOVIELENS_INPUT = Path("../shared/data/movielens-100k")
NPROC = "2"


@dataclass
class Run:
    label: str
    model: str
    flags: list[str] = field(default_factory=list)
    note: str = ""


# ---- the runs of each section ------------------------------------------------------------------

# configs/demo.toml: batch 256 per rank, dense adam 0.01, sparse rowwise adagrad 0.02, 1 epoch,
# eval every 400 steps (781 steps an epoch on 2 ranks).
SYNTHETIC_CONFIG = "configs/demo.toml"
SYNTHETIC_ROWS = (
    4_000_000  # 500k (the demo) is data-limited: DLRM's valid AUC peaks after 1 epoch at 0.021 below the oracle
)
EVERY_2000 = ["--training.eval_every", "2000"]
LR_0003 = [*EVERY_2000, "--training.keep_best", "true", "--optimizer.dense_lr", "0.003"]
SYNTHETIC_RUNS = [
    Run("dlrm", "dlrm", EVERY_2000, "demo preset"),
    Run("dlrm_dcn", "dlrm_dcn", EVERY_2000, "demo preset"),
    Run("wide_deep", "wide_deep", EVERY_2000, "demo preset"),
    Run("deepfm", "deepfm", EVERY_2000, "demo preset"),
    Run(
        "dlrm_dcn+2ep",
        "dlrm_dcn",
        [*EVERY_2000, "--training.epochs", "2", "--training.keep_best", "true"],
        "2 epochs, best valid kept",
    ),
    Run(
        "wide_deep+2ep",
        "wide_deep",
        [*EVERY_2000, "--training.epochs", "2", "--training.keep_best", "true"],
        "2 epochs, best valid kept",
    ),
    Run(
        "deepfm+2ep",
        "deepfm",
        [*EVERY_2000, "--training.epochs", "2", "--training.keep_best", "true"],
        "2 epochs, best valid kept",
    ),
    Run(
        "dlrm_dcn+2ep+lr0.003",
        "dlrm_dcn",
        [*EVERY_2000, "--training.epochs", "2", "--training.keep_best", "true", "--optimizer.dense_lr", "0.003"],
        "2 epochs, best kept, dense lr 0.003",
    ),
    Run(
        "deepfm+lr0.003",
        "deepfm",
        [*EVERY_2000, "--training.keep_best", "true", "--optimizer.dense_lr", "0.003"],
        "dense lr 0.003, best kept",
    ),
    Run(
        "wide_deep+lr0.003",
        "wide_deep",
        [*EVERY_2000, "--training.keep_best", "true", "--optimizer.dense_lr", "0.003"],
        "dense lr 0.003, best kept",
    ),
    Run(
        "deepfm+lr0.003+cos", "deepfm", [*LR_0003, "--optimizer.lr_schedule", "cosine"], "dense lr 0.003, cosine decay"
    ),
    Run(
        "wide_deep+lr0.003+cos",
        "wide_deep",
        [*LR_0003, "--optimizer.lr_schedule", "cosine"],
        "dense lr 0.003, cosine decay",
    ),
    Run("deepfm+lr0.003+bn", "deepfm", [*LR_0003, "--model.batch_norm", "true"], "dense lr 0.003, batch norm"),
    Run("wide_deep+lr0.003+bn", "wide_deep", [*LR_0003, "--model.batch_norm", "true"], "dense lr 0.003, batch norm"),
    Run(
        "wide_deep+lr0.003+bn+2ep",
        "wide_deep",
        [*LR_0003, "--model.batch_norm", "true", "--training.epochs", "2"],
        "dense lr 0.003, batch norm, 2 epochs",
    ),
    Run(
        "wide_deep+lr0.003+bn+d32",
        "wide_deep",
        [*LR_0003, "--model.batch_norm", "true", "--model.embedding_dim", "32"],
        "dense lr 0.003, batch norm, embedding dim 32",
    ),
]

MOVIELENS_CONFIG = "configs/movielens.toml"
ML_LONGER = ["--training.epochs", "10", "--training.early_stopping_patience", "2"]
MOVIELENS_RUNS = [
    Run("dlrm", "dlrm", ["--training.epochs", "5"], "5 epochs"),
    Run("dlrm_dcn", "dlrm_dcn", ["--training.epochs", "5"], "5 epochs"),
    Run("wide_deep", "wide_deep", ["--training.epochs", "5"], "5 epochs"),
    Run("deepfm", "deepfm", ["--training.epochs", "5"], "5 epochs"),
    Run("dlrm_dcn+10ep", "dlrm_dcn", ML_LONGER, "10 epochs, early stop (patience 2)"),
    Run("deepfm+10ep", "deepfm", ML_LONGER, "10 epochs, early stop (patience 2)"),
    Run("dlrm_dcn+6ep", "dlrm_dcn", [], "preset: 6 epochs (the best valid epoch of the 10-epoch run)"),
    Run("two_tower", "two_tower", ["--training.epochs", "5"], "5 epochs; towers from the dataset"),
]

RETRIEVAL_CONFIG = "configs/movielens_retrieval.toml"
RETRIEVAL_RUNS = [
    Run("two_tower", "two_tower", [], "preset: in-batch softmax, temperature 0.1, logQ correction"),
    Run("two_tower+t0.05", "two_tower", ["--model.temperature", "0.05"], "temperature 0.05"),
    Run("two_tower-logq", "two_tower", ["--model.logq_correction", "false"], "no logQ correction"),
    Run(
        "two_tower+pointwise",
        "two_tower",
        ["--model.loss", "pointwise"],
        "pointwise log loss on the 4 sampled negatives",
    ),
]

CENSUS_ROWS = 100_000
CENSUS_CONFIG = "configs/census.toml"
CENSUS_PREPARE = ["--label", "income", "--positive", ">50K", "--cross", "education,occupation"]
CENSUS_RUNS = [
    Run("wide_deep", "wide_deep", ["--training.epochs", "5"], "5 epochs"),
    Run("deepfm", "deepfm", ["--training.epochs", "5"], "5 epochs"),
    Run("dlrm", "dlrm", ["--training.epochs", "5"], "5 epochs"),
    Run("dlrm_dcn", "dlrm_dcn", ["--training.epochs", "5"], "5 epochs"),
    Run("wide_deep+2ep", "wide_deep", [], "preset: 2 epochs (valid AUC peaks at epoch 2 in the 5-epoch runs)"),
]


# ---- running the CLI ---------------------------------------------------------------------------


def _recsys() -> list[str]:
    script = Path(sys.executable).parent / "recsys"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launch.cli"]


def shown(args: list[str]) -> str:
    """The command as a user types it (`recsys ...` from the repository root)."""
    return shlex.join(["recsys", *args])


def prepare(args: list[str]) -> None:
    print(f"$ {shown(args)}", flush=True)
    done = subprocess.run([*_recsys(), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: prepare failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def trained(section: str, config: str, data: Path, runs, opts, commands: list[str]):
    """(summary, the first two table cells: label and settings) of every selected run, trained (or reused);
    each run's command is appended to `commands`."""
    for run in selected(runs, opts.only):
        args = train_args(section, config, data, run)
        summary = train(args, opts.rerun)
        commands.append(shown(args))
        yield summary, [run.label, run.note or _settings(run)]


def train_args(section: str, config: str, data: Path, run: Run) -> list[str]:
    return [
        "train",
        "--config",
        config,
        "--data",
        str(data),
        "--model",
        run.model,
        *run.flags,
        "--nproc-per-node",
        NPROC,
        "--run-dir",
        str(RUNS / section / run.label),
    ]


def train(args: list[str], rerun: bool, data_key=None) -> dict:
    """`recsys train ARGS` (or its earlier result for the same ARGS, config file text and `data_key`
    if given): the run's summary.json."""
    run_dir = ROOT / args[args.index("--run-dir") + 1]
    stamp = run_dir / "quality_command.json"
    config = (ROOT / args[args.index("--config") + 1]).read_text() if "--config" in args else None
    key = {"args": args, "config": config, **({"data": data_key} if data_key is not None else {})}
    if not rerun and stamp.exists() and (run_dir / "summary.json").exists() and json.loads(stamp.read_text()) == key:
        print(f"  (cached) {shown(args)}", flush=True)
        return json.loads((run_dir / "summary.json").read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale summary.json must not pass for this run's
    print(f"$ {shown(args)}", flush=True)
    start = time.monotonic()
    done = subprocess.run(
        [*_recsys(), *args, "--training.progress_bar", "false"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode or not (run_dir / "summary.json").exists():
        sys.exit(f"error: training failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    stamp.write_text(json.dumps(key) + "\n")
    print(f"  {time.monotonic() - start:.0f} s, test {_metrics(summary['test'])}", flush=True)
    return summary


def _metrics(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "ctr")


def _settings(run: Run) -> str:
    return " ".join(run.flags) if run.flags else "(preset)"


def print_table(title: str, header: list[str], rows: list[list[str]], commands: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if commands:
        print("\n```")
        print("\n".join(commands))
        print("```")
    print(flush=True)


def selected(runs: list[Run], only: list[str] | None) -> list[Run]:
    return [r for r in runs if not only or any(o in r.label for o in only)]


# ---- synthetic ---------------------------------------------------------------------------------


def synthetic(opts) -> None:
    data = DATA / f"synthetic-{SYNTHETIC_ROWS // 1_000_000}m"
    prep = ["prepare", "synthetic", "--rows", str(SYNTHETIC_ROWS), "--out", str(data)]
    prepare(prep)
    rows, commands = [], [shown(prep)]
    for s, head in trained("synthetic", SYNTHETIC_CONFIG, data, SYNTHETIC_RUNS, opts, commands):
        auc, oracle = s["test"]["auc"], s["oracle_auc"]
        rows.append(
            [
                *head,
                f"{auc:.4f}",
                f"{oracle:.4f}",
                f"{oracle - auc:+.4f}",
                f"{s['best_valid'].get('auc', float('nan')):.4f}",
                str(s["steps"]),
                f"{s['train_time_s']:.0f}",
            ]
        )
    print_table(
        f"Synthetic ({SYNTHETIC_ROWS:,} rows, 2 ranks): test AUC vs oracle",
        ["run", "settings", "test AUC", "oracle AUC", "gap", "best valid AUC", "steps", "train s"],
        rows,
        commands,
    )


# ---- movielens ---------------------------------------------------------------------------------


def _ratings(data: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    table = pq.read_table(ROOT / data / split, columns=["user_id", "movie_id", "rating"])
    return (table["user_id"].to_numpy(), table["movie_id"].to_numpy(), table["rating"].to_numpy().astype(np.float64))


def bias_baseline(train, valid, test, sweeps: int = 10) -> dict:
    """Global mean, and mean + b_user + b_item fitted by alternating ridge solves on train; the
    L2 weight picked by valid RMSE. RMSE/MAE on test, predictions clipped to [1, 5]."""
    (tu, ti, tr), (vu, vi, vr), (su, si, sr) = train, valid, test
    mu = tr.mean()
    n_users, n_items = max(tu.max(), vu.max(), su.max()) + 1, max(ti.max(), vi.max(), si.max()) + 1
    n_u, n_i = np.bincount(tu, minlength=n_users), np.bincount(ti, minlength=n_items)

    def fit(lam: float):
        bu, bi = np.zeros(n_users), np.zeros(n_items)
        for _ in range(sweeps):
            bi = np.bincount(ti, tr - mu - bu[tu], n_items) / (n_i + lam)
            bu = np.bincount(tu, tr - mu - bi[ti], n_users) / (n_u + lam)
        return bu, bi

    def errors(bu, bi, u, i, r):
        e = np.clip(mu + bu[u] + bi[i], 1, 5) - r
        return float(np.sqrt((e**2).mean())), float(np.abs(e).mean())

    lams = (1, 2, 3, 5, 8, 12, 20, 30)
    best = min(lams, key=lambda lam: errors(*fit(lam), vu, vi, vr)[0])
    e = np.clip(mu, 1, 5) - sr
    return {
        "global_mean": (float(np.sqrt((e**2).mean())), float(np.abs(e).mean())),
        "bias": errors(*fit(best), su, si, sr),
        "bias_lambda": best,
    }


def movielens(opts) -> None:
    if not (ROOT / MOVIELENS_INPUT).is_dir():
        print(f"movielens: skipped, {MOVIELENS_INPUT} (relative to the repository root) is not there")
        return
    data = DATA / "movielens"
    prep = ["prepare", "movielens", "--input", str(MOVIELENS_INPUT), "--out", str(data), *"--split random".split()]
    prepare(prep)
    base = bias_baseline(*(_ratings(data, s) for s in ("train", "valid", "test")))
    als = f"ALS, 10 sweeps, L2 {base['bias_lambda']} (picked on valid)"
    rows = [
        ["global mean", "train mean rating", *(f"{x:.4f}" for x in base["global_mean"]), "", "", ""],
        ["user + item bias", als, *(f"{x:.4f}" for x in base["bias"]), "", "", ""],
    ]
    commands = [shown(prep)]
    for s, head in trained("movielens", MOVIELENS_CONFIG, data, MOVIELENS_RUNS, opts, commands):
        rows.append(
            [
                *head,
                f"{s['test']['rmse']:.4f}",
                f"{s['test']['mae']:.4f}",
                f"{s['best_valid'].get('rmse', float('nan')):.4f}",
                str(s["steps"]),
                f"{s['train_time_s']:.0f}",
            ]
        )
    print_table(
        "MovieLens-100K ratings (random 80/10/10, 2 ranks): test RMSE / MAE in stars",
        ["run", "settings", "test RMSE", "test MAE", "best valid RMSE", "steps", "train s"],
        rows,
        commands,
    )


# ---- retrieval ---------------------------------------------------------------------------------


def retrieval(opts) -> None:
    if not (ROOT / MOVIELENS_INPUT).is_dir():
        print(f"retrieval: skipped, {MOVIELENS_INPUT} (relative to the repository root) is not there")
        return
    data = DATA / "movielens-implicit-llo"
    prep = ["prepare", "movielens", "--input", str(MOVIELENS_INPUT), "--out", str(data), "--implicit"]
    prep += ["--split", "leave-last-out"]
    prepare(prep)
    rows, commands, popular = [], [shown(prep)], None
    for s, head in trained("retrieval", RETRIEVAL_CONFIG, data, RETRIEVAL_RUNS, opts, commands):
        popular = s["most_popular"]["test"]
        t = s["test"]
        rows.append(
            [
                *head,
                f"{t['recall@10']:.4f}",
                f"{t['ndcg@10']:.4f}",
                f"{t['recall@50']:.4f}",
                f"{t['ndcg@50']:.4f}",
                f"{t['recall@10'] / popular['recall@10']:.2f}x",
                f"{s['best_valid']['recall@10']:.4f}",
                str(s["best_valid_step"]),
                f"{s['train_time_s']:.0f}",
            ]
        )
    if popular:
        rows.insert(
            0,
            [
                "most popular",
                "train counts, the user's earlier items hidden",
                f"{popular['recall@10']:.4f}",
                f"{popular['ndcg@10']:.4f}",
                f"{popular['recall@50']:.4f}",
                f"{popular['ndcg@50']:.4f}",
                "1.00x",
                "",
                "",
                "",
            ],
        )
    print_table(
        "MovieLens-100K implicit, leave-last-out (943 test users, 1682 items, 2 ranks): top-K over the whole catalogue",
        [
            "run",
            "settings",
            "test Recall@10",
            "test NDCG@10",
            "Recall@50",
            "NDCG@50",
            "R@10 vs popular",
            "best valid R@10",
            "best step",
            "train s",
        ],
        rows,
        commands,
    )


# ---- census ------------------------------------------------------------------------------------


def tabular_split(csv: Path, label: str = "income", positive=(">50K",)):
    """(the table as the preparer reads it, 0/1 labels, split index per row) of a binary CSV, with the
    split re-derived as `recsys prepare tabular` assigns it (default --split 80,10,10 and --seed 0)."""
    from data_pipeline.prepare.tabular import assign_splits, read_table
    from data_pipeline.prepare.tabular_transforms import NULL_VALUES, LabelSpec

    table = read_table(ROOT / csv)
    labels = LabelSpec(label, "binary", list(positive)).values(table[label], NULL_VALUES)
    labels = np.asarray(labels.to_numpy(zero_copy_only=False), np.int64)  # (a null label would be dropped)
    return table, labels, assign_splits(labels, [0.8, 0.1, 0.1], seed=0)


def census_baselines(csv: Path, label: str = "income", positive=(">50K",)) -> tuple[float | None, dict]:
    """(oracle AUC of the test rows, from `<csv>.truth.npz` if there, {name: test AUC}) for the GBDT
    baseline on the same splits."""
    import pyarrow.compute as pc
    from census_like import auc

    table, labels, split = tabular_split(csv, label, positive)
    truth = ROOT / csv.with_name(csv.name + ".truth.npz")
    test = split == 2
    oracle = auc(np.load(truth)["prob"][test], labels[test]) if truth.exists() else None
    results = {}
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
    except ImportError:
        print("census: scikit-learn is not importable, GBDT baseline skipped")
        return oracle, results
    columns, categorical = [], []
    for name in table.column_names:
        if name == label:
            continue
        col = table[name]
        if pa_is_numeric(col.type):
            columns.append(pc.fill_null(pc.cast(col, "float64"), np.nan).to_numpy())
            categorical.append(False)
        else:  # codes by train frequency; HGB takes at most 255 categories, the rest share one
            values = np.array([str(v) if v is not None else "" for v in col.to_pylist()])
            uniq, inverse = np.unique(values, return_inverse=True)
            counts = np.bincount(inverse[split == 0], minlength=len(uniq))
            rank = np.empty(len(uniq), np.int64)
            rank[np.argsort(-counts, kind="stable")] = np.arange(len(uniq))
            codes = np.minimum(rank[inverse], 250).astype(np.float64)
            codes[values == ""] = np.nan
            columns.append(codes)
            categorical.append(True)
    x = np.stack(columns, axis=1)
    start = time.monotonic()
    # early stopping on a 10% slice of train (sklearn's own), so the test rows are never looked at
    gbdt = HistGradientBoostingClassifier(
        max_iter=500,
        learning_rate=0.1,
        categorical_features=np.array(categorical),
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=20,
        random_state=0,
    )
    gbdt.fit(x[split == 0], labels[split == 0])
    test_prob = gbdt.predict_proba(x[test])[:, 1]
    results[
        f"GBDT (HistGradientBoosting, raw columns, {gbdt.n_iter_} trees, early stop on 10% of train, "
        f"{time.monotonic() - start:.0f} s)"
    ] = auc(test_prob, labels[test])
    return oracle, results


def pa_is_numeric(t) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t)


def census(opts) -> None:
    csv = DATA / "census.csv"
    gen = [sys.executable, "benchmarks/census_like.py", "--rows", str(CENSUS_ROWS), "--out", str(csv)]
    truth = ROOT / csv.with_name(csv.name + ".truth.json")
    if not (truth.exists() and json.loads(truth.read_text())["rows"] == CENSUS_ROWS):
        subprocess.run(gen, cwd=ROOT, check=True)
    data = DATA / "census"
    prep = ["prepare", "tabular", "--input", str(csv), *CENSUS_PREPARE, "--out", str(data)]
    prepare(prep)
    oracle, baselines = census_baselines(csv)
    rows = [["oracle", "true probabilities of the generator", f"{oracle:.4f}", "", "", ""]]
    rows += [
        [name.split(" (")[0], name.split(" (", 1)[1].rstrip(")"), f"{value:.4f}", "", "", ""]
        for name, value in baselines.items()
    ]
    commands = [f"python benchmarks/census_like.py --rows {CENSUS_ROWS} --out {csv}", shown(prep)]
    for s, head in trained("census", CENSUS_CONFIG, data, CENSUS_RUNS, opts, commands):
        rows.append(
            [
                *head,
                f"{s['test']['auc']:.4f}",
                f"{s['test']['logloss']:.4f}",
                f"{s['best_valid'].get('auc', float('nan')):.4f}",
                str(s["steps"]),
            ]
        )
    print_table(
        f"Census-like ({CENSUS_ROWS:,} rows, stratified 80/10/10, 2 ranks): test AUC",
        ["run", "settings", "test AUC", "test logloss", "best valid AUC", "steps"],
        rows,
        commands,
    )


def defaults(opts) -> None:
    from quality_defaults import run

    if run(opts):  # the number of datasets with a failed step
        sys.exit(1)


SECTIONS = {
    "synthetic": synthetic,
    "movielens": movielens,
    "census": census,
    "retrieval": retrieval,
    "defaults": defaults,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=(*SECTIONS, "all"))
    parser.add_argument("--only", nargs="+", help="only the runs whose label contains one of these")
    parser.add_argument(
        "--rerun", action="store_true", help="train again even where a result for the same command exists"
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10_000, 100_000, 1_000_000],
        help="defaults: rows of the generated datasets (default 10000,100000,1000000)",
    )
    opts = parser.parse_args(argv)
    for name in [s for s in SECTIONS if s != "defaults"] if opts.section == "all" else [opts.section]:
        SECTIONS[name](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
