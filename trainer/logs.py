"""What a rank says: Python logging under the `recsys` logger, the rank in every line.

    [rank0] world_size 2 on cpu (gloo); model dlrm; ...
    [rank1] warning: skipping checkpoint runs/demo/checkpoints/step-00000600: ...

Rank 0 logs at INFO, the other ranks at WARNING (they would repeat rank 0's lines); with
`logging.verbose` (`--verbose`) every rank logs at DEBUG and the third-party noise below is shown.
Lines go to stdout, as the rank's output; `error:` lines stay on stderr (trainer/__main__.py), so
that a failure is one line a reader or a test can find.

Known noise, hidden in normal runs: torchrec's DistributedModelParallel `broadcast_buffers`
FutureWarning and torch.fx's `is_fx_tracing` warning (in every rank and loader worker).
torchrun's OMP_NUM_THREADS banner is avoided where it is caused (launch/cli.py sets the variable).
"""

from __future__ import annotations

import logging
import sys
import warnings

LOGGER = "recsys"

NOISY_WARNINGS = [(FutureWarning, r".*broadcast_buffers.*")]
"""(category, message regex) of Python warnings hidden unless verbose."""

NOISY_LOGGERS = ["torch.fx._symbolic_trace"]
"""Third-party loggers kept to errors unless verbose: torch.fx's only message in our runs is the
`is_fx_tracing` warning, once in each rank and in each loader worker."""


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (`__name__`), under `recsys`."""
    return logging.getLogger(f"{LOGGER}.{name}")


class _Format(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank{rank}] "

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        text = level + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(self.prefix + line for line in text.splitlines())  # every line says whose it is


def setup_logging(rank: int, verbose: bool = False) -> logging.Logger:
    """Configure the `recsys` logger for this rank (again on a second call: a notebook trains
    twice in one process) and hide or show the known noise. Returns the `recsys` logger."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Format(rank))
    logger.addHandler(handler)
    logger.propagate = False  # the caller's root handlers would print every line twice
    logger.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)

    hide_noise(not verbose)
    return logger


def hide_noise(hide: bool = True) -> None:
    """Hide (or show again) the known third-party warnings in this process; the single-process
    tools (`recsys evaluate`, `export`, `predict`) call it too."""
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore" if hide else "default", message=message, category=category)
    for name, level in noise_levels(not hide).items():
        logging.getLogger(name).setLevel(level)


def noise_levels(verbose: bool) -> dict[str, int]:
    """The levels of the noisy third-party loggers: what the loader workers (other processes) set
    too, through `RankLoader(log_levels=...)`."""
    return dict.fromkeys(NOISY_LOGGERS, logging.NOTSET if verbose else logging.ERROR)
