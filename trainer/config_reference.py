"""The config reference (docs/config.md) generated from the config dataclasses, so it cannot drift
from them: every knob's `section.key`, its default (as TOML writes it) and its docstring.

    python -m trainer.config_reference > docs/config.md      # or: make docs

tests/trainer/test_config_reference.py fails when docs/config.md differs from what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing

from trainer.config import ALIASES, NOT_KNOBS, Config, toml_value

HEADER = """# Config reference

One typed tree of dataclasses (`trainer/config.py`, `data_pipeline/config.py`, `models/config.py`,
`trainer/tracking.py`), read from TOML (`--config FILE`: `[section]` tables of `key = value`) and
overridden on the command line with `--section.key VALUE` (lists: `--section.key A B`; booleans:
`true`/`false`). Every knob has the one name below everywhere: TOML, the command line, the run's
resolved `config.toml`.
Aliases: {aliases}, `--run-dir` = `run_dir`.
`python -m trainer --help` prints the same.

Generated from the dataclasses by `make docs` (`python -m trainer.config_reference`); a test checks
that this file matches them.
"""


def field_docs(cls: type) -> dict[str, str]:
    """name -> the docstring written under the field in the class body (PEP 257 attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, after in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[statement.target.id] = " ".join(after.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return toml_value(value)


def rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every leaf field under `cls`, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    out = []
    for field in dataclasses.fields(cls):
        if field.name in NOT_KNOBS:
            continue
        kind = hints[field.name]
        if typing.get_origin(kind) is typing.Annotated:
            kind = typing.get_args(kind)[0]
        if dataclasses.is_dataclass(kind):
            out += rows(kind, f"{prefix}{field.name}.")
        else:
            out.append((prefix + field.name, _default(field), docs.get(field.name, "")))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """docs/config.md: the header, then one table per section."""
    aliases = ", ".join(f"`{alias}` = `{key.removeprefix('--')}`" for alias, key in ALIASES.items())
    lines = [HEADER.format(aliases=aliases)]
    section = None
    for key, default, meaning in rows():
        name = key.split(".")[0] if "." in key else "top level"
        if name != section:
            section = name
            lines += ["", f"## {'`[' + name + ']`' if name != 'top level' else 'Top level'}", ""]
            lines += ["| key | default | meaning |", "|---|---|---|"]
        lines.append(f"| `{key}` | `{_cell(default)}` | {_cell(meaning)} |")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
