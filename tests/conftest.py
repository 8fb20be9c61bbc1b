"""Fixtures only; the helpers they build on are in tests/helpers/."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.helpers import data


@pytest.fixture
def tiny_table() -> pa.Table:
    """5 rows: dense with a null, a scalar id column with a null, a multi-hot column with an
    empty list and a null list (tests.helpers.data.tiny_table)."""
    return data.tiny_table()
