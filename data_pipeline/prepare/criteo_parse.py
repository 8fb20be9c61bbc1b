"""Reading Criteo's raw TSV: the units of work a file is cut into (byte ranges at line
boundaries, fixed by the file size alone), and the parser that turns one unit into clean columns
(labels, counts, categorical values as 64-bit integers) and reports malformed lines with their
file and line number. Runs in the preparer's worker processes; `criteo.py` drives the passes."""

from __future__ import annotations

import bz2
import fnmatch
import io
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipeline.schema import SPLITS, DataError

if TYPE_CHECKING:
    from data_pipeline.prepare.criteo import CriteoOptions

NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE = [f"int_{i}" for i in range(NUM_DENSE)]
SPARSE = [f"cat_{i}" for i in range(NUM_SPARSE)]
RAW_COLUMNS = [LABEL, *DENSE, *SPARSE]
MAX_REPORTED = 20  # malformed lines kept (with line numbers) per unit for the report
_INTEGER = re.compile(r"^[+-]?[0-9]{1,18}$").pattern


class BadRows(DataError):
    """Too many malformed lines."""


# ---- units of work -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    file_index: int
    path: str
    chunk: int
    start: int
    end: int  # -1: to the end of the file

    @property
    def key(self) -> str:
        return f"{self.file_index:04d}-{self.chunk:04d}"

    @property
    def size(self) -> int:
        return (os.path.getsize(self.path) if self.end < 0 else self.end) - self.start


def _line_start_after(f, offset: int) -> int:
    """The start of the first line that begins at or after `offset`."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def plan_units(files: list[str], chunk_bytes: int) -> list[Unit]:
    units = []
    for index, path in enumerate(files):
        size = os.path.getsize(path)
        if path.endswith((".gz", ".bz2")) or size <= chunk_bytes:
            units.append(Unit(index, path, 0, 0, -1))
            continue
        with open(path, "rb") as f:
            starts = sorted({_line_start_after(f, k * chunk_bytes) for k in range(-(-size // chunk_bytes))})
        starts = [s for s in starts if s < size]
        units += [Unit(index, path, k, s, e) for k, (s, e) in enumerate(zip(starts, [*starts[1:], -1]))]
    return units


class _ByteRange(io.RawIOBase):
    """A read-only view of bytes [start, end) of a file, for pyarrow's CSV reader."""

    def __init__(self, path: str, start: int, end: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close(), as pyarrow closes its streams
        self.f.seek(start)
        self.left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[: self.left]
        n = self.f.readinto(view)
        self.left -= n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


# ---- parsing ------------------------------------------------------------------------------------

_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
    _HEX[ord(chr(_c).upper())] = _i


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def categorical_values(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings -> (uint64 values, missing mask); vectorised for Criteo's 8-digit values.

    Fast path (every present value has 8 characters, as in Criteo): the present values lie back to
    back in the string data buffer, so it is decoded as one [k, 8] byte matrix with no gather.
    """
    column = column.cast(pa.string()) if column.type != pa.string() else column
    n = len(column)
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + n + 1]
    lengths = np.diff(offsets)
    missing = lengths == 0  # null or empty
    values = np.zeros(n, np.uint64)
    present = n - int(missing.sum())
    if present == 0:
        return values, missing
    data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if len(data) == 8 * present and (lengths[~missing] == 8).all():
        nibbles = _HEX[data].reshape(present, 8)
        if (nibbles != 255).all():
            packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # [k, 4] bytes, most significant first
            values[~missing] = np.ascontiguousarray(packed).view(">u4").ravel()
            return values, missing
    data = np.frombuffer(column.buffers()[2], np.uint8)
    eight = np.flatnonzero(lengths == 8)  # gather the 8-character values, decode the rest one by one
    nibbles = _HEX[data[offsets[eight, None] + np.arange(8)]]
    hex_ok = (nibbles != 255).all(axis=1)
    packed = (nibbles[hex_ok, 0::2] << 4) | nibbles[hex_ok, 1::2]
    values[eight[hex_ok]] = np.ascontiguousarray(packed).view(">u4").ravel()
    slow = np.ones(n, bool)
    slow[eight[hex_ok]] = False
    for row in np.flatnonzero(slow & ~missing):
        raw = data[offsets[row] : offsets[row + 1]]
        is_hex = len(raw) <= 16 and bool((_HEX[raw] != 255).all())
        values[row] = int(raw.tobytes(), 16) if is_hex else fnv1a(raw.tobytes())
    return values, missing


@dataclass
class Parsed:
    """The clean rows of one CSV block."""

    split: np.ndarray  # int8 index into SPLITS
    label: np.ndarray  # int8
    dense: np.ndarray  # [n, 13] float32, transformed
    values: np.ndarray  # [n, 26] uint64 raw categorical values
    missing: np.ndarray  # [n, 26] bool


@dataclass
class UnitReport:
    lines: int = 0
    rows: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bad: int = 0
    examples: list = field(default_factory=list)  # (line in unit, reason)


class UnitParser:
    """Streams one unit's clean rows; records malformed lines with their line numbers."""

    def __init__(self, unit: Unit, opts: CriteoOptions) -> None:
        self.unit = unit
        self.opts = opts
        self.report = UnitReport()
        self.skipped_lines: list[int] = []  # physical lines (1-based, in unit) with a wrong field count
        self.bad_good_rows: list[tuple[int, str]] = []  # (index among well-formed lines, reason)
        name = os.path.basename(unit.path)
        self.fixed_split = None
        if opts.test_files and fnmatch.fnmatch(name, opts.test_files):
            self.fixed_split = "test"
        elif opts.valid_files and fnmatch.fnmatch(name, opts.valid_files):
            self.fixed_split = "valid"
        self.rng = np.random.default_rng([opts.seed, zlib.crc32(name.encode()), unit.chunk])

    def _field_count(self, row) -> str:
        """pyarrow's invalid-row handler (its exceptions are swallowed, so it answers "error")."""
        self.skipped_lines.append(row.number)
        return "error" if self._over_limit() else "skip"

    def _over_limit(self) -> bool:
        return len(self.skipped_lines) + len(self.bad_good_rows) > self.opts.max_bad_rows

    def _check_limit(self) -> None:
        if self._over_limit():
            raise BadRows(self.message())

    def _assign_splits(self, n: int) -> np.ndarray:
        u = self.rng.random(n)
        if self.fixed_split == "valid":
            return np.full(n, 1, np.int8)
        if self.fixed_split == "test":
            return np.where(u < 0.5, 1, 2).astype(np.int8) if not self.opts.valid_files else np.full(n, 2, np.int8)
        if self.opts.test_files or self.opts.valid_files:
            return np.zeros(n, np.int8)
        edges = np.cumsum(self.opts.split_fractions)[:-1]
        return np.searchsorted(edges, u, side="right").astype(np.int8)

    def _open(self):
        if self.unit.end < 0 and self.unit.start == 0:
            return self.unit.path  # pyarrow decompresses .gz / .bz2 by extension
        end = self.unit.end if self.unit.end >= 0 else os.path.getsize(self.unit.path)
        return io.BufferedReader(_ByteRange(self.unit.path, self.unit.start, end), 1 << 20)

    def _reader(self) -> pacsv.CSVStreamingReader:
        return pacsv.open_csv(
            self._open(),
            read_options=pacsv.ReadOptions(column_names=RAW_COLUMNS, block_size=8 << 20, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=self._field_count),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in RAW_COLUMNS}, strings_can_be_null=True, null_values=[""]
            ),
        )

    def __iter__(self) -> Iterator[Parsed]:
        seen = 0
        reader = None
        while True:
            try:
                if reader is None:  # opening reads (and parses) the first block already
                    reader = self._reader()
                block = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                self._check_limit()  # the handler stopped the reader: too many malformed lines
                raise DataError(f"{self.unit.path}: cannot be parsed as Criteo TSV ({e})") from None
            yield self._clean(block, seen)
            seen += block.num_rows
        self.report.lines = seen + len(self.skipped_lines)

    def _clean(self, block: pa.RecordBatch, first: int) -> Parsed:
        n = block.num_rows
        ok = np.ones(n, bool)
        label = block.column(LABEL)
        is_label = pc.fill_null(pc.is_in(label, pa.array(["0", "1"])), False).to_numpy(zero_copy_only=False)
        self._bad(~is_label & ok, first, lambda r: f"label {label[r].as_py()!r} is not 0 or 1")
        ok &= is_label
        dense = np.zeros((n, NUM_DENSE), np.float64)
        for j, name in enumerate(DENSE):
            column = block.column(name)
            try:
                numbers = pc.cast(column, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                well_formed = pc.fill_null(pc.match_substring_regex(column, _INTEGER), True).to_numpy(
                    zero_copy_only=False
                )
                self._bad(
                    ~well_formed & ok,
                    first,
                    lambda r, name=name, column=column: f"{name} {column[r].as_py()!r} is not an integer",
                )
                ok &= well_formed
                numbers = pc.cast(pc.if_else(pa.array(well_formed), column, pa.scalar(None, pa.string())), pa.int64())
            dense[:, j] = pc.fill_null(numbers, 0).to_numpy()
        if self.opts.dense_transform == "log1p":
            dense = np.log1p(np.maximum(dense, 0))
        values = np.empty((n, NUM_SPARSE), np.uint64)
        missing = np.empty((n, NUM_SPARSE), bool)
        for j, name in enumerate(SPARSE):
            values[:, j], missing[:, j] = categorical_values(block.column(name))
        split = self._assign_splits(n)
        keep = np.flatnonzero(ok)
        labels = (label.to_numpy(zero_copy_only=False) == "1").astype(np.int8)
        return Parsed(split[keep], labels[keep], dense[keep].astype(np.float32), values[keep], missing[keep])

    def _bad(self, mask: np.ndarray, first: int, reason) -> None:
        for row in np.flatnonzero(mask):
            self.bad_good_rows.append(
                (first + int(row), reason(int(row)) if len(self.bad_good_rows) < MAX_REPORTED else "")
            )
        if mask.any():
            self._check_limit()

    def line_of(self, good_row: int) -> int:
        """Physical line (1-based, in the unit) of the `good_row`-th well-formed line."""
        line = good_row + 1
        for skipped in sorted(self.skipped_lines):
            if skipped <= line:
                line += 1
        return line

    def finish(self) -> UnitReport:
        report = self.report
        report.bad = len(self.skipped_lines) + len(self.bad_good_rows)
        examples = [
            (n, f"wrong number of fields (expected {len(RAW_COLUMNS)})") for n in self.skipped_lines[:MAX_REPORTED]
        ]
        examples += [(self.line_of(r), why) for r, why in self.bad_good_rows[:MAX_REPORTED]]
        report.examples = sorted(examples)[:MAX_REPORTED]
        return report

    def message(self) -> str:
        report = self.finish()
        return (
            f"{report.bad} malformed lines in {self.unit.path} (more than --max-bad-rows {self.opts.max_bad_rows}): "
            + "; ".join(line_examples(self.unit, report.examples))
        )


def split_shares(path: str, opts: CriteoOptions) -> tuple[float, float, float]:
    """The expected share of a file's rows that goes to train, valid and test (as UnitParser assigns them)."""
    name = os.path.basename(path)
    if opts.test_files and fnmatch.fnmatch(name, opts.test_files):
        return (0.0, 0.0, 1.0) if opts.valid_files else (0.0, 0.5, 0.5)
    if opts.valid_files and fnmatch.fnmatch(name, opts.valid_files):
        return (0.0, 1.0, 0.0)
    if opts.test_files or opts.valid_files:
        return (1.0, 0.0, 0.0)
    return tuple(opts.split_fractions)


SAMPLE_BYTES = 1 << 20


def estimated_lines(path: str) -> int:
    """A file's line count, estimated from its first MB (of compressed bytes for .gz / .bz2)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(SAMPLE_BYTES)
    text, consumed = head, len(head)
    try:
        if path.endswith(".gz"):
            inflate = zlib.decompressobj(wbits=47)  # a gzip (or zlib) header
            text = inflate.decompress(head)
            consumed -= len(inflate.unused_data)  # past the end of the first gzip member
        elif path.endswith(".bz2"):
            text = bz2.BZ2Decompressor().decompress(head)
    except (zlib.error, OSError, EOFError):
        return 0  # unreadable: the parse will say so; row groups then take the smallest size
    lines = text.count(b"\n") + (1 if consumed == size and text and not text.endswith(b"\n") else 0)
    return round(lines * size / max(consumed, 1))


def estimated_split_rows(units: list[Unit], opts: CriteoOptions) -> dict[str, int]:
    """Rows each split will get, estimated from the files' sizes (no pass over the data)."""
    rows = dict.fromkeys(SPLITS, 0.0)
    for path in dict.fromkeys(u.path for u in units):
        lines = estimated_lines(path)
        for split, share in zip(SPLITS, split_shares(path, opts)):
            rows[split] += lines * share
    return {s: round(r) for s, r in rows.items()}


def _lines_before(path: str, offset: int) -> int:
    """Newlines in the first `offset` bytes (to turn a unit's line numbers into the file's)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 16 << 20))
            count += block.count(b"\n")
            offset -= len(block)
    return count


def line_examples(unit: Unit, examples: list, limit: int = 5) -> list[str]:
    """ "file line N: reason" for a unit's malformed lines, with line numbers counted in the file."""
    first = _lines_before(unit.path, unit.start) if unit.start and examples else 0
    return [f"{unit.path} line {first + n}: {why}" for n, why in examples[:limit]]
