"""Click logs shaped like Criteo's (TSV) and Avazu's (CSV), drawn from a known click model.

    python benchmarks/click_logs.py criteo --rows 100000 --out data/quality/defaults/criteo-100000.tsv
    recsys prepare criteo --input data/quality/defaults/criteo-100000.tsv --out data/quality/defaults/criteo-100000
    python benchmarks/click_logs.py avazu --rows 100000 --out data/quality/defaults/avazu-100000.csv
    recsys prepare tabular --input data/quality/defaults/avazu-100000.csv --label click --out D

Next to the output: `<out>.truth.npz` (`prob`: the true click probability of every line, in file
order) and `<out>.truth.json` (rows, seed, click rate, the oracle AUC of all lines, the distinct
values of every categorical column). Deterministic from --seed: `world = default_rng(seed)` fixes
the hidden model, `default_rng(seed + 1)` draws the rows; the intercept is calibrated on a fixed
sample of the world, so the model is the same at every --rows.

criteo: no header, 40 tab-separated fields a line, as Criteo's Kaggle/Terabyte logs:
  - label 0/1, click rate ~0.25;
  - 13 integer counts with Criteo's missing rates (0 to 76% empty), log-normal with heavy tails
    (one column to millions), correlated through a shared activity level, a few small negatives
    in int_1 as in Criteo's I2;
  - 26 categoricals as 8-digit hex strings, each a Zipf draw over its own id universe (6 to 10M
    ids) plus, for the 7 near-unique columns, a share of one-off ids: distinct values per column
    grow with the rows, ~5 to ~900k at 1M lines; ~5% of the fields empty overall.
  Click model (logistic): 14 categoricals have per-id effects, large for popular ids and shrinking
  with the id's rank (1 / sqrt(1 + rank / 30)), one-off ids only add noise; 5 pairs of categoricals
  interact through a rank-3 product of per-id vectors (their 5,000 most popular ids), which a
  logistic regression on one-hot features cannot represent; 7 counts act through log1p (linear,
  saturating), two through being missing, one through a count x categorical interaction.

avazu: a header and Avazu's 24 columns: id (unique per row), click (~0.17), hour (YYMMDDHH,
14102100..14103023, rows in time order, a daily cycle), C1, banner_pos, site_id/site_domain/
site_category or app_id/app_domain/app_category (a row is a site or an app impression; the other
side holds Avazu's placeholder values), device_id (mostly one value), device_ip (a long tail),
device_model, device_type, device_conn_type, C14..C21 (integer codes: C14 thousands of levels,
C17 its group, C19/C21 from C17, C15 x C16 the ad size, C20 -1 or 100xxx). Click model: site and
app effects (popular ones larger), C14 and its group C17, device model, banner position, ad size,
connection, the hour of the day, a repeat-device effect, and interactions site category x time of
day, app category x device type, C17 group x banner position.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

VERSION = 1  # bump when the lines of the same --rows and --seed change

# (id universe, Zipf exponent, missing rate, share of one-off ids, effect scale) of cat_0..cat_25
CRITEO_CATEGORICALS = (
    (1_460, 1.10, 0.00, 0.00, 0.48),
    (583, 1.00, 0.00, 0.00, 0.40),
    (10_000_000, 1.05, 0.03, 0.85, 0.00),
    (2_000_000, 1.05, 0.03, 0.50, 0.48),
    (305, 1.20, 0.00, 0.00, 0.64),
    (24, 1.30, 0.12, 0.00, 0.48),
    (12_517, 1.10, 0.00, 0.00, 0.56),
    (633, 1.20, 0.00, 0.00, 0.00),
    (6, 1.50, 0.00, 0.00, 0.00),
    (93_145, 1.05, 0.00, 0.05, 0.48),
    (5_683, 1.10, 0.00, 0.00, 0.00),
    (8_000_000, 1.05, 0.03, 0.70, 0.00),
    (3_194, 1.10, 0.00, 0.00, 0.32),
    (27, 1.20, 0.00, 0.00, 0.48),
    (14_992, 1.10, 0.00, 0.00, 0.48),
    (5_000_000, 1.05, 0.03, 0.60, 0.00),
    (10, 1.00, 0.00, 0.00, 0.64),
    (5_652, 1.10, 0.00, 0.00, 0.00),
    (2_173, 1.10, 0.20, 0.00, 0.40),
    (8, 1.00, 0.20, 0.00, 0.00),
    (7_000_000, 1.05, 0.03, 0.65, 0.00),
    (18, 1.20, 0.30, 0.00, 0.00),
    (15, 1.10, 0.00, 0.00, 0.48),
    (286_181, 1.05, 0.00, 0.10, 0.48),
    (105, 1.10, 0.20, 0.00, 0.00),
    (142_572, 1.05, 0.20, 0.05, 0.00),
)
# (missing rate, log-mean, log-sd) of int_0..int_12 (Criteo's I1..I13 missing rates)
CRITEO_COUNTS = (
    (0.45, 0.8, 1.3),
    (0.00, 2.0, 2.0),
    (0.21, 1.8, 1.6),
    (0.21, 1.6, 1.0),
    (0.03, 7.5, 2.2),
    (0.22, 3.5, 2.0),
    (0.04, 1.8, 1.7),
    (0.0005, 2.3, 1.0),
    (0.04, 3.7, 1.5),
    (0.45, 0.3, 0.7),
    (0.04, 1.0, 1.0),
    (0.76, 0.2, 1.0),
    (0.21, 1.8, 1.1),
)
CRITEO_PAIRS = ((4, 13), (6, 16), (1, 22), (5, 9), (0, 12))
PAIR_RANK, PAIR_TOP, PAIR_SCALE = 3, 5_000, 0.3
CRITEO_CTR, CRITEO_TEMPERATURE = 0.25, 0.9  # the temperature sets the oracle AUC: ~0.80 at seed 0
AVAZU_CTR, AVAZU_TEMPERATURE = 0.17, 1.25  # ~0.77
CALIBRATION_ROWS = 50_000

AVAZU_COLUMNS = (
    *"id click hour C1 banner_pos site_id site_domain site_category app_id app_domain app_category".split(),
    *"device_id device_ip device_model device_type device_conn_type C14 C15 C16 C17 C18 C19 C20 C21".split(),
)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


# ---- deterministic hashing: per-id effects of any universe without tables ------------------------


def mix(x) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    z = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(salt: int, ids) -> np.ndarray:
    return mix(np.uint64(salt) ^ mix(ids))


def _uniform(salt: int, ids) -> np.ndarray:
    return (_key(salt, ids) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _gauss(salt: int, ids) -> np.ndarray:
    """A standard normal per id (Box-Muller on two hashed uniforms)."""
    u1, u2 = _uniform(salt, ids), _uniform(salt ^ 0x5BD1E995, ids)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


def _salts(world: np.random.Generator, n: int) -> list[int]:
    return [int(s) for s in world.integers(1, 2**63, n)]


def _power_ranks(rng: np.random.Generator, n: int, k: int, a: float) -> np.ndarray:
    """Ranks 0..k-1 with P(rank r) ~ (r + 1)^-a (a continuous power law, floored)."""
    u = rng.random(n)
    if abs(a - 1.0) < 1e-9:
        x = np.exp(u * np.log(k + 1.0))
    else:
        x = (1.0 + u * ((k + 1.0) ** (1 - a) - 1.0)) ** (1.0 / (1 - a))
    return np.minimum(np.floor(x).astype(np.int64) - 1, k - 1)


def _hex(values: np.ndarray) -> np.ndarray:
    """The low 32 bits of each value as 8 lowercase hex digits (numpy bytes, 'S8')."""
    v = np.asarray(values).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    shifts = np.arange(28, -1, -4, dtype=np.uint64)
    digits = ((v[:, None] >> shifts) & np.uint64(0xF)).astype(np.intp)
    return np.ascontiguousarray(_HEX[digits]).view("S8").ravel()


def _strings(values: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    return pa.array(values, type=pa.binary(), mask=missing).cast(pa.string())


def _calibrate(logit: np.ndarray, target: float) -> float:
    """The intercept b with mean(sigmoid(b + logit)) = target over the calibration sample."""
    low, high = -20.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        if np.mean(1 / (1 + np.exp(-(mid + logit)))) < target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


# ---- criteo --------------------------------------------------------------------------------------


class _CriteoModel:
    def __init__(self, seed: int) -> None:
        world = np.random.default_rng(seed)
        self.effect_salts = _salts(world, len(CRITEO_CATEGORICALS))
        self.value_salts = _salts(world, len(CRITEO_CATEGORICALS))
        self.pair_salts = _salts(world, 2 * len(CRITEO_PAIRS))
        self.noise_salt, self.fresh_salt, self.dense_salt = _salts(world, 3)
        self.count_rho = world.uniform(0.3, 0.7, len(CRITEO_COUNTS))
        self.bias = 0.0
        sample = self.rows(np.random.default_rng([seed, 7]), CALIBRATION_ROWS, first_row=1 << 40)
        self.bias = _calibrate(self.logit(*sample), CRITEO_CTR)

    def rows(self, rng: np.random.Generator, n: int, first_row: int = 0):
        """(ranks [n, 26] with -1 missing and -2 one-off, counts [n, 13] float with NaN missing, row ids)."""
        ranks = np.empty((n, len(CRITEO_CATEGORICALS)), np.int64)
        for j, (k, a, missing, fresh, _) in enumerate(CRITEO_CATEGORICALS):
            ranks[:, j] = _power_ranks(rng, n, k, a)
            ranks[rng.random(n) < fresh, j] = -2
            ranks[rng.random(n) < missing, j] = -1
        activity = rng.normal(0, 1, n)
        counts = np.empty((n, len(CRITEO_COUNTS)))
        for j, (missing, mu, sd) in enumerate(CRITEO_COUNTS):
            rho = self.count_rho[j]
            z = rho * activity + np.sqrt(1 - rho**2) * rng.normal(0, 1, n)
            counts[:, j] = np.floor(np.exp(mu + sd * z)) - 1
            counts[rng.random(n) < missing, j] = np.nan
        negative = rng.random(n) < 0.04
        counts[negative, 1] = -rng.integers(1, 4, negative.sum())
        return ranks, counts, first_row + np.arange(n, dtype=np.int64)

    def logit(self, ranks: np.ndarray, counts: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        logit = np.zeros(len(ranks))
        for j, (_, _, _, _, scale) in enumerate(CRITEO_CATEGORICALS):
            if not scale:
                continue
            r = ranks[:, j]
            effect = scale * _gauss(self.effect_salts[j], np.maximum(r, 0)) / np.sqrt(1 + np.maximum(r, 0) / 30)
            effect[r == -1] = scale * _gauss(self.effect_salts[j], 1 << 50)[()]  # missing: a value of its own
            fresh = r == -2
            effect[fresh] = 0.1 * scale * _gauss(self.noise_salt ^ j, row_ids[fresh])  # one-off ids: noise
            logit += effect
        for p, (a, b) in enumerate(CRITEO_PAIRS):
            ra, rb = ranks[:, a], ranks[:, b]
            on = (ra >= 0) & (ra < PAIR_TOP) & (rb >= 0) & (rb < PAIR_TOP)
            dot = np.zeros(len(ranks))
            for d in range(PAIR_RANK):
                u = _gauss(self.pair_salts[2 * p], np.maximum(ra, 0) * PAIR_RANK + d)
                v = _gauss(self.pair_salts[2 * p + 1], np.maximum(rb, 0) * PAIR_RANK + d)
                dot += u * v
            logit += np.where(on, PAIR_SCALE * dot / np.sqrt(PAIR_RANK), 0.0)
        x = np.log1p(np.maximum(np.nan_to_num(counts, nan=0.0), 0))
        logit += 0.25 * (x[:, 0] - 1.0) - 0.25 * np.isnan(counts[:, 0])
        logit += -0.10 * (x[:, 2] - 1.5) - 0.15 * (x[:, 5] - 3.0) + 0.20 * (x[:, 6] - 1.5)
        logit += 0.35 * np.tanh(x[:, 8] - 3.0) + 0.30 * (x[:, 10] - 1.0) - 0.10 * (x[:, 12] - 1.5)
        logit += -0.20 * np.isnan(counts[:, 9])
        logit += 0.15 * (x[:, 0] - 1.0) * _gauss(self.dense_salt, np.maximum(ranks[:, 8], 0))
        return CRITEO_TEMPERATURE * logit

    def values(self, ranks: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
        """The raw 32-bit value of every field (uint64; garbage where missing)."""
        out = np.empty(ranks.shape, np.uint64)
        for j in range(ranks.shape[1]):
            r = ranks[:, j]
            out[:, j] = np.where(r == -2, _key(self.fresh_salt ^ j, row_ids), _key(self.value_salts[j], r))
        return out


def criteo(rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """(the lines as a table: label, int_0..int_12, cat_0..cat_25, the true click probability of each)."""
    model = _CriteoModel(seed)
    rng = np.random.default_rng(seed + 1)
    ranks, counts, row_ids = model.rows(rng, rows)
    prob = 1 / (1 + np.exp(-(model.bias + model.logit(ranks, counts, row_ids))))
    label = (rng.random(rows) < prob).astype(np.int64)
    values = model.values(ranks, row_ids)
    columns = {"label": pa.array(label)}
    for j in range(counts.shape[1]):
        missing = np.isnan(counts[:, j])
        columns[f"int_{j}"] = pa.array(np.nan_to_num(counts[:, j]).astype(np.int64), mask=missing)
    for j in range(ranks.shape[1]):
        columns[f"cat_{j}"] = _strings(_hex(values[:, j]), ranks[:, j] == -1)
    return pa.table(columns), prob


# ---- avazu ---------------------------------------------------------------------------------------

SITE_PLACEHOLDER = ("85f751fd", "c4e18dd6", "50e219e0")  # Avazu's site columns on app rows
APP_PLACEHOLDER = ("ecad2386", "7801e8d9", "07d7df22")  # and app columns on site rows
DEFAULT_DEVICE = "a99f214a"
HOUR_WEIGHTS = np.array([3, 2, 2, 2, 3, 4, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 5, 5, 4, 4, 3], float)
AD_SIZES = ((320, 50, 0.90), (300, 250, 0.05), (216, 36, 0.015), (728, 90, 0.02), (120, 20, 0.005))
AD_SIZES += ((1024, 768, 0.004), (480, 320, 0.003), (768, 1024, 0.003))


def _pick(rng: np.random.Generator, n: int, values, p) -> tuple[np.ndarray, np.ndarray]:
    """(index, value) of n draws from `values` with probabilities p."""
    index = rng.choice(len(values), n, p=np.asarray(p, float) / np.sum(p))
    return index, np.asarray(values)[index]


class _AvazuModel:
    def __init__(self, seed: int) -> None:
        world = np.random.default_rng(seed)
        self.s = dict(zip("site app c14 c17 model bpos size conn hour ip dev sitecat appcat dtype ids vals".split(),
                          _salts(world, 16)))  # fmt: skip
        self.c14_codes = np.sort(world.choice(np.arange(375, 24_053), 2_600, replace=False))
        self.c17_of_c14 = world.integers(0, 435, 2_600)
        self.c17_codes = np.sort(world.choice(np.arange(112, 2_759), 435, replace=False))
        self.c19_of_c17 = world.choice(np.sort(world.choice(np.arange(33, 1_960), 68, replace=False)), 435)
        self.c21_of_c17 = world.choice(np.sort(world.choice(np.arange(1, 220), 60, replace=False)), 435)
        self.c20_of_c17 = np.where(world.random(435) < 0.45, -1, world.integers(100_000, 100_250, 435))
        self.bias = 0.0
        sample = self.rows(np.random.default_rng([seed, 7]), CALIBRATION_ROWS)
        self.bias = _calibrate(self.logit(sample), AVAZU_CTR)

    def rows(self, rng: np.random.Generator, n: int) -> dict:
        r = {"day": rng.integers(21, 31, n), "hod": rng.choice(24, n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())}
        r["c1"] = _pick(rng, n, (1005, 1002, 1010, 1012, 1007, 1001, 1008), (92, 5.5, 2, 0.3, 0.1, 0.05, 0.05))[1]
        r["bpos"] = _pick(rng, n, (0, 1, 7, 2, 4, 5, 3), (72, 27.5, 0.2, 0.1, 0.1, 0.05, 0.05))[1]
        r["app"] = rng.random(n) < 0.36
        r["site"] = _power_ranks(rng, n, 4_000, 1.1)
        r["appid"] = _power_ranks(rng, n, 8_000, 1.15)
        r["repeat"] = rng.random(n) < 0.18
        r["device"] = _power_ranks(rng, n, 3_000_000, 0.9)
        r["ip"] = _power_ranks(rng, n, 5_000_000, 1.0)
        r["model"] = _power_ranks(rng, n, 8_000, 1.1)
        r["dtype"] = _pick(rng, n, (1, 0, 4, 5, 2), (92, 5.5, 2, 0.4, 0.1))[1]
        r["conn"] = _pick(rng, n, (0, 2, 3, 5), (86, 8, 5.5, 0.5))[1]
        r["c14"] = _power_ranks(rng, n, 2_600, 1.05)
        r["size"] = _pick(rng, n, range(len(AD_SIZES)), [s[2] for s in AD_SIZES])[0]
        r["c18"] = _pick(rng, n, (0, 3, 2, 1), (42, 34, 17, 7))[1]
        return r

    def categories(self, r: dict) -> tuple[np.ndarray, np.ndarray]:
        """(site category 0..25 of each row's site, app category 0..35 of its app)."""
        site_cat = _key(self.s["sitecat"], r["site"]) % np.uint64(26)
        return site_cat.astype(np.int64), (_key(self.s["appcat"], r["appid"]) % np.uint64(36)).astype(np.int64)

    def logit(self, r: dict) -> np.ndarray:
        s, app = self.s, r["app"]
        c17 = self.c17_of_c14[r["c14"]]
        site_cat, app_cat = self.categories(r)
        pop = lambda ranks, k: 1 / np.sqrt(1 + ranks / k)  # noqa: E731 - popular ids, larger effects
        logit = np.where(
            app,
            0.6 * _gauss(s["app"], r["appid"]) * pop(r["appid"], 20) + 0.2,
            0.5 * _gauss(s["site"], r["site"]) * pop(r["site"], 20),
        )
        logit += 0.35 * _gauss(s["c14"], r["c14"]) * pop(r["c14"], 50) + 0.35 * _gauss(s["c17"], c17)
        logit += 0.25 * _gauss(s["model"], r["model"]) * pop(r["model"], 30)
        logit += 0.25 * _gauss(s["bpos"], r["bpos"]) + 0.3 * _gauss(s["size"], r["size"])
        logit += 0.2 * _gauss(s["conn"], r["conn"]) + 0.15 * np.sin(2 * np.pi * (r["hod"] - 8) / 24)
        logit += 0.4 * r["repeat"] - 0.1 * (r["c18"] == 3)
        part = r["hod"] // 6  # night, morning, afternoon, evening
        logit += np.where(app, 0.0, 0.35 * _gauss(s["hour"], site_cat * 4 + part))
        logit += np.where(app, 0.35 * _gauss(s["dtype"], app_cat * 8 + r["dtype"]), 0.0)
        logit += 0.3 * _gauss(s["ids"], c17 * 8 + r["bpos"])
        return AVAZU_TEMPERATURE * logit


def avazu(rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """(the rows as a table in Avazu's columns, in time order; the true click probability of each)."""
    model = _AvazuModel(seed)
    rng = np.random.default_rng(seed + 1)
    r = model.rows(rng, rows)
    order = np.lexsort((rng.random(rows), r["hod"], r["day"]))  # the log is in time order
    r = {k: v[order] for k, v in r.items()}
    prob = 1 / (1 + np.exp(-(model.bias + model.logit(r))))
    click = (rng.random(rows) < prob).astype(np.int64)
    s, app = model.s, r["app"]

    def hexes(salt: int, ids, placeholder: str, on: np.ndarray) -> pa.Array:
        return pa.array(np.where(on, _hex(_key(salt, ids)).astype("U8"), placeholder))

    site_domain = r["site"] // 3 + (r["site"] % 7 == 0) * 1_000_000  # domains hold several sites
    app_domain = r["appid"] // 15
    site_cat, app_cat = model.categories(r)
    device = np.where(r["repeat"], r["device"], -1)
    c14 = r["c14"]
    c17 = model.c17_of_c14[c14]
    ids = mix(np.arange(rows, dtype=np.uint64) + np.uint64(seed << 32)) >> np.uint64(1)  # unique, < 2^63
    table = pa.table(
        {
            "id": pa.array(ids.astype(np.int64)),
            "click": pa.array(click),
            "hour": pa.array(14_100_000 + r["day"] * 100 + r["hod"]),
            "C1": pa.array(r["c1"]),
            "banner_pos": pa.array(r["bpos"]),
            "site_id": hexes(s["vals"] ^ 1, r["site"], SITE_PLACEHOLDER[0], ~app),
            "site_domain": hexes(s["vals"] ^ 2, site_domain, SITE_PLACEHOLDER[1], ~app),
            "site_category": hexes(s["sitecat"] ^ 3, site_cat, SITE_PLACEHOLDER[2], ~app),
            "app_id": hexes(s["vals"] ^ 4, r["appid"], APP_PLACEHOLDER[0], app),
            "app_domain": hexes(s["vals"] ^ 5, app_domain, APP_PLACEHOLDER[1], app),
            "app_category": hexes(s["appcat"] ^ 6, app_cat, APP_PLACEHOLDER[2], app),
            "device_id": hexes(s["vals"] ^ 7, device, DEFAULT_DEVICE, r["repeat"]),
            "device_ip": pa.array(_hex(_key(s["vals"] ^ 8, r["ip"])).astype("U8")),
            "device_model": pa.array(_hex(_key(s["vals"] ^ 9, r["model"])).astype("U8")),
            "device_type": pa.array(r["dtype"]),
            "device_conn_type": pa.array(r["conn"]),
            "C14": pa.array(model.c14_codes[c14]),
            "C15": pa.array(np.array([a[0] for a in AD_SIZES])[r["size"]]),
            "C16": pa.array(np.array([a[1] for a in AD_SIZES])[r["size"]]),
            "C17": pa.array(model.c17_codes[c17]),
            "C18": pa.array(r["c18"]),
            "C19": pa.array(model.c19_of_c17[c17]),
            "C20": pa.array(model.c20_of_c17[c17]),
            "C21": pa.array(model.c21_of_c17[c17]),
        }
    )
    return table, prob


# ---- writing -------------------------------------------------------------------------------------


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (ties count half)."""
    from census_like import auc as exact

    return exact(np.asarray(scores, float), np.asarray(labels))


def write(kind: str, rows: int, seed: int, out: Path) -> dict:
    """Write the lines and their truth files; returns the truth summary."""
    table, prob = (criteo if kind == "criteo" else avazu)(rows, seed)
    labels = table["label" if kind == "criteo" else "click"].to_numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    options = pacsv.WriteOptions(include_header=False, delimiter="\t" if kind == "criteo" else ",")
    options.quoting_style = "none"  # nulls are written as empty fields, as in the real logs
    with pa.OSFile(str(tmp), "wb") as f:
        if kind == "avazu":  # a plain header line (pyarrow would quote the names)
            f.write((",".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, f, options)
    skip = {"label", "click", "id", "hour"} | {f"int_{j}" for j in range(len(CRITEO_COUNTS))}
    truth = {
        "kind": kind,
        "rows": rows,
        "seed": seed,
        "version": VERSION,
        "click_rate": round(float(labels.mean()), 4),
        "oracle_auc": round(auc(prob, labels), 5),
        "distinct": {c: len(table[c].unique()) for c in table.column_names if c not in skip},
    }
    np.savez(out.with_name(out.name + ".truth.npz"), prob=prob)
    out.with_name(out.name + ".truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    tmp.replace(out)
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("criteo", "avazu"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the TSV (criteo) or CSV (avazu) file to write")
    args = parser.parse_args(argv)
    truth = write(args.kind, args.rows, args.seed, Path(args.out))
    print(
        f"{args.rows:,} {args.kind} lines -> {args.out}; click rate {truth['click_rate']:.3f}, "
        f"oracle AUC {truth['oracle_auc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
