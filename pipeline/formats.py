"""File formats, one class each: how an input file is checked, split into units and read, and
how an output file is written and recognised as committed.

Inputs (by extension in any case, or `--input-format`):
- Parquet (`.parquet`): read column-wise; units are row groups (`--rows-per-unit`).
- JSONL (`.jsonl`, `.json` with one object per line, also `.gz` / `.zst` compressed): read line
  by line, because pyarrow's JSON reader rejects a whole block for one bad line. A line that is
  not a JSON object becomes a row with `error` = `invalid_line: line N ...` (id null); empty
  lines are not rows; a lone surrogate (`"\\ud83d"`) is its row's error. A file that is one JSON
  array is read as rows, one per element. Ids keep their JSON type (the first row's decides;
  another type is that row's `invalid_id` error).
- CSV (`.csv`, also compressed): pyarrow's reader with an `invalid_row_handler`; a malformed row
  becomes a row with `error` = `invalid_row: record N ...` after the good rows of its unit, and
  so does a record whose quote is left open (`_open_quotes`), the lines after it read as rows.
JSONL and CSV units are row ranges. Their content hash (sha256 of the file's bytes) is part of
each unit's fingerprint, so any edit is seen; Parquet's is its footer and id column
(`ParquetInput._digest`).

Outputs (`--output-format`):
- Parquet (default): the unit's statistics and the sha256 of the data live in the file's footer.
- JSONL: one JSON object per row, bytes as "base64:..."; the statistics live in a sidecar
  `_stats/<name>.json` committed just after the data file, and a file counts as committed only
  when the sidecar names its exact size and sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
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


def _missing(config, names) -> list[str]:
    return [c for c in (config.id_column, config.prompt_column, *config.keep_columns) if c not in names]


def _no_rows(config) -> pa.Table:
    """An empty file's table: the id, prompt and kept columns, of no type yet, and 0 rows."""
    return pa.table({c: pa.nulls(0) for c in (config.id_column, config.prompt_column, *config.keep_columns)})


class InputFormat:
    """Each format has `inspect(loc, config) -> Inspected`; `read_ids(loc, config)`: every row's id
    (null if none), in order, in Arrow arrays of at most `ID_CHUNK_ROWS`; `batches(loc, split,
    config, columns)`: the unit's rows as tables of `columns` (those the file has), each with
    {row: read error}."""

    name = ""
    suffixes: tuple[str, ...] = ()
    by_extension = True  # chosen for these suffixes under --input-format auto

    def split_name(self, stem: str, split: Split, n_splits: int) -> str:
        if n_splits == 1:
            return stem
        if split.row_groups is not None:
            return f"{stem}.rg{split.row_groups[0]:05d}-{split.row_groups[-1]:05d}"
        return f"{stem}.rows{split.first_row:09d}-{split.first_row + split.num_rows - 1:09d}"


class ParquetInput(InputFormat):
    name, suffixes = "parquet", (".parquet",)

    def inspect(self, loc: Location, config) -> Inspected:
        try:
            meta = read_file(loc, lambda f: pq.ParquetFile(f).metadata, "read footer of")
            digest = self._digest(loc, meta, config)
        except FileNotFoundError:
            return Inspected(problem="file vanished")
        except Exception as e:  # noqa: BLE001 - truncated / not Parquet / storage error
            return Inspected(problem=f"unreadable Parquet ({type(e).__name__}: {e})")
        schema = meta.schema.to_arrow_schema()
        found = Inspected(num_rows=meta.num_rows, schema=schema, digest=digest)
        missing = _missing(config, schema.names)
        if missing:
            found.problem = f"missing column(s) {missing}; it has {schema.names}"
        elif meta.num_rows == 0:
            found.problem = "empty (0 rows)"
        else:
            found.splits = self._splits(meta, config.rows_per_unit)
        return found

    def _digest(self, loc: Location, meta, config) -> str:
        """A cheap content hash: the footer (schema, row groups, each chunk's statistics, sizes and
        offsets) and the stored bytes of the id column. Statistics ignore row order, so the ids
        catch a same-size reordering with its mtime kept (cp -p); the duplicate-id check reads
        them anyway. Not seen: other columns changed at the same compressed sizes and statistics."""
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
        """The id column, a row group at a time (each read retried on its own)."""
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
    """Formats read whole into rows on each use (JSONL, CSV): one parse (`_parse(raw, config)` ->
    (table, {row: error})), cached per file."""

    _cache: dict = {}

    def _load(self, loc: Location, config) -> tuple[pa.Table, dict[int, RowError], str]:
        """(table of the file's rows, {row: error} for rows that could not be read, sha256)."""
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

    def inspect(self, loc: Location, config) -> Inspected:
        try:
            table, errors, digest = self._load(loc, config)
        except FileNotFoundError:
            return Inspected(problem="file vanished")
        except Exception as e:  # noqa: BLE001 - undecodable, not the format at all
            return Inspected(problem=f"unreadable {self.name} ({type(e).__name__}: {e})")
        found = Inspected(num_rows=table.num_rows, schema=table.schema, digest=digest)
        absent = set(json.loads((table.schema.metadata or {}).get(b"absent", b"[]")))
        names = [n for n in table.schema.names if n not in absent]
        missing = _missing(config, names) if table.num_rows > len(errors) else []
        if missing:
            found.problem = f"no row has column(s) {missing}; they have {names}"
        elif table.num_rows == 0:
            found.problem = "empty (0 rows)"
        else:
            n, step = table.num_rows, config.rows_per_unit
            step = step if 0 < step < n else n
            found.splits = [Split(None, a, min(step, n - a)) for a in range(0, n, step)]
        return found

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
        """(where, JSON value, error) for each non-empty line, or each element of a file that is one
        JSON array. Lines are split on b"\\n" only (JSON strings may hold U+2028) and decoded one
        by one, so a line that is not UTF-8 is that row's error, not the file's."""
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
        """(where, row or None, error) for each record; one that is not a JSON object, or holds a
        lone surrogate, is that row's error."""
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

    def row(self, obj: dict, config) -> tuple[dict, RowError | None]:
        """The pipeline's columns of one JSON object, and the row's error."""
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
            if name in TASKS[config.task].row_columns and name not in config.keep_columns:
                values = self._settings(name, values, errors, lines)
            columns[name] = _column(values) if name in present else pa.nulls(len(rows))
        absent = [c for c in required if c not in present]
        return pa.table(columns).replace_schema_metadata({b"absent": json.dumps(absent)}), errors

    def _settings(self, name: str, values: list, errors: dict[int, RowError], lines: list[str]) -> list:
        """A per-row setting column in one type, each value checked as the stage will: one odd row
        must not turn the whole column into text."""
        out = []
        for i, v in enumerate(values):
            v, error = checked(name, v, self.setting_error)
            if error is not None:
                errors.setdefault(i, error.at(lines[i]))
            out.append(json.dumps(v) if name == "json_schema" and v is not None else v)
        return out


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the JSON escape of a UTF-16 surrogate


def _lone_surrogate(value) -> str | None:
    """Where the first lone surrogate of a JSON value is (half of a UTF-16 pair, as JavaScript
    writes a string cut mid-emoji; no UTF-8 text can hold it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"U+{ord(value[e.start]):04X} at position {e.start}"
        return None
    parts = [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
    return next(filter(None, map(_lone_surrogate, parts)), None) if isinstance(parts, list) else None


def _drop_surrogates(row: dict, config) -> RowError | None:
    """Clear the values of `row` that hold a lone surrogate; the row's error, or None if none
    did. In the prompt it is the row's `invalid_prompt` (as for any prompt that is not text)."""
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
    """The elements when the whole file is one JSON array (a ".json export"), else None (JSONL).
    A file that starts a JSON array over several lines but does not parse, or that holds one
    JSON object spread over several lines, is not JSONL either: ValueError says so."""
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
        """Every column as text (CSV has no types: ids "001" and "1" are two rows; per-row settings
        are parsed by the stage). A record that does not parse is an error row after the good
        ones; so is one whose quote is left open (`_open_quotes`), the lines after it parsed on
        their own so that it never swallows its neighbours."""
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
    """The records of CSV text as a table of text columns, and pyarrow's rows it could not
    parse (each with its record number, the header being record 1, and its text)."""
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
    """The records of a CSV text whose quoted field is left open: [(start, end, why)], from the
    record's start to the end of the line the quote opened on.

    A quote left open (a naive export of a text starting with `"`) makes a parser read every
    following line into that field, until a later quote closes it or the file ends. Neither is
    valid CSV (a quoted field may span lines, but must close, and its closing quote must end the
    field), so neither flags a well-formed file. A one-line `"ab"cd` is left to the parser (`abcd`)."""
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
    """Each format has `read_stats(loc)`: the stats of a committed output, or None if it is not a
    complete one."""

    name, extension = "", ""
    Writer: type  # Writer(stream, schema): write(table), finish(stats) -> sidecar bytes or None; close() if it has one

    def open(self, stream, schema: pa.Schema, config):
        return self.Writer(stream, schema)

    def sidecar(self, final: Location) -> Location | None:
        return None

    def conform(self, loc: Location, stats: dict, schema: pa.Schema) -> bool:
        """Make a committed output's column types those of `schema`, if only a column of no type
        (all null) differs; True if it was rewritten. Formats without types have nothing to do."""
        return False


class _Checksummed:
    """A write-only stream that passes bytes on and hashes them: the data's checksum, kept with its
    statistics, so an output damaged later (zeroed pages, a truncated copy) is recomputed."""

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
    """Whether a committed output's first `end` bytes (its data) no longer have the checksum
    written with them (or have none); `data`: the file's bytes when already read."""
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
        """The footer's statistics, if the footer counts the rows they say and the data before it
        has the checksum written with them: the whole file is read once, undecoded (a small one
        with its footer), a cost small beside the compute it stands for."""
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
        """A kept column no row of an input had is written with no type (null); once a later input
        gives it values the directory no longer reads as one dataset ("Unsupported cast from
        string to null"), so the output is rewritten typed, its rows and statistics as they were."""
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
    """JSON for what JSON has no type for: bytes (a Parquet `binary` id or kept column) losslessly
    as `"base64:" + base64(value)`, so distinct ids stay distinct; anything else as its text."""
    if isinstance(value, (bytes, bytearray)):
        return BYTES_MARKER + base64.b64encode(value).decode("ascii")
    return str(value)


def _finite(value):
    """NaN and infinities as null: JSON has no such numbers, and strict readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


OUTPUT_FORMATS = {f.name: f for f in (ParquetOutput(), JsonlOutput(), OpenAIBatchOutput())}
