"""The trainer from Python: a notebook or a script, without the command line.

    from trainer import load_config, train

    cfg = load_config(["--model", "dlrm", "--data", "data/synthetic", "--run-dir", "runs/nb"])
    cfg.training.epochs = 2                       # any knob, as an attribute
    summary = train(cfg)                          # one rank, in this process
    summary = train(cfg, nproc_per_node=2)        # two local ranks (torchrun), same run directory rules
    print(summary["test"]["auc"])

`load_config` reads only the flags it is given (never sys.argv, which in Jupyter holds the
kernel's own). Bad data or config raise `DataError` / `ConfigError` here, before anything starts;
a rank's failure under several ranks raises `TrainingFailed` with that rank's `error:` line.
The knobs a run derives from the data (docs/training.md) are derived here too, except those the
config file, the flags or an attribute assignment set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from trainer.config import Config, getattr_path, load_config, toml_value

__all__ = ["TrainingFailed", "load_config", "train"]

WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class TrainingFailed(RuntimeError):
    """A multi-rank run exited with an error; the message is the failing rank's `error:` line."""


def set_knobs(cfg: Config) -> frozenset[str]:
    """The knobs this config sets: those its file or flags named, and every one whose value differs
    from the default (an attribute assigned in Python). Derived defaults leave these alone."""
    default = Config().knobs()
    return frozenset(cfg.explicit | {key for key, value in cfg.knobs().items() if value != default[key]})


def explicit_toml(cfg: Config) -> str:
    """A TOML file of the knobs `cfg` sets, and nothing else: what the ranks of a torchrun job load
    so that they derive the same defaults as a one-rank run of the same config would."""
    sections: dict[str, list[str]] = {}
    for key in sorted(set_knobs(cfg)):
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append(f"{name} = {toml_value(getattr_path(cfg, key))}")
    lines = sections.pop("", [])
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    return "\n".join(lines) + "\n"


def train(config: Config | Sequence[str], nproc_per_node: int = 1) -> dict:
    """Train `config` (a Config, or the flags `recsys train` takes) and return the run's summary
    (summary.json; `stopped_at_step` or `exit_code` for a run that stopped early)."""
    from trainer.defaults import resolve
    from trainer.preflight import preflight

    cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(list(config))  # the caller's stays
    cfg.explicit, cfg.derived = set_knobs(cfg), {}
    schema = preflight(cfg)
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be at least 1, got {nproc_per_node}")
    if nproc_per_node > 1:
        resolve(copy.deepcopy(cfg), schema, nproc_per_node)  # its errors here, before any rank starts
        return _torchrun(cfg, nproc_per_node)
    resolve(cfg, schema, 1)
    return _in_process(cfg, schema)


@contextlib.contextmanager
def _one_rank_world() -> Iterator[None]:
    """A one-rank world's variables for this call only (a notebook may train again, or be a rank)."""
    from trainer.distributed import free_port

    saved = {name: os.environ.get(name) for name in WORLD_VARIABLES}
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )  # fmt: skip
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def _in_process(cfg: Config, schema) -> dict:
    from trainer.__main__ import train_rank
    from trainer.distributed import destroy_distributed, init_distributed

    with _one_rank_world():
        env = init_distributed()
        try:
            return train_rank(cfg, env, schema)
        finally:
            destroy_distributed()


def _torchrun(cfg: Config, nproc_per_node: int) -> dict:
    """`torchrun --standalone --nproc-per-node N -m trainer --config <the set knobs>` in this
    process; the ranks' output is teed to files, so a failure can be raised with its error line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    with tempfile.TemporaryDirectory(prefix="recsys-api-") as tmp:
        toml = Path(tmp) / "config.toml"
        toml.write_text(explicit_toml(cfg))
        logs = Path(tmp) / "logs"
        args = ["--standalone", "--nproc-per-node", str(nproc_per_node), "--log-dir", str(logs), "--tee", "3"]
        try:
            run(parse_args([*args, "-m", "trainer", "--config", str(toml), "--run-dir", cfg.run_dir]))
        except ChildFailedError as e:
            errors = [
                line
                for path in sorted(logs.rglob("stderr.log"))
                for line in path.read_text(errors="replace").splitlines()
                if line.startswith("error")
            ]
            raise TrainingFailed(errors[0] if errors else e.format_msg()) from None
    summary = Path(cfg.run_dir) / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {"stopped": True}


if __name__ == "__main__":  # the docstring's example, as a script: python -m trainer.api FLAGS
    print(json.dumps(train(sys.argv[1:]), indent=2))
