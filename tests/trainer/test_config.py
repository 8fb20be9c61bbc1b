import pytest

from trainer.config import Config, from_dict, load_config


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
