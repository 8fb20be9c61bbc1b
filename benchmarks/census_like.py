"""Census-style tabular data (like UCI Adult) from a known income model, as CSV.

    python benchmarks/census_like.py --rows 100000 --out data/quality/census.csv
    recsys prepare tabular --input data/quality/census.csv --label income --positive '>50K' \\
        --cross education,occupation --out data/quality/census

Writes the CSV and, next to it, `<out>.truth.npz` (`prob`: the true P(income = '>50K') of every
row, in CSV order) and `<out>.truth.json` (the oracle AUC over all rows: the AUC of the true
probabilities against the drawn labels, the best any model can do, and the spec). A benchmark
re-derives the preparer's split (`data_pipeline.prepare.tabular.assign_splits`) to get the oracle AUC of
the test rows alone.

What makes it census-like and hard but learnable:
  - string categoricals with many levels and a rare tail: occupation (40, Zipf), education (16,
    ordered), native_country (60, one dominant value then a long tail), workclass, marital_status,
    relationship, race, sex, employer (2,000 Zipf levels, a weak effect: mostly noise to ignore);
  - skewed numerics: capital_gain and capital_loss (zeros for ~90%, thresholds that matter),
    hours_per_week (bunched at 40), age, fnlwgt (pure noise), education_num (the ordinal of
    education, duplicated as in Adult);
  - nulls ("?") in workclass, occupation, native_country and hours_per_week; two booleans;
  - the label: a logistic model with main effects, an education x occupation interaction (each
    occupation rewards schooling differently, plus a random low-rank part only a cross or an
    embedding can capture), age (concave), hours (saturating, stronger for self-employed), capital
    gain/loss thresholds, marriage x sex; scaled so the Bayes-optimal AUC is about 0.92.
Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

EDUCATION = (
    *"Preschool 1st-4th 5th-6th 7th-8th 9th 10th 11th 12th HS-grad Some-college Assoc-voc Assoc-acdm".split(),
    *"Bachelors Masters Prof-school Doctorate".split(),
)
EDUCATION_P = (
    0.002,
    0.005,
    0.01,
    0.02,
    0.016,
    0.028,
    0.036,
    0.013,
    0.32,
    0.22,
    0.042,
    0.033,
    0.165,
    0.055,
    0.018,
    0.017,
)
WORKCLASS = (*"Private Self-emp-not-inc Local-gov State-gov Self-emp-inc Federal-gov Without-pay Never-worked".split(),)
WORKCLASS_P = (0.73, 0.08, 0.065, 0.04, 0.035, 0.03, 0.012, 0.008)
MARITAL = (
    *"Married-civ-spouse Never-married Divorced Separated Widowed Married-spouse-absent Married-AF-spouse".split(),
)
MARITAL_P = (0.46, 0.33, 0.135, 0.03, 0.03, 0.013, 0.002)
RACE = ("White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other")
RACE_P = (0.85, 0.096, 0.032, 0.01, 0.012)
NUM_OCCUPATIONS, NUM_COUNTRIES, NUM_EMPLOYERS = 40, 60, 2000
TEMPERATURE = 1.6  # multiplies the logit; set so the oracle AUC is ~0.92 at the default seed


def _zipf(rng: np.random.Generator, n: int, k: int, a: float) -> np.ndarray:
    p = 1.0 / np.arange(1, k + 1) ** a
    return rng.choice(k, size=n, p=p / p.sum())


def generate(rows: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """(the table with an `income` column, the true probability of '>50K' per row)."""
    world = np.random.default_rng(seed)  # the hidden model: fixed per seed
    occ_effect = world.normal(0, 0.5, NUM_OCCUPATIONS)
    occ_skill = world.uniform(0, 1, NUM_OCCUPATIONS)  # how much schooling pays in the occupation
    occ_lowrank = world.normal(0, 1, (NUM_OCCUPATIONS, 2))
    edu_lowrank = world.normal(0, 1, (len(EDUCATION), 2))
    country_effect = world.normal(0, 0.35, NUM_COUNTRIES)
    country_effect[0] = 0.0
    employer_effect = world.normal(0, 0.25, NUM_EMPLOYERS)
    workclass_effect = np.array([0.0, -0.1, 0.1, 0.0, 0.7, 0.4, -1.5, -2.0])
    marital_effect = np.array([1.4, -0.9, -0.3, -0.6, -0.4, -0.2, 0.8])
    race_effect = np.array([0.0, -0.25, 0.05, -0.3, -0.2])

    rng = np.random.default_rng(seed + 1)  # the rows
    n = rows
    age = np.clip(np.round(17 + rng.gamma(3.0, 7.0, n)), 17, 90).astype(np.int64)
    edu = rng.choice(len(EDUCATION), n, p=np.array(EDUCATION_P) / np.sum(EDUCATION_P))
    # the young have had less time to finish school
    young = age < 22
    edu[young] = np.minimum(edu[young], rng.integers(6, 10, young.sum()))
    occ = _zipf(rng, n, NUM_OCCUPATIONS, 1.1)
    workclass = rng.choice(len(WORKCLASS), n, p=WORKCLASS_P)
    marital = rng.choice(len(MARITAL), n, p=MARITAL_P)
    marital[(age < 23) & (rng.random(n) < 0.7)] = 1  # mostly never married when young
    sex = (rng.random(n) < 0.67).astype(np.int64)  # 1 = Male
    husband = (marital == 0) & (sex == 1)
    relationship = np.where(
        husband,
        "Husband",
        np.where(
            (marital == 0),
            "Wife",
            rng.choice(["Not-in-family", "Own-child", "Unmarried", "Other-relative"], n, p=[0.5, 0.3, 0.15, 0.05]),
        ),
    )
    race = rng.choice(len(RACE), n, p=RACE_P)
    country = np.where(rng.random(n) < 0.88, 0, 1 + _zipf(rng, n, NUM_COUNTRIES - 1, 1.2))
    employer = _zipf(rng, n, NUM_EMPLOYERS, 0.9)
    hours = np.clip(np.where(rng.random(n) < 0.45, 40, np.round(rng.normal(41, 12, n))), 1, 99).astype(np.int64)
    gain = np.where(rng.random(n) < 0.085, np.round(np.exp(rng.normal(8.2, 1.2, n))), 0).astype(np.int64)
    gain[rng.random(n) < 0.005] = 99999  # the top-coded value, as in Adult
    loss = np.where(rng.random(n) < 0.045, np.round(rng.normal(1900, 350, n)).clip(100, 4400), 0).astype(np.int64)
    fnlwgt = np.round(np.exp(rng.normal(12.0, 0.5, n))).astype(np.int64)
    veteran = rng.random(n) < 0.08 + 0.1 * (age > 60)
    has_mortgage = rng.random(n) < 0.2 + 0.3 * (marital == 0)

    # ---- the income model ----
    e = edu - 8.0  # HS-grad = 0
    logit = -2.4
    logit = logit + 0.22 * e + occ_effect[occ] + 0.35 * e * (occ_skill[occ] - 0.4)
    logit = logit + 0.45 * np.sum(edu_lowrank[edu] * occ_lowrank[occ], axis=1)
    logit = logit + 0.055 * (np.minimum(age, 52) - 38) - 0.04 * np.maximum(age - 62, 0)
    self_emp = np.isin(workclass, (1, 4))
    logit = logit + (0.03 + 0.03 * self_emp) * np.clip(hours - 40, -25, 20)
    logit = logit + workclass_effect[workclass] + marital_effect[marital] + 0.35 * husband + 0.25 * sex
    logit = logit + race_effect[race] + country_effect[country] + employer_effect[employer]
    logit = logit + np.where(gain >= 7000, 3.0, np.where(gain >= 3000, 0.6, np.where(gain > 0, -0.3, 0.0)))
    logit = logit + np.where((loss >= 1800) & (loss <= 2400), 1.1, 0.0)
    logit = logit + 0.2 * veteran + 0.2 * has_mortgage
    prob = 1.0 / (1.0 + np.exp(-TEMPERATURE * logit))
    income = rng.random(n) < prob

    # ---- missing values, as a survey has them (after the label: missingness carries no signal
    # beyond what the hidden value did) ----
    def null_out(values: np.ndarray, rate: float) -> pa.Array:
        return pa.array(values, mask=rng.random(n) < rate)

    occ_names = np.array([f"occ-{i:02d}" for i in range(NUM_OCCUPATIONS)])
    country_names = np.array(["United-States"] + [f"country-{i:02d}" for i in range(1, NUM_COUNTRIES)])
    table = pa.table(
        {
            "age": pa.array(age),
            "workclass": null_out(np.array(WORKCLASS)[workclass], 0.05),
            "fnlwgt": pa.array(fnlwgt),
            "education": pa.array(np.array(EDUCATION)[edu]),
            "education_num": pa.array(edu + 1),
            "marital_status": pa.array(np.array(MARITAL)[marital]),
            "occupation": null_out(occ_names[occ], 0.05),
            "relationship": pa.array(relationship),
            "race": pa.array(np.array(RACE)[race]),
            "sex": pa.array(np.where(sex == 1, "Male", "Female")),
            "capital_gain": pa.array(gain),
            "capital_loss": pa.array(loss),
            "hours_per_week": null_out(hours, 0.02),
            "native_country": null_out(country_names[country], 0.02),
            "employer": pa.array(np.array([f"emp{i:04d}" for i in range(NUM_EMPLOYERS)])[employer]),
            "veteran": pa.array(veteran),
            "has_mortgage": pa.array(has_mortgage),
            "income": pa.array(np.where(income, ">50K", "<=50K")),
        }
    )
    return table, prob


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (ties count half), numpy only."""
    labels = np.asarray(labels, bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    # average ranks over ties
    start = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    end = np.r_[start[1:], len(s)]
    avg = (start + end + 1) / 2.0
    ranks[order] = np.repeat(avg, end - start)
    pos = labels.sum()
    neg = len(labels) - pos
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args(argv)
    table, prob = generate(args.rows, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="none"))
    # pyarrow writes nulls as empty fields; the preparer reads "" (and "?") as null
    labels = np.array(table["income"].to_pylist()) == ">50K"
    truth = {
        "rows": args.rows,
        "seed": args.seed,
        "positive_rate": round(float(labels.mean()), 4),
        "oracle_auc": round(auc(prob, labels), 5),
    }
    np.savez(out.with_name(out.name + ".truth.npz"), prob=prob)
    out.with_name(out.name + ".truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    tmp.replace(out)
    print(
        f"{args.rows:,} rows -> {out}; positive rate {truth['positive_rate']:.3f}, oracle AUC {truth['oracle_auc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
