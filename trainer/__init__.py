"""The per-rank trainer (`python -m trainer`, under torchrun) and its Python API:
`from trainer import load_config, train` (trainer/api.py)."""

from trainer.api import TrainingFailed, load_config, train

__all__ = ["TrainingFailed", "load_config", "train"]
