"""docs/config.md is the config reference generated from the dataclasses: it names every knob, with
its default, and cannot drift from the code (regenerate with `make docs`)."""

import dataclasses

from tests.helpers.runs import ROOT
from trainer.config import Config
from trainer.config_reference import field_docs, reference, rows


def test_docs_config_md_is_generated_from_the_dataclasses():
    assert (ROOT / "docs" / "config.md").read_text() == reference(), "docs/config.md is stale: run `make docs`"


def test_every_knob_is_documented():
    undocumented = [key for key, _, meaning in rows() if not meaning]
    assert not undocumented, f"fields without a docstring under them: {undocumented}"


def test_the_reference_lists_every_leaf_with_its_default():
    table = {key: default for key, default, _ in rows()}
    assert table["data.batch_size"] == "2048" and table["checkpoint.resume"] == '"auto"'
    assert table["training.top_k"] == "[10, 50]" and table["data.shuffle"] == "true"
    config = Config()
    sections = [
        getattr(config, f.name) for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(config, f.name))
    ]
    leaves = sum(len(dataclasses.fields(section)) for section in sections)
    # every section's fields, plus config, run_dir and derive_defaults
    assert len(sections) == 7 and len(table) == leaves + 3


def test_field_docs_reads_the_docstring_under_each_field():
    @dataclasses.dataclass
    class Example:
        a: int = 1
        """The first.
        Two lines."""
        b: int = 2

    assert field_docs(Example) == {"a": "The first. Two lines."}
