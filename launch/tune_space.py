"""The search space of `recsys tune`: one table of knobs per model family, in the trainer's own
knob names, and how a trial's sampled values become trainer flags.

A knob named `section.key` is sampled and passed as `--section.key VALUE`; a list knob's choices
are space-separated strings ("256 128" -> `--model.deep_layer_sizes 256 128`). `section.key[i]`
samples entry i of a list whose fixed tail comes from LIST_TAILS (dlrm's bottom MLP ends in the
embedding size, its top MLP in 1 logit: models/config.py checks both).

Torch-free: the tuner only builds command lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ALL = ("dlrm", "dlrm_dcn", "wide_deep", "deepfm", "two_tower")
DLRM = ("dlrm", "dlrm_dcn")
DEEP = ("wide_deep", "deepfm")
TOWERS = ("two_tower",)
"""Models with towers: on a dataset that lists its catalogue they are selected on recall@K
(trainer/evaluator.py: models with `encode`)."""


def funnels(max_layers: int, widths: tuple[int, ...] = (64, 128, 256, 512)) -> tuple[str, ...]:
    """MLP shapes of 1..max_layers layers, each layer half the one before, none narrower than the
    narrowest width: "64", ..., "512 256", ..., "512 256 128"."""
    shapes = []
    for layers in range(1, max_layers + 1):
        for top in widths:
            sizes = [top >> i for i in range(layers)]
            if sizes[-1] >= widths[0]:
                shapes.append(" ".join(map(str, sizes)))
    return tuple(shapes)


@dataclass(frozen=True)
class Knob:
    name: str
    """The trainer knob (`--name`), or `knob[i]`: entry i of a list knob."""
    kind: str
    """log: log-uniform float in [low, high]; float: uniform float; int: an integer in [low, high];
    choice: one of the values."""
    values: tuple
    """(low, high), or the choices."""
    models: tuple[str, ...]
    """The model families that read the knob."""
    note: str = ""

    @property
    def knob(self) -> str:
        """The trainer knob it sets (`model.dense_arch_layer_sizes` for `...[0]`)."""
        return self.name.split("[")[0]


BATCH_ROWS_PER_STEP = 20
"""data.batch_size choices are capped at train rows / (this x ranks): at least ~20 steps an epoch."""

# fmt: off
SPACE: tuple[Knob, ...] = (
    #    name                               kind      range or choices                          models
    Knob("optimizer.dense_lr",              "log",    (1e-4, 3e-2),                             ALL),
    Knob("optimizer.sparse_lr",             "log",    (1e-3, 0.3),                              ALL),
    Knob("optimizer.weight_decay",          "log",    (1e-7, 1e-3),                             ALL),
    Knob("data.batch_size",                 "choice", (64, 128, 256, 512, 1024, 2048, 4096),    ALL,
         f"only those <= train rows / ({BATCH_ROWS_PER_STEP} x ranks)"),
    Knob("model.embedding_dim",             "choice", (8, 16, 32, 64),                          ALL),
    Knob("model.dense_arch_layer_sizes[0]", "choice", (32, 64, 128, 256, 512),                  DLRM,
         "then model.embedding_dim"),
    Knob("model.over_arch_layer_sizes[0]",  "choice", (64, 128, 256, 512),                      DLRM),
    Knob("model.over_arch_layer_sizes[1]",  "choice", (32, 64, 128, 256),                       DLRM, "then 1"),
    Knob("model.dcn_num_layers",            "int",    (1, 4),                                   ("dlrm_dcn",)),
    Knob("model.dcn_low_rank_dim",          "choice", (8, 16, 32, 64),                          ("dlrm_dcn",)),
    Knob("model.deep_layer_sizes",          "choice", funnels(3),                               DEEP),
    Knob("model.dropout",                   "float",  (0.0, 0.5),                               DEEP),
    Knob("model.wide_lr",                   "log",    (1e-3, 0.3),                              ("wide_deep",)),
    Knob("model.tower_layer_sizes",         "choice", funnels(2),                               TOWERS),
)
# fmt: on

LIST_TAILS: dict[str, str | int] = {
    "model.dense_arch_layer_sizes": "model.embedding_dim",
    "model.over_arch_layer_sizes": 1,
}
"""The fixed last entry of the list knobs sampled entry by entry: a knob's value or a number."""


def given_knobs(flags: list[str]) -> set[str]:
    """The `section.key` knobs a command line sets (`--model`/`--data` aliases included)."""
    aliases = {"--model": "model.name", "--data": "data.path", "--run-dir": "run_dir"}
    out = set()
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in aliases:
            out.add(aliases[name])
        elif re.fullmatch(r"--[a-z_]+\.[a-z_0-9]+", name):
            out.add(name[2:])
    return out


def batch_choices(train_rows: int | None, nproc: int, choices: tuple[int, ...]) -> tuple[int, ...]:
    """The batch sizes that give each of `nproc` ranks ~BATCH_ROWS_PER_STEP steps an epoch or more
    (all of them when the row count is unknown; the largest power of two that fits when none does)."""
    if not train_rows:
        return choices
    cap = max(1, train_rows // (BATCH_ROWS_PER_STEP * nproc))
    fitting = tuple(b for b in choices if b <= cap)
    return fitting or (1 << (cap.bit_length() - 1),)


def knobs_for(model: str, fixed: set[str], train_rows: int | None, nproc: int) -> list[Knob]:
    """`model`'s knobs, less those the user fixed (`fixed`: knob names given on the command line)."""
    if model in DLRM and "model.dense_arch_layer_sizes" in fixed:
        fixed = fixed | {"model.embedding_dim"}  # the bottom MLP's end fixes the embedding size
    knobs = []
    for knob in SPACE:
        if model not in knob.models or knob.knob in fixed:
            continue
        if knob.name == "data.batch_size":
            knob = Knob(knob.name, knob.kind, batch_choices(train_rows, nproc, knob.values), knob.models, knob.note)
        knobs.append(knob)
    return knobs


def sample(trial: Any, knobs: list[Knob]) -> dict[str, Any]:
    """One value per knob from an optuna trial (its parameters are named as the knobs)."""
    params = {}
    for knob in knobs:
        if knob.kind == "log":
            params[knob.name] = trial.suggest_float(knob.name, *knob.values, log=True)
        elif knob.kind == "float":
            params[knob.name] = trial.suggest_float(knob.name, *knob.values)
        elif knob.kind == "int":
            params[knob.name] = trial.suggest_int(knob.name, *knob.values)
        elif knob.kind == "choice":
            params[knob.name] = trial.suggest_categorical(knob.name, knob.values)
        else:
            raise ValueError(f"knob {knob.name}: unknown kind '{knob.kind}'")
    return params


def trainer_flags(params: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The trainer flags of sampled `params`; `defaults` ("section.key" -> value, the run's config
    without the sampled values) supplies the tails of list knobs that come from unsampled knobs."""
    flags: list[str] = []
    lists: dict[str, dict[int, Any]] = {}
    for name, value in params.items():
        entry = re.fullmatch(r"(.+)\[(\d+)\]", name)
        if entry:
            lists.setdefault(entry[1], {})[int(entry[2])] = value
        else:
            flags += [f"--{name}", *str_values(value)]
    for knob, entries in lists.items():
        tail = LIST_TAILS[knob]
        tail = params.get(tail, defaults.get(tail)) if isinstance(tail, str) else tail
        flags += [f"--{knob}", *(str(entries[i]) for i in sorted(entries)), str(tail)]
    return flags


def str_values(value: Any) -> list[str]:
    """A value as command-line tokens: a list knob's choice "256 128" is two."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, float):
        return [repr(value)]
    return [str(value)]


def compact(params: dict[str, Any]) -> str:
    """Parameters on one short line: `dense_lr=0.00123 deep_layer_sizes=256,128 ...`."""
    parts = []
    for name, value in params.items():
        short = name.split(".", 1)[-1]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", ",")
        parts.append(f"{short}={shown}")
    return " ".join(parts)


def table(models: tuple[str, ...] = ALL) -> str:
    """The space as a Markdown table (docs/tuning.md shows it)."""
    kinds = {"log": "log-uniform", "float": "uniform", "int": "integer", "choice": "one of"}
    rows = ["| knob | sampled | range or choices | models | note |", "|---|---|---|---|---|"]
    for knob in SPACE:
        if not set(knob.models) & set(models):
            continue
        values = (
            f"{knob.values[0]:g} .. {knob.values[1]:g}"
            if knob.kind != "choice"
            else ", ".join(f"`{v}`" if isinstance(v, str) else str(v) for v in knob.values)
        )
        shown = "all" if knob.models == ALL else ", ".join(knob.models)
        rows.append(f"| `{knob.name}` | {kinds[knob.kind]} | {values} | {shown} | {knob.note} |")
    return "\n".join(rows)
