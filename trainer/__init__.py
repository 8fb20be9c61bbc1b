"""The per-rank trainer (`python -m trainer`, under torchrun) and its Python API:
`from trainer import load_config, train` (trainer/api.py).

The API loads on first use (PEP 562): `trainer.config` and `trainer.preflight`, which the command
line reads before any rank starts, import without torch or torchrec.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainingFailed", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    from trainer import api

    return getattr(api, name)
