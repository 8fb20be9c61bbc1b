"""The models: `models.registry` (MODELS, build_model), one module per model, `models.config`.

The names below load on first use (PEP 562), so `models.config` (which the command line and the
config tree read) imports without torch or torchrec: `recsys train` with a bad flag, dataset or
directory answers in about two seconds, not seven.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "MODELS": "models.registry",
    "build_model": "models.registry",
    "InBatchSoftmax": "models.losses",
    "RankingModel": "models.losses",
    "ModelConfig": "models.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
