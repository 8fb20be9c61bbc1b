"""The data-derived defaults: each rule on data of very different sizes, knobs set by hand win,
and a run with the derived values repeats from its resolved config.toml."""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.helpers.data import synthetic
from tests.helpers.runs import run_trainer
from trainer import defaults
from trainer.config import Config, from_dict, load_config
from trainer.defaults import DataShape, derive


def shape(rows: int, world: int = 2, dense: int = 13, tables: tuple[int, ...] = (1000,) * 26) -> DataShape:
    return DataShape(train_rows=rows, world_size=world, num_dense=dense, table_rows=tables)


@pytest.mark.parametrize(
    ("rows", "world", "batch"),
    [
        (2_000, 2, 32),
        (8_000, 2, 32),
        (80_000, 2, 128),
        (400_000, 2, 256),
        (4_000_000, 2, 1024),
        (9_000_000, 2, 2048),
        (36_600_000, 64, 512),
        (50_000, 8, 64),
    ],
)
def test_batch_grows_with_the_square_root_of_the_rows_per_rank_up_to_2048(rows, world, batch):
    size, why = defaults.batch_size(shape(rows, world))
    assert size == batch and f"{rows:,} rows" in why
    per_rank = rows // world
    assert size in defaults.BATCH_RANGE or size <= per_rank**0.5 < 2 * size


def test_learning_rates_scale_with_the_square_root_of_the_global_batch():
    (dense, _), (sparse, _) = defaults.learning_rates(512)
    assert (dense, sparse) == (defaults.DENSE_LR, defaults.SPARSE_LR)
    (dense4, why), (sparse4, _) = defaults.learning_rates(2048)  # 4x the batch: 2x the rate
    assert dense4 == pytest.approx(2 * dense) and sparse4 == pytest.approx(2 * sparse) and "sqrt" in why
    (tiny, _), (tiny_sparse, _) = defaults.learning_rates(64)
    assert tiny == pytest.approx(dense / 8**0.5, rel=1e-2) and tiny_sparse == pytest.approx(sparse / 8**0.5, rel=1e-2)
    (huge, _), (huge_sparse, _) = defaults.learning_rates(1 << 20)  # clamped
    assert huge == defaults.DENSE_LR_RANGE[1] and huge_sparse == defaults.SPARSE_LR_RANGE[1]


def test_epochs_many_on_small_data_one_on_big():
    assert defaults.epochs(shape(8_000))[0] == defaults.MAX_EPOCHS
    assert defaults.epochs(shape(1_000_000))[0] == 4
    assert defaults.epochs(shape(4_000_000))[0] == 1 and defaults.epochs(shape(45_000_000))[0] == 1


def test_embedding_dim_grows_with_the_fourth_root_of_table_size():
    assert defaults.embedding_dim(shape(1000, tables=(2, 10, 20)))[0] == 8
    assert defaults.embedding_dim(shape(1000, tables=(1000, 2000)))[0] == 32
    assert defaults.embedding_dim(shape(1000, tables=(10_000_000,) * 26))[0] == 64


def test_mlp_widths_follow_the_input_width_capped_by_the_data():
    (bottom, _), (top, _) = defaults.dlrm_layers(shape(80_000, dense=13, tables=(100,) * 26), 16)
    assert bottom == [64, 16]  # 4 x 13 dense -> 64, ending in the embedding dim
    assert top == [256, 128, 1]  # 27 vectors: 351 pair products + 16 -> capped at 256 below 1M rows
    (_, _), (big_top, _) = defaults.dlrm_layers(shape(10_000_000, dense=13, tables=(100,) * 26), 16)
    assert big_top == [512, 256, 1]
    assert defaults.deep_layers(shape(80_000, dense=6, tables=(30,) * 13), 16)[0] == [256, 128]
    assert defaults.deep_layers(shape(80_000, dense=2, tables=(30,) * 2), 8)[0] == [64, 32]


def test_explicit_knobs_win_and_dlrm_dims_stay_consistent():
    cfg = Config()
    cfg.model.dense_arch_layer_sizes = [128, 32]
    derived = derive(cfg, shape(80_000), frozenset({"model.dense_arch_layer_sizes", "data.batch_size"}))
    assert "data.batch_size" not in derived and cfg.data.batch_size == 2048
    assert cfg.model.embedding_dim == 32 and "the bottom MLP" in derived["model.embedding_dim"]
    cfg.model.check()  # consistent
    assert cfg.optimizer.dense_lr == defaults.learning_rates(2 * 2048)[0][0]  # from the explicit batch


def test_small_data_gets_early_stopping_and_keep_best_big_data_one_pass():
    small, big = Config(), Config()
    derive(small, shape(20_000), frozenset())
    assert small.training.epochs == defaults.MAX_EPOCHS and small.training.keep_best
    assert small.training.early_stopping_patience == defaults.PATIENCE
    steps = 10_000 // small.data.batch_size
    assert small.training.eval_every == round(steps / defaults.EVALS_PER_EPOCH)
    derive(big, shape(8_000_000), frozenset())
    assert big.training.epochs == 1 and big.training.eval_every == 0 and not big.training.keep_best


def test_explicit_keys_come_from_the_file_and_the_command_line(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[data]\nbatch_size = 64\n[training]\nepochs = 2\n")
    cfg = load_config(["--config", str(path), "--model.embedding_dim", "8", "--run-dir", "r", "--data", "d"])
    assert {"data.batch_size", "training.epochs", "model.embedding_dim", "run_dir", "data.path"} <= cfg.explicit
    assert "optimizer.dense_lr" not in cfg.explicit


def test_few_steps_warning():
    assert defaults.few_steps_warning(99) and defaults.few_steps_warning(100) is None


def test_precision_is_bf16_where_the_device_runs_it_fast(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda c=capability: c)
        assert defaults.precision()[0] == expected, capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, avx512_bf16, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        value, why = defaults.precision()
        assert value == expected and ("AVX512-BF16" in why or "AMX" in why)


def test_auto_precision_is_resolved_fp32_without_derived_defaults_unless_named(monkeypatch):
    monkeypatch.setattr(defaults, "precision", lambda: ("bf16", "a CPU with AMX"))
    base = ["--data", "d", "--derive_defaults", "false"]
    unset = load_config(base)
    defaults.resolve(unset, None, 2)
    assert unset.training.mixed_precision == "fp32" and unset.derived == {
        "training.mixed_precision": "derive_defaults false"
    }
    named = load_config([*base, "--training.mixed_precision", "auto"])
    defaults.resolve(named, None, 2)
    assert named.training.mixed_precision == "bf16" and named.derived == {"training.mixed_precision": "a CPU with AMX"}
    pinned = load_config([*base, "--training.mixed_precision", "fp32"])
    defaults.resolve(pinned, None, 2)
    assert pinned.training.mixed_precision == "fp32" and pinned.derived == {}


@pytest.mark.slow
def test_derived_run_prints_its_reasons_and_repeats_from_its_config(tmp_path):
    data = synthetic(tmp_path / "data", rows=6_000).root
    args = ["--data", str(data), "--training.progress_bar", "false", "--training.epochs", "2"]
    first = run_trainer([*args, "--run-dir", str(tmp_path / "a")], nproc=2, derive=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "derived data.batch_size = 32 (train has" in first.stdout
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["derived"]["data.batch_size"]["value"] == 32 and "training.epochs" not in summary["derived"]
    precision, why = defaults.precision()  # this machine's, derived like the data's
    assert summary["derived"]["training.mixed_precision"] == {"value": precision, "why": why}
    assert f'derived training.mixed_precision = "{precision}" ({why})' in first.stdout
    resolved = tomllib.loads((tmp_path / "a" / "config.toml").read_text())
    assert (
        resolved["data"]["batch_size"] == 32
        and resolved["model"]["embedding_dim"] == summary["derived"]["model.embedding_dim"]["value"]
    )
    from_dict(Config, resolved, "resolved")  # loads back
    again = run_trainer(
        ["--config", str(tmp_path / "a" / "config.toml"), "--run-dir", str(tmp_path / "b")], nproc=2, derive=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert repeat["derived"] == {} and repeat["test"] == summary["test"]


@pytest.mark.slow
def test_a_tiny_dataset_in_one_row_group_trains_by_default_on_two_ranks(tmp_path):
    """A few thousand rows, one row group per split, nothing but --data: better than a constant."""
    data = synthetic(tmp_path / "data", rows=4_000, files=1, row_group_rows=100_000).root
    result = run_trainer(
        ["--data", str(data), "--run-dir", str(tmp_path / "run"), "--training.progress_bar", "false"],
        nproc=2,
        derive=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] >= defaults.FEW_STEPS and "warning: this run trains" not in result.stdout
    assert summary["test"]["auc"] > 0.6, summary["test"]  # a constant predictor scores 0.5
