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
`torchrun --standalone --nproc-per-node N -m trainer ...` (in this process) with the same flags.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.prepare import KINDS
from data_pipeline.prepare import main as prepare_main

TORCHRUN_NPROC = ("auto", "cpu", "gpu")
"""The names torchrun accepts for --nproc-per-node besides a number."""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys train", add_help=False)
    parser.add_argument("--nproc-per-node", "--nproc_per_node", default="1")
    known, rest = parser.parse_known_args(argv)
    from data_pipeline.schema import DataError
    from trainer.__main__ import _message
    from trainer.build import preflight
    from trainer.config import load_config
    from trainer.defaults import resolve

    if "-h" in rest or "--help" in rest:
        print("recsys train [--nproc-per-node N] <trainer flags>; trainer flags:\n")
        load_config(["--help"])
        return 0

    nproc = known.nproc_per_node
    try:
        if not (nproc.isdigit() and int(nproc) > 0) and nproc not in TORCHRUN_NPROC:
            raise ValueError(
                f"--nproc-per-node {nproc}: expected a positive number of ranks (or {', '.join(TORCHRUN_NPROC)})"
            )
        cfg = load_config(rest)
        schema = preflight(cfg)
        if nproc.isdigit():  # the same derived defaults and cross-field checks each rank will make
            resolve(cfg, schema, int(nproc))
    except (DataError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {_message(e) if isinstance(e, DataError) else e}", file=sys.stderr)
        return 2
    return _torchrun(["--standalone", "--nproc-per-node", nproc, "-m", "trainer", *rest])


CLEAN_EXITS = (2, 3)
"""The trainer's exits after it printed why in one `error:` line: bad input, diverged."""


def _torchrun(args: list[str]) -> int:
    """`torchrun ARGS` in this process. When the first rank to fail ended with a clean exit (2, 3,
    or 128 + a signal after a preemption checkpoint) that code is returned without torchrun's
    failure report: the rank already said why, and the report would bury it. A signal to this
    process (the agent) returns 128 + its number, as the preempted ranks do."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except SignalException as e:  # torchrun passed the signal on to the ranks, which checkpointed
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode in CLEAN_EXITS or first.exitcode > 128:
            return first.exitcode
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = (
        f"usage: recsys {{prepare {{{' | '.join(KINDS)}}} | train | tune | export | predict | evaluate | report}} ...  "
        "(add --help after a command)"
    )
    if argv[:1] == ["prepare"] and len(argv) > 1 and argv[1] in KINDS:
        return prepare_main(argv[1], argv[2:])
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    if argv[:1] == ["tune"]:
        from launch import tune

        return tune.main(argv[1:])
    if argv[:1] in (["export"], ["predict"]):
        from trainer.tools import export

        return (export.main_export if argv[0] == "export" else export.main_predict)(argv[1:])
    if argv[:1] in (["evaluate"], ["report"]):
        import importlib

        return importlib.import_module(f"trainer.tools.{argv[0]}").main(argv[1:])
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
