"""How numbers are shown in logs and tables: one format for the trainer's lines, the evaluation
tables and the report."""

from __future__ import annotations

import math
from typing import Any

MISSING = "n/a"


def format_number(value: Any) -> str:
    """Counts with thousands separators, metrics to 4 decimals (big ones as counts), missing or
    NaN as n/a; anything else as str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def format_metrics(metrics: dict[str, Any], leave_out: tuple[str, ...] = ("ctr",)) -> str:
    """`name value` pairs on one line, e.g. "auc 0.8802 logloss 0.4410"."""
    return " ".join(f"{name} {format_number(value)}" for name, value in metrics.items() if name not in leave_out)
