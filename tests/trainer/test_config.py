import pytest

from trainer.config import Config, ConfigError, from_dict, load_config


def test_toml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[data]\nbatch_size = 64\n[model]\nname = "dlrm"\n')
    cfg = load_config(["--config", str(path), "--model", "dlrm_dcn", "--data.shuffle", "false", "--training.epochs=3"])
    assert cfg.data.batch_size == 64 and cfg.model.name == "dlrm_dcn"
    assert cfg.data.shuffle is False and cfg.training.epochs == 3
    assert cfg.run_dir == "runs/exp"
    import tomllib

    assert from_dict(Config, tomllib.loads(cfg.to_toml()), "resolved") == cfg


def test_unknown_key_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nbatch_sise = 64\n")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config(["--config", str(path)])
    with pytest.raises(ValueError, match="embedding_dim"):
        from_dict(Config, {"model": {"embedding_dim": 8}}, "x").model.check()  # dense arch must end in 8
    with pytest.raises(ValueError, match="training.threads"):
        from_dict(Config, {"training": {"threads": -1}}, "x")


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[training]\nepochs = "two"\n', r"bad.toml \[training\]: epochs = 'two' should be int"),
        ("[training]\nepochs = 2.5\n", "epochs = 2.5 should be int"),
        ("[data]\nshuffle = 1\n", "shuffle = 1 should be bool"),
        ("[optimizer]\ndense_lr = true\n", "dense_lr = True should be float"),
        ('[training]\ntop_k = ["10"]\n', "top_k = \\['10'\\] should be a list of ints"),
        ("training = 3\n", r"bad.toml \[training\]: expected a \[table\]"),
        ("[training]\nepoch = 2\n", r"unknown key\(s\) \['epoch'\]"),
        ("[training\n", "bad.toml: not valid TOML"),
        ("[optimizer]\ndense_lr = -1\n", "bad.toml: optimizer.dense_lr is -1.0; a learning rate must be >= 0"),
        ("[optimizer]\nsparse_lr = nan\n", "optimizer.sparse_lr is nan"),
        ('[optimizer]\ntable_lr = ["a=-0.5"]\n', "optimizer.table_lr a is -0.5"),
        ("[checkpoint]\npreempt_grace_s = inf\n", "checkpoint.preempt_grace_s is inf; expected a finite number"),
        ('[model]\nname = "nosuch"\n', "name = 'nosuch' should be one of 'dlrm', 'dlrm_dcn'"),
        ('[sharding]\nsharding_types = ["table_wise", "rows"]\n', "should be a list, each one of 'table_wise', "),
    ],
)
def test_a_bad_config_file_is_one_config_error(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(path)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--optimizer.dense_lr", "-1"], "^optimizer.dense_lr is -1.0; a learning rate must be >= 0$"),
        (["--optimizer.sparse_lr", "nan"], "^optimizer.sparse_lr is nan"),
        (["--training.epochs", "two"], "^--training.epochs: invalid literal for int"),
        (["--training.epoch", "2"], r"^unknown flag\(s\) --training.epoch 2 \(did you mean --training.epochs\?\)"),
        (["--data.batch_size", "0"], "^data.batch_size and data.eval_batch_size must be positive$"),
        (["--model", "nosuch"], "^--model.name: 'nosuch' is not one of dlrm, "),
        (["--optimizer.dense", "lamb"], "^--optimizer.dense: 'lamb' is not one of adam, adamw, adagrad, sgd$"),
        (["--sharding.sharding_types", "table_wise", "rows"], "^--sharding.sharding_types: 'rows' is not one of "),
        (["--data.batch_size"], "^--data.batch_size: expected a value"),
    ],
)
def test_a_bad_flag_is_one_line_not_a_box(flags, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config(flags)
    assert capsys.readouterr().err == ""  # tyro's framed message was turned into the error


def test_a_section_built_in_python_checks_its_choices():
    from trainer.config import OptimizerConfig

    with pytest.raises(ValueError, match="optimizer.lr_schedule: 'step' is not one of constant, linear"):
        OptimizerConfig(lr_schedule="step")
