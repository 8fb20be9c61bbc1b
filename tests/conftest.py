"""Fixtures only; the helpers they build on are in tests/helpers/."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.helpers import data, object_store


@pytest.fixture
def tiny_table() -> pa.Table:
    """5 rows: dense with a null, a scalar id column with a null, a multi-hot column with an
    empty list and a null list (tests.helpers.data.tiny_table)."""
    return data.tiny_table()


@pytest.fixture(scope="session")
def s3() -> str:
    """A real S3 API server on loopback (moto), the AWS variables pointing at it, and an empty
    bucket `object_store.BUCKET`; the endpoint URL."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with object_store.s3_server() as endpoint:
        yield endpoint
