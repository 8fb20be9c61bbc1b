"""`recsys`: the command-line front door.

    recsys prepare synthetic --rows 500000 --out data/synthetic
    recsys prepare criteo --input day_*.gz --out data/criteo
    recsys prepare tabular --input adult.csv --label income --positive '>50K' --out data/adult
    recsys prepare movielens --input ml-100k/ --out data/ml100k
    recsys train --config configs/demo.toml --nproc-per-node 2 [--section.key VALUE ...]
    recsys export runs/demo --out models/demo.pt           # checkpoint -> one unsharded model file
    recsys predict --model models/demo.pt --data data/synthetic --split test --out preds.parquet
    recsys evaluate --checkpoint runs/demo --data data/synthetic --segment-by cat_0 --k 10,50   # metrics, per segment
    recsys report runs/demo                                    # plots + report.md/html of a run
    recsys tune --model deepfm --data data/criteo --nproc-per-node 8 --trials 40   # Optuna search (docs/tuning.md)

`recsys train` checks the dataset once (a clear error before any process starts), then runs
`torchrun [TORCHRUN FLAGS] -m trainer <trainer flags>` in this process. torchrun's own flags
(`--nproc-per-node`, `--nnodes`, `--node-rank`, `--rdzv-*`, `--max-restarts`, `--master-addr`, ...)
pass through wherever they stand on the line; `--standalone` is added for a one-node job without a
rendezvous endpoint.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from data_pipeline.prepare import KINDS
from data_pipeline.prepare import main as prepare_main

TORCHRUN_NPROC = ("auto", "cpu", "gpu")
"""The names torchrun accepts for --nproc-per-node besides a number."""


TORCHRUN_RESERVED = ("-h", "--help", "-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")
"""torchrun flags `recsys train` sets itself (it runs `-m trainer`) or keeps for the trainer (--help)."""


def split_torchrun_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's flags, the trainer's flags) of a `recsys train` command line, in their order.
    A flag is torchrun's when its parser knows it (`--nnodes 2`, `--max-restarts=3`, `--standalone`);
    every other token is the trainer's, whose flags are `--section.key` and a few aliases that
    torchrun does not use."""
    from torch.distributed.run import get_args_parser

    actions = get_args_parser()._option_string_actions
    torchrun, trainer = [], []
    i = 0
    while i < len(argv):
        flag, eq, _ = argv[i].partition("=")
        action = actions.get(flag) if flag.startswith("--") and flag not in TORCHRUN_RESERVED else None
        width = 1 if action is None or action.nargs == 0 or eq else 2
        (trainer if action is None else torchrun).extend(argv[i : i + width])
        i += width
    return torchrun, trainer


def _launch_flags(torchrun: list[str]) -> tuple[list[str], int | None]:
    """torchrun's flags with --nproc-per-node checked and --standalone added for one node; and the
    world size when the line fixes it (nodes x ranks per node), for the checks made before launch."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc-per-node", "--nproc_per_node", default="1")
    parser.add_argument("--nnodes", default="1")
    parser.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default="")
    parser.add_argument("--standalone", action="store_true")
    known, _ = parser.parse_known_args(torchrun)
    nproc, nnodes = known.nproc_per_node, known.nnodes
    if not (nproc.isdigit() and int(nproc) > 0) and nproc not in TORCHRUN_NPROC:
        raise ValueError(
            f"--nproc-per-node {nproc}: expected a positive number of ranks (or {', '.join(TORCHRUN_NPROC)})"
        )
    one_node = nnodes in ("1", "1:1")
    if not known.standalone and one_node and not known.rdzv_endpoint:
        torchrun = ["--standalone", *torchrun]
    if not any(flag.partition("=")[0] in ("--nproc-per-node", "--nproc_per_node") for flag in torchrun):
        torchrun = [*torchrun, "--nproc-per-node", nproc]
    world_size = int(nproc) * int(nnodes) if nproc.isdigit() and nnodes.isdigit() else None
    return torchrun, world_size


def _train(argv: list[str]) -> int:
    from data_pipeline.schema import DataError
    from trainer.config import load_config
    from trainer.defaults import resolve
    from trainer.preflight import message, preflight

    torchrun, rest = split_torchrun_flags(argv)
    if "-h" in rest or "--help" in rest:
        print(
            "recsys train [TORCHRUN FLAGS] <trainer flags>\n\n"
            "torchrun's flags (`torchrun --help`) pass through: --nproc-per-node N (default 1), --nnodes, "
            "--node-rank, --rdzv-backend, --rdzv-endpoint, --rdzv-id, --max-restarts, --master-addr, ... "
            "--standalone is added for one node without --rdzv-endpoint.\n"
        )
        load_config(["--help"], prog="recsys train")
        return 0
    try:
        torchrun, world_size = _launch_flags(torchrun)
        cfg = load_config(rest)
        schema = preflight(cfg)
        if world_size is not None:  # the same derived defaults and cross-field checks each rank will make
            resolve(cfg, schema, world_size)
    except (DataError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {message(e) if isinstance(e, DataError) else e}", file=sys.stderr)
        return 2
    return _torchrun([*torchrun, "-m", "trainer", *rest])


CLEAN_EXITS = (2, 3)
"""The trainer's exits after it printed why in one `error:` line: bad input, diverged."""


def _torchrun(args: list[str]) -> int:
    """`torchrun ARGS` in this process. When the first rank to fail ended with a clean exit (2, 3,
    or 128 + a signal after a preemption checkpoint) that code is returned without torchrun's
    failure report: the rank already said why, and the report would bury it. A signal to this
    process (the agent) returns 128 + its number, as the preempted ranks do."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    parsed = parse_args(args)
    if "OMP_NUM_THREADS" not in os.environ and determine_local_world_size(parsed.nproc_per_node) > 1:
        # torchrun's own default for several local ranks, without its five-line banner
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        run(parsed)
    except SignalException as e:  # torchrun passed the signal on to the ranks, which checkpointed
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode in CLEAN_EXITS or first.exitcode > 128:
            return first.exitcode
        said = [f.exitcode for f in e.failures.values() if f.exitcode in CLEAN_EXITS]
        if said:  # a peer that lost the failing rank exited first: the failing rank still said why
            return said[0]
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


COMMANDS = {
    "prepare": f"raw data -> a Parquet dataset: recsys prepare {{{','.join(KINDS)}}} --help",
    "train": "train a model on N ranks (torchrun; its flags pass through): recsys train --model M --data D",
    "tune": "hyperparameter search with Optuna, each trial a training run (docs/tuning.md)",
    "export": "a checkpoint -> one unsharded model file",
    "predict": "score a dataset split with an exported model",
    "evaluate": "metrics of a checkpoint on a split, overall and per segment",
    "report": "plots and a shareable report of a run directory",
    "configs": "the shipped config presets: recsys configs [ls | cp NAME DEST]",
}

NEEDS = {"tune": ("optuna", "tune"), "report": ("matplotlib", "report")}
"""command -> (the module it needs, the extra that installs it)."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(
        [
            "usage: recsys [-h] [--version] COMMAND ...",
            "",
            "TorchRec trainer for recommendation models. Commands (`recsys COMMAND --help` for each):",
            *lines,
        ]
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys-trainer")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    if command in ("-h", "--help"):
        print(_usage())
        return 0
    if command == "--version":
        print(f"recsys {_version()}")
        return 0
    if command == "prepare" and len(argv) > 1 and argv[1] in KINDS:
        return prepare_main(argv[1], argv[2:])
    if command == "prepare":
        which = f"unknown kind '{argv[1]}'; " if len(argv) > 1 and not argv[1].startswith("-") else ""
        print(f"error: recsys prepare: {which}choose one of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    if command in NEEDS and importlib.util.find_spec(NEEDS[command][0]) is None:
        module, extra = NEEDS[command]
        print(f"error: recsys {command} needs {module}: pip install 'recsys-trainer[{extra}]'", file=sys.stderr)
        return 2
    if command == "train":
        return _train(argv[1:])
    if command == "configs":
        from launch import presets

        return presets.main(argv[1:])
    if command == "tune":
        from launch import tune

        return tune.main(argv[1:])
    if command in ("export", "predict", "evaluate", "report"):
        from trainer.logs import hide_noise

        hide_noise()
    if command in ("export", "predict"):
        from trainer.tools import export

        return (export.main_export if command == "export" else export.main_predict)(argv[1:])
    if command in ("evaluate", "report"):
        return importlib.import_module(f"trainer.tools.{command}").main(argv[1:])
    print(_usage(), file=sys.stderr)
    if command:
        print(f"error: unknown command '{command}'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
