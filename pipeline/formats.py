"""File formats, one class each: how an input file is checked, split into units and read, and
how an output file is written and recognised as committed.

Inputs (by extension in any case, or `--input-format`):
- Parquet: read column-wise; units are row groups (`--rows-per-unit`).
- JSONL (`.jsonl`, `.ndjson`, `.json`, also compressed): read line by line, as pyarrow's reader
  rejects a whole block for one bad line. A line that is not a JSON object is a row with `error`
  `invalid_line: line N ...` (id null); empty lines are not rows; a lone surrogate is its row's
  error; a file that is one JSON array is one row per element. Ids keep their JSON type (the
  first row's decides; another type is that row's `invalid_id`).
- CSV (also compressed): a malformed record, or one whose quote is left open (`_open_quotes`;
  the lines after it are read as rows), is an `invalid_row: record N ...` row after the good
  rows of its unit.
JSONL and CSV units are row ranges fingerprinted by the sha256 of the file's bytes; Parquet's
fingerprint is its footer and id column (`ParquetInput._digest`).

Outputs (`--output-format`): Parquet keeps the unit's statistics and the data's sha256 in its
footer; JSONL (bytes as "base64:...") in a sidecar `_stats/<name>.json` committed after the data
file, and the file counts as committed only when the sidecar names its exact size and sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from . import openai_batch
from .errors import RowError
from .row_settings import SAMPLING_COLUMNS, checked
from .stages import TASKS
from .storage import Location, commit, ensure_dir, read_bytes, read_file, retry, temp_sibling

log = logging.getLogger(__name__)
STATS_KEY = b"persimmon_batch"
ID_CHUNK_ROWS = 1 << 18  # ids handed to the duplicate check at a time (see read_ids)
OTHER_KEYS = 20  # a JSONL file's keys the run does not read, named when a column is missing


@dataclass
class Split:
    """One unit's part of a file: row groups (Parquet) or a row range."""
    row_groups: list[int] | None
    first_row: int
    num_rows: int


@dataclass
class Inspected:
    num_rows: int = 0
    schema: pa.Schema | None = None  # the file's columns
    splits: list[Split] = field(default_factory=list)
    digest: str = ""  # content fingerprint: Parquet footer hash, or the bytes' hash
    problem: str | None = None


def _open_text(loc: Location) -> bytes:
    """The file's bytes, decompressed when its name says so (in any case: `FEB.CSV.GZ`)."""
    raw = read_bytes(loc)
    codec = {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}.get(loc.path.rsplit(".", 1)[-1].lower())
    if codec is None:
        return raw
    with pa.CompressedInputStream(pa.BufferReader(raw), codec) as f:
        return f.read()


def _id_chunks(ids: pa.ChunkedArray) -> Iterator[pa.Array]:
    return (ids.slice(a, ID_CHUNK_ROWS).combine_chunks() for a in range(0, len(ids), ID_CHUNK_ROWS))


def _no_rows(config) -> pa.Table:
    """An empty file's table: the id, prompt and kept columns, of no type yet."""
    return pa.table({c: pa.nulls(0) for c in (config.id_column, config.prompt_column, *config.keep_columns)})


class InputFormat:
    """Each format has `inspect(loc, config) -> Inspected`; `read_ids(loc, config)`: every row's id
    (null if none), in order, in arrays of at most `ID_CHUNK_ROWS`; `batches(loc, split, config,
    columns)`: the unit's rows as tables of `columns` (those the file has), with {row: read error}."""

    name = title = ""  # title: how a problem names the format
    suffixes: tuple[str, ...] = ()
    by_extension = True  # chosen for these suffixes under --input-format auto
    lacking = ""  # the problem of a file without a needed column

    def inspect(self, loc: Location, config) -> Inspected:
        try:  # names: the columns the file has (None: not known, no row is readable)
            found, names, splits = self._inspect(loc, config)
        except FileNotFoundError:
            return Inspected(problem="file vanished")
        except Exception as e:  # noqa: BLE001 - truncated, undecodable, not the format at all, storage error
            return Inspected(problem=f"unreadable {self.title or self.name} ({type(e).__name__}: {e})")
        needed = dict.fromkeys((config.id_column, config.prompt_column, *config.keep_columns))  # once each
        missing = [c for c in needed if c not in names] if names is not None else []
        if missing:
            found.problem = self.lacking.format(missing=missing, names=names)
        elif found.num_rows == 0:
            found.problem = "empty (0 rows)"
        else:
            found.splits = splits
        return found

    def split_name(self, stem: str, split: Split, n_splits: int) -> str:
        if n_splits == 1:
            return stem
        if split.row_groups is not None:
            return f"{stem}.rg{split.row_groups[0]:05d}-{split.row_groups[-1]:05d}"
        return f"{stem}.rows{split.first_row:09d}-{split.first_row + split.num_rows - 1:09d}"


class ParquetInput(InputFormat):
    name, title, suffixes = "parquet", "Parquet", (".parquet",)
    lacking = "missing column(s) {missing}; it has {names}"

    def _inspect(self, loc: Location, config) -> tuple[Inspected, list[str], list[Split]]:
        meta = read_file(loc, lambda f: pq.ParquetFile(f).metadata, "read footer of")
        schema = meta.schema.to_arrow_schema()
        found = Inspected(num_rows=meta.num_rows, schema=schema, digest=self._digest(loc, meta, config))
        return found, schema.names, self._splits(meta, config.rows_per_unit)

    def _digest(self, loc: Location, meta, config) -> str:
        """A cheap content hash: the footer (schema, row groups, chunk statistics, sizes, offsets)
        and the id column's stored bytes, which catch a same-size reordering with its mtime kept
        (cp -p). Not seen: other columns changed at the same compressed sizes and statistics."""
        h = hashlib.sha256(json.dumps(meta.to_dict(), sort_keys=True, default=str).encode())
        leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
        if config.id_column in leaves:
            chunks = [meta.row_group(g).column(leaves.index(config.id_column)) for g in range(meta.num_row_groups)]
            spans = [(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset,
                      c.total_compressed_size) for c in chunks]
            h.update(b"".join(read_file(loc, lambda f: [f.read_at(size, at) for at, size in spans], "read ids of")))
        return h.hexdigest()[:32]

    @staticmethod
    def _splits(meta, rows_per_unit: int) -> list[Split]:
        """Consecutive row groups, as many as fit `rows_per_unit` rows (at least one each)."""
        splits = [Split([], 0, 0)]
        for g in range(meta.num_row_groups):
            rows, last = meta.row_group(g).num_rows, splits[-1]
            if last.row_groups and rows_per_unit > 0 and last.num_rows + rows > rows_per_unit:
                last = Split([], last.first_row + last.num_rows, 0)
                splits.append(last)
            last.row_groups.append(g)
            last.num_rows += rows
        return splits

    def read_ids(self, loc: Location, config) -> Iterator[pa.Array]:
        what = f"read ids of {loc.uri}"
        with retry(lambda: loc.fs.open_input_file(loc.path), what, loc.retries) as f:
            reader = retry(lambda: pq.ParquetFile(f), what, loc.retries)
            for g in range(reader.metadata.num_row_groups):
                ids = retry(lambda g=g: reader.read_row_group(g, columns=[config.id_column], use_threads=False),
                            what, loc.retries)
                yield from _id_chunks(ids.column(0))

    def batches(self, loc, split, config, columns):
        with loc.fs.open_input_file(loc.path) as f:
            reader = pq.ParquetFile(f)
            columns = [c for c in columns if c in reader.schema_arrow.names]
            for rb in reader.iter_batches(batch_size=config.batch_size, row_groups=split.row_groups, columns=columns):
                yield pa.Table.from_batches([rb]), {}


class _RowsInput(InputFormat):
    """JSONL and CSV: the file parsed whole (`_parse(raw, config)` -> (table, {row: error})), cached."""

    lacking = "no row has column(s) {missing}; they have {names}"

    _cache: dict = {}

    def _load(self, loc: Location, config) -> tuple[pa.Table, dict[int, RowError], str]:
        """(the file's rows, {row: read error}, sha256)."""
        key = (loc.uri, config.task, config.id_column, config.prompt_column, tuple(config.keep_columns),
               TASKS[config.task].input_columns(config))  # what _parse reads depends on all of these
        hit = self._cache.get(key)
        raw = _open_text(loc)
        digest = hashlib.sha256(raw).hexdigest()[:32]
        if hit is not None and hit[2] == digest:
            return hit
        table, errors = self._parse(raw, config)
        self._cache.clear()  # one file at a time: replicas read their units in turn
        self._cache[key] = (table, errors, digest)
        return table, errors, digest

    def _inspect(self, loc: Location, config) -> tuple[Inspected, list[str] | None, list[Split]]:
        table, errors, digest = self._load(loc, config)
        meta = table.schema.metadata or {}
        absent = set(json.loads(meta.get(b"absent", b"[]")))
        names = [n for n in table.schema.names if n not in absent] + json.loads(meta.get(b"other", b"[]"))
        n, step = table.num_rows, config.rows_per_unit
        step = step if 0 < step < n else n or 1
        splits = [Split(None, a, min(step, n - a)) for a in range(0, n, step)]
        return Inspected(n, table.schema, digest=digest), names if n > len(errors) else None, splits

    def read_ids(self, loc: Location, config) -> Iterator[pa.Array]:
        yield from _id_chunks(self._load(loc, config)[0].column(config.id_column))

    def batches(self, loc, split, config, columns):
        table, errors, _ = self._load(loc, config)
        step = config.batch_size
        for a in range(split.first_row, split.first_row + split.num_rows, step):
            b = min(a + step, split.first_row + split.num_rows)
            part = table.slice(a, b - a).select([c for c in columns if c in table.schema.names])
            yield part, {i - a: errors[i] for i in range(a, b) if i in errors}


def _column(values: list) -> pa.Array:
    """An Arrow column from JSON values: objects and arrays as their JSON text (so files whose
    objects have other keys share a schema); mixed types as text, non-strings as their JSON."""
    values = [json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


class JsonlInput(_RowsInput):
    name = "jsonl"
    suffixes = tuple(base + codec for base in (".jsonl", ".ndjson", ".json") for codec in ("", ".gz", ".zst", ".bz2"))

    def _records(self, raw: bytes) -> Iterator[tuple[str, object, RowError | None]]:
        """(where, JSON value, error) for each non-empty line (split on b"\\n" only: JSON strings may
        hold U+2028; decoded one by one: a line that is not UTF-8 is its row's error), or element."""
        elements = _json_array(raw)
        if elements is not None:
            yield from ((f"element {n}", value, None) for n, value in enumerate(elements, 1))
            return
        for n, chunk in enumerate(raw.split(b"\n"), 1):
            try:
                line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield f"line {n}", None, RowError("invalid_line", f"line {n} is not UTF-8 (byte "
                                                  f"0x{chunk[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"line {n}", None, RowError("invalid_line", f"line {n} is not JSON ({e.msg} at column {e.colno})")

    def _objects(self, raw: bytes, config) -> Iterator[tuple[str, dict | None, RowError | None]]:
        """(where, row or None, error) for each record: not a JSON object, or a lone surrogate, is an error."""
        surrogates = _SURROGATE_ESCAPE.search(raw) is not None  # only then look for them row by row
        for where, obj, err in self._records(raw):
            if err is not None:
                yield where, None, err
                continue
            if not isinstance(obj, dict):
                kind = {type(None): "null", bool: "boolean", list: "array", str: "string"}.get(type(obj), "number")
                error_kind = "invalid_line" if where.startswith("line") else "invalid_row"  # a line / an element
                yield where, None, RowError(error_kind, f"{where} holds a JSON {kind}, not an object")
                continue
            row, err = self.row(obj, config)
            if surrogates:
                dropped = _drop_surrogates(row, config)
                err = err or dropped
            yield where, row, None if err is None else err.at(where)

    def row(self, obj: dict, config) -> tuple[dict, RowError | None]:  # the pipeline's columns, the row's error
        return obj, None

    id_kinds: tuple = (int, str)  # the JSON types an id may have (openai-batch: custom_id is a string)
    setting_error = staticmethod(str)  # a per-row setting's error message, in the format's own terms

    def _parse(self, raw: bytes, config) -> tuple[pa.Table, dict[int, RowError]]:
        rows, errors, lines = [], {}, []
        for where, row, err in self._objects(raw, config):
            if err is not None:
                errors[len(rows)] = err
            rows.append(row if row is not None else {})
            lines.append(where)
        required = list(dict.fromkeys([config.id_column, config.prompt_column, *config.keep_columns]))
        if not rows:
            return _no_rows(config), errors
        # the id, prompt and kept columns are always there (nulls where absent), so the table has
        # one row per line even when no line is readable; which were absent is noted for inspect()
        names = dict.fromkeys([*required, *SAMPLING_COLUMNS, *TASKS[config.task].input_columns(config)])
        present = {c for c in names if any(c in r for r in rows)}
        ids = [r.get(config.id_column) for r in rows]
        kind = next((type(v) for v in ids if v is not None and type(v) in self.id_kinds), None)
        for i, v in enumerate(ids):
            if v is not None and (type(v) is not kind or (kind is int and not -2**63 <= v < 2**63)):
                errors.setdefault(i, RowError("invalid_id", f"id {v!r:.40} is a {type(v).__name__}; ids must all be "
                                              f"integers (within int64) or all strings ({lines[i]})"))
                ids[i] = None
        columns = {config.id_column: pa.nulls(len(ids)) if kind is None else  # no valid id: the type is open
                   pa.array(ids, pa.int64() if kind is int else pa.string())}
        setting = set(TASKS[config.task].row_columns) - set(config.keep_columns)
        for name in names:
            if name == config.id_column or (name not in present and name not in required):
                continue
            values = [r.get(name) for r in rows]
            if name == config.prompt_column:
                for i, v in enumerate(values):
                    if v is not None and not isinstance(v, str):
                        errors.setdefault(i, RowError("invalid_prompt", f"expected a string, got a "
                                                                        f"{type(v).__name__} ({lines[i]})"))
                        values[i] = None
                columns[name] = pa.array(values, pa.string())
                continue
            for i, v in enumerate(values if name in setting else []):  # each checked as the stage will,
                v, error = checked(name, v, self.setting_error)  # so one odd row cannot make the column text
                if error is not None:
                    errors.setdefault(i, error.at(lines[i]))
                values[i] = json.dumps(v) if name == "json_schema" and v is not None else v
            columns[name] = _column(values) if name in present else pa.nulls(len(rows))
        absent = [c for c in required if c not in present]
        # a needed column absent: the keys the rows have instead, for the message (a few, each short)
        keys = dict.fromkeys(k for r in rows for k in r if k not in columns) if absent else {}
        other = [k if len(k) <= 40 else k[:40] + "..." for k in itertools.islice(keys, OTHER_KEYS)]
        return pa.table(columns).replace_schema_metadata({b"absent": json.dumps(absent),
                                                          b"other": json.dumps(other)}), errors


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the JSON escape of a UTF-16 surrogate


def _lone_surrogate(value) -> str | None:
    """Where a JSON value's first lone surrogate is (half a UTF-16 pair, as JavaScript cuts an emoji), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"U+{ord(value[e.start]):04X} at position {e.start}"
        return None
    parts = [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
    return next(filter(None, map(_lone_surrogate, parts)), None) if isinstance(parts, list) else None


def _drop_surrogates(row: dict, config) -> RowError | None:
    """Clear the values of `row` holding a lone surrogate; the row's error (in the prompt:
    `invalid_prompt`, as for any prompt that is not text), or None."""
    error = None
    for name, value in row.items():
        found = _lone_surrogate(value)
        if found is None:
            continue
        row[name] = None
        if error is None:
            error = (RowError("invalid_prompt", f"lone surrogate {found}") if name == config.prompt_column else
                     RowError("invalid_id", f"the id holds a lone surrogate {found}") if name == config.id_column
                     else RowError("invalid_line", f"column {name!r} holds a lone surrogate {found}, "
                                                   "which is not text"))
    return error


def _json_array(raw: bytes) -> list | None:
    """The elements when the file is one JSON array, else None (JSONL). ValueError for a JSON array
    over several lines that does not parse, or one object over several lines (not JSONL either)."""
    text = raw.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not text.startswith((b"[", b"{")):
        return None
    try:
        json.loads(text.split(b"\n", 1)[0])
        first_parses = True
    except ValueError:
        first_parses = False
    if text.startswith(b"{") and first_parses:
        return None  # JSONL: its first line is an object
    try:
        document = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        if first_parses:
            return None  # JSONL whose first line happens to be an array
        if text.startswith(b"["):
            raise ValueError(f"it starts a JSON array that does not parse ({e}); a .json file holds one JSON "
                             "array of objects, a .jsonl file one object per line") from None
        return None  # JSONL with a bad first line: that line is its row's error
    if isinstance(document, list):
        return document
    lines = text.count(b"\n") + 1
    raise ValueError(f"it holds one JSON object over {lines} lines; give one object per line (JSONL) or a JSON "
                     "array of objects")


class OpenAIBatchInput(JsonlInput):
    """OpenAI Batch API request files (pipeline/openai_batch.py): JSONL whose lines are requests."""

    name, by_extension = "openai-batch", False
    id_kinds = (str,)
    setting_error = staticmethod(openai_batch.request_error)

    def row(self, obj, config):
        return openai_batch.request_row(obj, config.id_column, config.prompt_column)


class CsvInput(_RowsInput):
    name = "csv"
    suffixes = (".csv", ".csv.gz", ".csv.zst", ".csv.bz2")

    def _parse(self, raw: bytes, config) -> tuple[pa.Table, dict[int, RowError]]:
        """Every column as text (ids "001" and "1" are two rows; the stage parses per-row settings).
        A record that does not parse, or whose quote is left open (the lines after it parsed on
        their own, never swallowed), is an error row after the good ones."""
        if not raw.removeprefix(b"\xef\xbb\xbf").lstrip():  # no header either
            return _no_rows(config), {}
        header_end = raw.find(b"\n", len(raw) - len(raw.lstrip(b"\r\n"))) + 1 or len(raw)
        names = pcsv.open_csv(io.BytesIO(raw[:header_end])).schema.names
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise ValueError(f"the header names column(s) {twice} more than once")
        table, rejected = _csv_records(raw, names)
        # a quote left open swallows line breaks: only a file with a value across lines can hold one
        spans_lines = any("\n" in row.text or "\r" in row.text for row in rejected) or any(
            pc.any(pc.match_substring_regex(column, "[\r\n]")).as_py() for column in table.columns)
        open_quotes = _open_quotes(raw) if spans_lines else []
        if open_quotes and open_quotes[0][0] < header_end:
            raise ValueError("the header opens a quoted field that is never closed")
        bad = [(row.number, row.text, None) for row in rejected]  # (record number, text, why), the header is record 1
        if open_quotes:  # each stretch between such records on its own, numbered as in the file
            tables, bad, records, at = [], [], 1, header_end
            for start, end, why in [*open_quotes, (len(raw), len(raw), None)]:
                if raw[at:start].strip():
                    part, rejected = _csv_records(raw[:header_end] + raw[at:start], names)
                    bad += [(records + row.number - 1, row.text, None) for row in rejected]
                    tables.append(part)
                    records += part.num_rows + len(rejected)
                if why is not None:
                    records += 1
                    bad.append((records, raw[start:end].decode("utf-8", "replace").rstrip(),
                                f"(line {_line_of(raw, start)}) {why}"))
                at = end
            table = pa.concat_tables(tables) if tables else table.slice(0, 0)
        if config.id_column in names:  # an empty id cell is a missing id, not the id ""
            ids = table[config.id_column]
            table = table.set_column(names.index(config.id_column), config.id_column,
                                     pa.array([v or None for v in ids.to_pylist()], pa.string()))
        errors = {}
        if bad:  # malformed records: after the good rows, in file order, id null
            n = table.num_rows
            table = pa.concat_tables([table, pa.table({c: pa.nulls(len(bad), pa.string()) for c in names})])
            for k, (number, text, why) in enumerate(sorted(bad, key=lambda b: b[0] or 0)):
                after = "; the lines after it are read as rows of their own" if why else ""
                errors[n + k] = RowError("invalid_row", f"record {number if number is not None else '?'} "
                                         f"{why or 'does not parse as CSV'} ({text[:60]!r}){after}")
        return table, errors


def _csv_records(data: bytes, names: list[str]) -> tuple[pa.Table, list]:
    """CSV text as a table of text columns, and the rows pyarrow could not parse (record number, the
    header being record 1, and text)."""
    rejected: list = []

    def handler(row):
        rejected.append(row)
        return "skip"

    table = pcsv.read_csv(io.BytesIO(data), read_options=pcsv.ReadOptions(use_threads=False),  # numbers in order
                          parse_options=pcsv.ParseOptions(invalid_row_handler=handler, newlines_in_values=True),
                          convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in names},
                                                              strings_can_be_null=False))
    return table, rejected


def _line_of(raw: bytes, at: int) -> int:
    return raw.count(b"\n", 0, at) + 1


def _open_quotes(raw: bytes) -> list[tuple[int, int, str]]:
    """The records whose quoted field is left open: [(start, end, why)], from the record's start to
    the end of the line the quote opened on. Such a quote (a naive export of a text starting with
    `"`) makes a parser read every following line into the field, until a later quote closes it or
    the file ends. Neither is valid CSV (a quoted field must close, and its closing quote end the
    field), so a well-formed file is never flagged. A one-line `"ab"cd` is left to the parser (`abcd`)."""
    found = []
    record = at = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # at: what is before it is seen, outside quotes
    while (p := raw.find(b'"', at)) != -1:
        newline = raw.rfind(b"\n", at, p)
        if newline != -1:
            record = newline + 1
        if p != record and raw[p - 1:p] != b",":  # a quote inside an unquoted field is a character
            at = p + 1
            continue
        q = p + 1
        while (q := raw.find(b'"', q)) != -1 and raw[q + 1:q + 2] == b'"':  # "" is a quote inside the field
            q += 2
        if q != -1 and (raw[q + 1:q + 2] in (b"", b",", b"\r", b"\n") or raw.find(b"\n", p, q) == -1):
            at = q + 1  # closed where a field ends, or on its own line
            continue
        why = ("opens a quoted field that never closes" if q == -1 else
               f"opens a quoted field that closes only at line {_line_of(raw, q)}, mid-field")
        end = raw.find(b"\n", p) + 1 or len(raw)
        found.append((record, end, why))
        record = at = end
    return found


INPUT_FORMATS = {f.name: f for f in (ParquetInput(), JsonlInput(), CsvInput(), OpenAIBatchInput())}
DATA_SUFFIXES = tuple(dict.fromkeys(s for f in INPUT_FORMATS.values() for s in f.suffixes))


def input_format(path: str, forced: str | None = None) -> InputFormat:
    if forced and forced != "auto":
        return INPUT_FORMATS[forced]
    for fmt in INPUT_FORMATS.values():
        if fmt.by_extension and path.lower().endswith(fmt.suffixes):  # FEB.CSV is a CSV file
            return fmt
    return INPUT_FORMATS["parquet"]


def strip_suffix(name: str) -> str:
    """The name without its data-format extension, matched in any case (`MAR.Parquet` -> `MAR`)."""
    for suffix in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- outputs --------------------------------------------------------------------------------------
class OutputFormat:
    """Each format has `read_stats(loc)`: a committed output's stats, or None if it is not complete."""

    name, extension = "", ""
    Writer: type  # Writer(stream, schema): write(table), finish(stats) -> sidecar bytes or None; close() if it has one

    def open(self, stream, schema: pa.Schema, config):
        return self.Writer(stream, schema)

    def sidecar(self, final: Location) -> Location | None:
        return None

    def conform(self, loc: Location, stats: dict, schema: pa.Schema) -> bool:
        """Give a committed output `schema`'s column types where only a column of no type (all null)
        differs; True if rewritten. Formats without types have nothing to do."""
        return False


class _Checksummed:
    """A write-only stream that passes bytes on and hashes them: the checksum kept with the statistics,
    so an output damaged later (zeroed pages, a truncated copy) is recomputed."""

    def __init__(self, stream):
        self.stream, self.sha256, self.size, self.closed = stream, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        self.stream.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:  # the runner closes the real stream once the file is complete
        self.closed = True


WHOLE_READ_BYTES = 4 << 20  # an output up to this size is read in one call, footer and data at once


def _damaged(loc: Location, stats: dict, end: int, data: bytes | None = None) -> bool:
    """Whether a committed output's data (its first `end` bytes; `data`: the file's bytes if read)
    no longer has the checksum written with it (or has none)."""
    def _sha256(f):  # read in 16 MiB pieces
        h = hashlib.sha256()
        for at in range(0, end, 16 << 20):
            h.update(f.read_at(min(16 << 20, end - at), at))
        return h.hexdigest()

    got = hashlib.sha256(memoryview(data)[:end]).hexdigest() if data is not None else read_file(loc, _sha256)
    if got == stats.get("data_sha256"):
        return False
    log.warning("output %s is damaged (its data does not match the checksum written with it); it will be "
                "recomputed", loc.uri)
    return True


class ParquetOutput(OutputFormat):
    name, extension = "parquet", ".parquet"

    class Writer(pq.ParquetWriter):  # its write(table) and close() as they are
        def __init__(self, stream, schema):
            self.sink = _Checksummed(stream)
            super().__init__(self.sink, schema)

        def finish(self, stats: dict) -> bytes | None:
            # every row group is written by now: the footer, written on close, comes after the data
            self.add_key_value_metadata({STATS_KEY: json.dumps({**stats, "data_sha256": self.sink.sha256.hexdigest()})})
            self.close()
            return None

    def read_stats(self, loc: Location) -> dict | None:
        """The footer's statistics, if the footer counts their rows and the data has their checksum:
        the whole file is read once, undecoded, a cost small beside the compute it stands for."""
        def _open(f):
            size = f.size()
            if size > WHOLE_READ_BYTES:
                return pq.ParquetFile(f).metadata, size, None
            data = f.read_at(size, 0)
            return pq.ParquetFile(pa.BufferReader(data)).metadata, size, data

        meta, size, data = read_file(loc, _open, "read footer of")
        raw = (meta.metadata or {}).get(STATS_KEY)
        stats = json.loads(raw) if raw else None
        data_end = size - 8 - meta.serialized_size  # the footer, its length and "PAR1" follow the data
        if stats is None or stats.get("rows_out") != meta.num_rows or _damaged(loc, stats, data_end, data):
            return None
        schema = meta.schema.to_arrow_schema()
        stats["_file_types"] = {f.name: f.type for f in schema}  # types, not their text: a list reads back
        # from Parquet with its item named "element", equal as a type but not as a string
        return stats

    def conform(self, loc: Location, stats: dict, schema: pa.Schema) -> bool:
        """A kept column no row of an input had is written with no type (null); once a later input gives
        it values the directory no longer reads as one dataset ("Unsupported cast from string to
        null"), so the output is rewritten typed, its rows and statistics as they were."""
        types = stats.get("_file_types") or {}
        differ = [f.name for f in schema if types.get(f.name) != f.type]
        if not differ or any(types.get(name) is None or not pa.types.is_null(types[name]) for name in differ):
            return False  # the same types, or differences the resume checks judge
        table = read_file(loc, pq.read_table).cast(schema)
        footer = {k: v for k, v in stats.items() if not k.startswith("_") and k != "data_sha256"}
        tmp = temp_sibling(loc)
        ensure_dir(tmp.parent)
        with loc.fs.open_output_stream(tmp.path) as stream:
            writer = self.Writer(stream, schema)
            writer.write(table)
            writer.finish(footer)
        commit(tmp, loc)
        log.info("typed column(s) %s of %s as later inputs give them", differ, loc.uri)
        return True


class JsonlOutput(OutputFormat):
    name, extension = "jsonl", ".jsonl"

    class Writer:
        def __init__(self, stream, schema, line=None):
            self.sink, self.schema = _Checksummed(stream), schema
            self.line = line or (lambda row: row)  # output row -> the JSON object written

        def write(self, table: pa.Table) -> None:
            self.sink.write("".join(json.dumps(_finite(self.line(row)), ensure_ascii=False, default=_json_default,
                                               allow_nan=False) + "\n" for row in table.to_pylist()).encode())

        def finish(self, stats: dict) -> bytes:
            return json.dumps({**stats, "data_bytes": self.sink.size, "data_sha256": self.sink.sha256.hexdigest(),
                               "columns": self.schema.names}).encode()

    def sidecar(self, final: Location) -> Location:
        return final.parent.join("_stats", final.path.rsplit("/", 1)[-1] + ".json")

    def read_stats(self, loc: Location) -> dict | None:
        """The sidecar's statistics, if it names the data file's exact size and checksum."""
        side = self.sidecar(loc)
        try:
            stats = json.loads(read_bytes(side))
            size = loc.fs.get_file_info(loc.path).size
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(stats, dict) or stats.get("data_bytes") != size or _damaged(loc, stats, size):
            return None  # the data file is not the one the sidecar describes
        return stats


class OpenAIBatchOutput(JsonlOutput):
    """OpenAI Batch API output lines (pipeline/openai_batch.py), committed as JSONL is."""

    name = "openai-batch"

    def open(self, stream, schema, config):
        model, created = model_name(config.model), int(time.time())
        return self.Writer(stream, schema,
                           lambda row: openai_batch.response_line(row, config.id_column, model, created))


def model_name(model: str) -> str:
    """How answers name the model: a hub id as given, else the checkpoint directory's name."""
    text = str(model).rstrip("/")
    local = os.path.exists(os.path.expanduser(text))
    return text.rsplit("/", 1)[-1] if "://" in text or local else text


BYTES_MARKER = "base64:"  # how JSON output writes a binary value (JSON has no bytes)


def _json_default(value):
    """Bytes (a Parquet `binary` id or kept column) losslessly as "base64:...", so distinct ids stay
    distinct; anything else JSON has no type for as its text."""
    if isinstance(value, (bytes, bytearray)):
        return BYTES_MARKER + base64.b64encode(value).decode("ascii")
    return str(value)


def _finite(value):
    """NaN and infinities as null: JSON has none, and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


OUTPUT_FORMATS = {f.name: f for f in (ParquetOutput(), JsonlOutput(), OpenAIBatchOutput())}
