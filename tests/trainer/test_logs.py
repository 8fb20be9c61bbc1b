"""What ranks print: rank-marked log lines, rank 0 at INFO and the others at WARNING, `--verbose`
for everything, and the known third-party noise hidden unless verbose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from tests.helpers.data import synthetic
from tests.helpers.runs import ROOT
from trainer.logs import get_logger, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    """Leave logging as other tests found it: no handler on a captured stream, filters as before."""
    with warnings.catch_warnings():
        yield
    logger = logging.getLogger("recsys")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate, logger.level = True, logging.NOTSET
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.NOTSET)


def test_rank_zero_logs_info_the_others_warnings_each_line_marked(capsys):
    log = get_logger("trainer.test")
    setup_logging(0)
    log.info("sharding plan:\ntable  ranks")
    log.debug("not shown")
    setup_logging(1)  # a second setup replaces the first: no line twice
    log.info("rank 1 repeats rank 0: not shown")
    log.warning("skipping checkpoint step-6")
    assert capsys.readouterr().out.splitlines() == [
        "[rank0] sharding plan:",
        "[rank0] table  ranks",
        "[rank1] warning: skipping checkpoint step-6",
    ]


def test_verbose_logs_debug_on_every_rank_and_shows_third_party_noise(capsys):
    setup_logging(1, verbose=True)
    get_logger("trainer.test").debug("detail")
    logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true ...")
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`broadcast_buffers` is deprecated", FutureWarning, stacklevel=1)
    assert capsys.readouterr().out.splitlines() == ["[rank1] detail"]
    assert len(seen) == 1
    setup_logging(1)
    assert not logging.getLogger("torch.fx._symbolic_trace").isEnabledFor(logging.WARNING)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`broadcast_buffers` is deprecated", FutureWarning, stacklevel=1)
    assert not seen


@pytest.mark.slow
def test_recsys_train_verbose_shows_the_noise_and_never_torchruns_omp_banner(tmp_path):
    data = synthetic(tmp_path / "data", rows=2000)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun's banner needs it unset
    args = ["--data", str(data.root), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", "2"]
    args += ["--training.max_steps", "4", "--training.progress_bar", "false", "--verbose"]
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broadcast_buffers" in result.stderr and "is_fx_tracing" in result.stderr
    assert "OMP_NUM_THREADS" not in result.stderr + result.stdout
    assert "[rank0] test auc" in result.stdout
