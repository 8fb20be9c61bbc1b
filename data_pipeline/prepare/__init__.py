"""`recsys prepare KIND`: raw data -> a dataset directory (Parquet files per split + dataset.json).

Offline jobs, one module per kind, each with the same two entry points:

    parse(argv) -> (options, out, overwrite)                      its command line
    prepare(options, out, overwrite=False, log=print) -> DatasetSchema

Every kind writes through `output.DatasetOutput` (refuse another dataset unless --overwrite,
"up to date" for the same inputs and options, atomic files, dataset.json last) and uses its id
layout (0 missing, 1 rare or unseen, 2.. the vocabulary). `DatasetOutput.start` locks `--out` until
the preparer ends (data_pipeline.dirlock), so a second preparer into it fails at once. Modules are
imported on demand: a kind's dependencies load only when it runs.
"""

from __future__ import annotations

import importlib
import sys

KINDS = {
    "synthetic": "data_pipeline.prepare.synthetic",
    "criteo": "data_pipeline.prepare.criteo",
    "tabular": "data_pipeline.prepare.tabular",
    "movielens": "data_pipeline.prepare.movielens",
}


def main(kind: str, argv: list[str]) -> int:
    """Run `recsys prepare KIND ARGV`: bad input is one `error:` line and exit code 2."""
    from data_pipeline.dirlock import DirInUse
    from data_pipeline.schema import DataError

    module = importlib.import_module(KINDS[kind])
    options, out, overwrite = module.parse(argv)
    try:
        module.prepare(options, out, overwrite)
    except (DataError, FileExistsError, DirInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
