"""`recsys prepare synthetic` through DatasetOutput: same spec up to date, another refused, and a
dataset written before it used DatasetOutput still up to date."""

import json

import pytest

from data_pipeline.prepare.synthetic import SyntheticSpec, prepare

SPEC = SyntheticSpec(rows=3000, files=1, row_group_rows=500, max_vocab=100)


def test_same_spec_is_up_to_date_and_another_is_refused(tmp_path):
    messages = []
    first = prepare(SPEC, tmp_path / "d", log=messages.append)
    assert prepare(SPEC, tmp_path / "d", log=messages.append).root == first.root and "up to date" in messages[-1]
    with pytest.raises(FileExistsError, match="different dataset"):
        prepare(SyntheticSpec(rows=4000, files=1, row_group_rows=500, max_vocab=100), tmp_path / "d", log=print)
    assert first.splits["test"].oracle_auc > 0.6


def test_a_dataset_from_the_earlier_generator_stays_up_to_date(tmp_path):
    prepare(SPEC, tmp_path / "d", log=lambda *_: None)
    raw = json.loads((tmp_path / "d" / "dataset.json").read_text())
    raw["extra"] = {"generator": raw["extra"].pop("provenance")}  # how the generator recorded it before
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(raw))
    messages = []
    prepare(SPEC, tmp_path / "d", log=messages.append)
    assert "up to date" in messages[-1]
