"""`recsys configs`: the config presets shipped with the package (launch/configs/*.toml; in a
checkout, `configs/` links there), listed and copied out to edit, like `tune ls` / `tune cp`.

    recsys configs                      # name and first comment line of each preset
    recsys configs cp demo my.toml      # copy one to edit; then recsys train --config my.toml
    recsys configs cp movielens .       # into a directory, under its own name
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path


def presets() -> dict[str, Path]:
    """{name: file} of every preset, from the installed package (a wheel or a checkout)."""
    folder = resources.files("launch") / "configs"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    return {Path(f.name).stem: Path(str(f)) for f in files}


def _summary(path: Path) -> str:
    first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
    return first.lstrip("# ").strip()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys configs", description="List or copy the shipped config presets.")
    sub = parser.add_subparsers(dest="action")
    sub.add_parser("ls", help="list the presets (the default)")
    copy = sub.add_parser("cp", help="copy a preset to a file or directory, to edit")
    copy.add_argument("name", help="a preset's name (recsys configs ls)")
    copy.add_argument("dest", nargs="?", default=".", help="a file, or a directory (default: here)")
    copy.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    found = presets()
    if args.action in (None, "ls"):
        width = max(map(len, found))
        for name, path in found.items():
            print(f"  {name.ljust(width)}  {_summary(path)}")
        print("copy one with `recsys configs cp NAME [DEST]`; train with `recsys train --config FILE`")
        return 0
    if args.name not in found:
        print(f"error: no preset '{args.name}'; the presets are: {', '.join(found)}", file=sys.stderr)
        return 2
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{args.name}.toml"
    if dest.exists() and not args.force:
        print(f"error: {dest} exists; --force replaces it", file=sys.stderr)
        return 2
    if not dest.parent.is_dir():
        print(f"error: {dest.parent} is not a directory", file=sys.stderr)
        return 2
    shutil.copyfile(found[args.name], dest)
    print(f"copied preset {args.name} to {dest}")
    return 0
