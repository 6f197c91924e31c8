"""File formats, one class each: how an input file is checked, split into units and read, and
how an output file is written and recognised as committed.

Inputs (by extension, or `--input-format`):
- Parquet (`.parquet`): read column-wise; units are row groups (`--rows-per-unit`).
- JSONL (`.jsonl`, `.json` with one object per line, also `.gz` / `.zst` compressed): read line
  by line, because pyarrow's JSON reader rejects a whole block for one bad line. A line that is
  not a JSON object becomes a row with `error` = `invalid_line: line N ...` (id null); empty
  lines are not rows. Ids keep their JSON type (the first row's decides; another type is that
  row's `invalid_id` error).
- CSV (`.csv`, also compressed): pyarrow's reader with an `invalid_row_handler`; a malformed row
  becomes a row with `error` = `invalid_row: line N ...` after the good rows of its unit.
JSONL and CSV units are row ranges. Their content hash (sha256 of the file's bytes) is part of
each unit's fingerprint, so any edit is seen.

Outputs (`--output-format`):
- Parquet (default): the unit's statistics live in the file's footer.
- JSONL: one JSON object per row; the statistics live in a sidecar `_stats/<name>.json`
  committed just after the data file, and a file counts as committed only when the sidecar
  names its exact size.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import openai_batch
from .row_settings import SAMPLING_COLUMNS, SettingError, coerce
from .storage import Location, read_bytes, retry

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


def _compression(path: str) -> str | None:
    return {"gz": "gzip", "zst": "zstd", "bz2": "bz2"}.get(path.rsplit(".", 1)[-1])


def _open_text(loc: Location) -> bytes:
    """The file's bytes, decompressed when its name says so."""
    raw = read_bytes(loc)
    codec = _compression(loc.path)
    if codec is None:
        return raw
    with pa.CompressedInputStream(pa.BufferReader(raw), codec) as f:
        return f.read()


def _row_splits(num_rows: int, rows_per_unit: int) -> list[Split]:
    if rows_per_unit <= 0 or num_rows <= rows_per_unit:
        return [Split(None, 0, num_rows)]
    return [Split(None, a, min(rows_per_unit, num_rows - a)) for a in range(0, num_rows, rows_per_unit)]


def _missing(config, names) -> list[str]:
    return [c for c in (config.id_column, config.prompt_column, *config.keep_columns) if c not in names]


class InputFormat:
    name = ""
    suffixes: tuple[str, ...] = ()
    by_extension = True  # chosen for these suffixes under --input-format auto

    def inspect(self, loc: Location, config) -> Inspected:
        raise NotImplementedError

    def read_ids(self, loc: Location, config) -> Iterator[pa.Array]:
        """The id of every row, in order, as Arrow arrays of at most `ID_CHUNK_ROWS` rows (null
        where a row has none): a large file's ids are never all in memory as Python objects."""
        raise NotImplementedError

    def batches(self, loc: Location, split: Split, config, columns: list[str]) -> Iterator[tuple[pa.Table, dict]]:
        """The unit's rows as tables of `columns` (those the file has), each with the errors of
        rows that could not be read ({row in table: error})."""
        raise NotImplementedError

    def split_name(self, stem: str, split: Split, n_splits: int) -> str:
        if n_splits == 1:
            return stem
        if split.row_groups is not None:
            return f"{stem}.rg{split.row_groups[0]:05d}-{split.row_groups[-1]:05d}"
        return f"{stem}.rows{split.first_row:09d}-{split.first_row + split.num_rows - 1:09d}"


class ParquetInput(InputFormat):
    name, suffixes = "parquet", (".parquet",)

    def _meta(self, loc: Location):
        def _open():
            with loc.fs.open_input_file(loc.path) as f:
                return pq.ParquetFile(f).metadata
        return retry(_open, f"read footer of {loc.uri}", loc.retries)

    def inspect(self, loc: Location, config) -> Inspected:
        try:
            meta = self._meta(loc)
        except FileNotFoundError:
            return Inspected(problem="file vanished")
        except Exception as e:  # noqa: BLE001 - truncated / not Parquet / storage error
            return Inspected(problem=f"unreadable Parquet ({type(e).__name__}: {e})")
        schema = meta.schema.to_arrow_schema()
        footer = json.dumps(meta.to_dict(), sort_keys=True, default=str).encode()
        found = Inspected(num_rows=meta.num_rows, schema=schema, digest=hashlib.sha256(footer).hexdigest()[:32])
        missing = _missing(config, schema.names)
        if missing:
            found.problem = f"missing column(s) {missing}; it has {schema.names}"
        elif meta.num_rows == 0:
            found.problem = "empty (0 rows)"
        else:
            found.splits = self._splits(meta, config.rows_per_unit)
        return found

    @staticmethod
    def _splits(meta, rows_per_unit: int) -> list[Split]:
        groups = list(range(meta.num_row_groups))
        chunks, cur, n = [], [], 0
        for g in groups:
            rows = meta.row_group(g).num_rows
            if cur and rows_per_unit > 0 and n + rows > rows_per_unit:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(g)
            n += rows
        chunks.append(cur)
        out, first = [], 0
        for gs in chunks:
            rows = sum(meta.row_group(g).num_rows for g in gs)
            out.append(Split(gs, first, rows))
            first += rows
        return out

    def read_ids(self, loc: Location, config) -> Iterator[pa.Array]:
        """The id column, a row group at a time (each read retried on its own)."""
        what = f"read ids of {loc.uri}"
        f = retry(lambda: loc.fs.open_input_file(loc.path), what, loc.retries)
        with f:
            reader = retry(lambda: pq.ParquetFile(f), what, loc.retries)
            for g in range(reader.metadata.num_row_groups):
                ids = retry(lambda g=g: reader.read_row_group(g, columns=[config.id_column], use_threads=False),
                            what, loc.retries)
                for start in range(0, ids.num_rows, ID_CHUNK_ROWS):
                    yield ids.column(0).slice(start, ID_CHUNK_ROWS).combine_chunks()

    def batches(self, loc, split, config, columns):
        f = loc.fs.open_input_file(loc.path)
        try:
            reader = pq.ParquetFile(f)
            present = set(reader.schema_arrow.names)
            columns = [c for c in columns if c in present]
            for rb in reader.iter_batches(batch_size=config.batch_size, row_groups=split.row_groups, columns=columns):
                yield pa.Table.from_batches([rb]), {}
        finally:
            f.close()


class _RowsInput(InputFormat):
    """Formats read whole into rows on each use (JSONL, CSV): one parse, cached per file."""

    _cache: dict = {}

    def _load(self, loc: Location, config) -> tuple[pa.Table, dict[int, str], str]:
        """(table of the file's rows, {row: error} for rows that could not be read, sha256)."""
        key = (loc.uri, config.task, config.id_column, config.prompt_column, tuple(config.keep_columns))
        hit = self._cache.get(key)
        raw = _open_text(loc)
        digest = hashlib.sha256(raw).hexdigest()[:32]
        if hit is not None and hit[2] == digest:
            return hit
        table, errors = self._parse(raw, config)
        self._cache.clear()  # one file at a time: replicas read their units in turn
        self._cache[key] = (table, errors, digest)
        return table, errors, digest

    def _parse(self, raw: bytes, config) -> tuple[pa.Table, dict[int, str]]:
        raise NotImplementedError

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
            found.splits = _row_splits(table.num_rows, config.rows_per_unit)
        return found

    def read_ids(self, loc: Location, config) -> Iterator[pa.Array]:
        ids = self._load(loc, config)[0].column(config.id_column)
        for start in range(0, len(ids), ID_CHUNK_ROWS):
            yield ids.slice(start, ID_CHUNK_ROWS).combine_chunks()

    def batches(self, loc, split, config, columns):
        table, errors, _ = self._load(loc, config)
        step = config.batch_size
        for a in range(split.first_row, split.first_row + split.num_rows, step):
            b = min(a + step, split.first_row + split.num_rows)
            part = table.slice(a, b - a).select([c for c in columns if c in table.schema.names])
            yield part, {i - a: errors[i] for i in range(a, b) if i in errors}


def _column(values: list, name: str) -> pa.Array:
    """An Arrow column from JSON values. Objects and arrays are kept as their JSON text (so files
    whose objects have other keys still share a schema); mixed types fall back to JSON text for
    the values that are not strings, and strings stay as they are."""
    if any(isinstance(v, (dict, list)) for v in values):
        values = [json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


class JsonlInput(_RowsInput):
    name = "jsonl"
    suffixes = tuple(base + codec for base in (".jsonl", ".ndjson", ".json") for codec in ("", ".gz", ".zst", ".bz2"))

    def _objects(self, raw: bytes, config) -> Iterator[tuple[int, dict | None, str | None]]:
        """(line number, row or None, error) for each non-empty line. Lines are split on
        newline bytes only (JSON strings may hold U+2028 and friends) and decoded one by one, so
        a line that is not UTF-8 is that row's error, not the file's."""
        for n, chunk in enumerate(raw.split(b"\n"), 1):
            try:
                line = chunk.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"invalid_line: line {n} is not UTF-8 (byte 0x{chunk[e.start]:02x} at column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"invalid_line: line {n} is not JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(obj, dict):
                kind = {type(None): "null", bool: "boolean", list: "array", str: "string"}.get(type(obj), "number")
                yield n, None, f"invalid_line: line {n} holds a JSON {kind}, not an object"
                continue
            row, err = self.row(obj, config)
            yield n, row, None if err is None else f"{err} (line {n})"

    def row(self, obj: dict, config) -> tuple[dict, str | None]:
        """The pipeline's columns of one JSON object and the row's error (formats built on
        JSONL override this)."""
        return obj, None

    id_kinds: tuple = (int, str)  # the JSON types an id may have (openai-batch: custom_id is a string)

    def _parse(self, raw: bytes, config) -> tuple[pa.Table, dict[int, str]]:
        rows, errors, lines = [], {}, []
        for n, row, err in self._objects(raw, config):
            if err is not None:
                errors[len(rows)] = err
            rows.append(row if row is not None else {})
            lines.append(n)
        required = [config.id_column, config.prompt_column, *config.keep_columns]
        wanted = [c for c in dict.fromkeys([*required, *SAMPLING_COLUMNS]) if any(c in r for r in rows)]
        if not rows:
            return pa.table({c: pa.array([], pa.string()) for c in wanted}), errors
        # the id, prompt and kept columns are always there (nulls where absent), so the table has
        # one row per line even when no line is readable; which were absent is noted for inspect()
        present = set(wanted)
        ids = [r.get(config.id_column) for r in rows]
        kind = next((type(v) for v in ids if v is not None and type(v) in self.id_kinds), None)
        for i, v in enumerate(ids):
            bad = v is not None and (type(v) is not kind or (kind is int and not -2**63 <= v < 2**63))
            if bad:
                errors.setdefault(i, f"invalid_id: id {v!r:.40} is a {type(v).__name__}; ids must all be integers "
                                     f"(within int64) or all strings (line {lines[i]})")
                ids[i] = None
        columns = {config.id_column: pa.nulls(len(ids)) if kind is None else  # no valid id: the type is open
                   pa.array(ids, pa.int64() if kind is int else pa.string())}
        for name in dict.fromkeys([*required, *wanted]):
            if name == config.id_column:
                continue
            values = [r.get(name) for r in rows]
            if name == config.prompt_column:
                for i, v in enumerate(values):
                    if v is not None and not isinstance(v, str):
                        errors.setdefault(i, f"invalid_prompt: expected a string, got a {type(v).__name__} "
                                             f"(line {lines[i]})")
                        values[i] = None
                columns[name] = pa.array(values, pa.string())
                continue
            if config.task == "generate" and name in SAMPLING_COLUMNS and name not in (
                    config.prompt_column, *config.keep_columns):
                values = self._settings(name, values, errors, lines)
            columns[name] = _column(values, name) if name in present else pa.nulls(len(rows))
        absent = [c for c in required if c not in present]
        return pa.table(columns).replace_schema_metadata({b"absent": json.dumps(absent)}), errors

    def _setting_error(self, message: str) -> str:
        return message

    def _settings(self, name: str, values: list, errors: dict[int, str], lines: list[int]) -> list:
        """A per-row setting column in one type: each value checked as the stage will (JSON rows
        may mix types, and one odd row must not turn the whole column into text)."""
        out = []
        for i, v in enumerate(values):
            try:
                v = coerce(name, v)
            except SettingError as e:
                errors.setdefault(i, f"invalid_sampling: {self._setting_error(str(e))} (line {lines[i]})")
                v = None
            out.append(json.dumps(v) if name == "json_schema" and v is not None else v)
        return out


class OpenAIBatchInput(JsonlInput):
    """OpenAI Batch API request files (pipeline/openai_batch.py): JSONL whose lines are requests."""

    name, by_extension = "openai-batch", False
    id_kinds = (str,)

    def row(self, obj, config):
        return openai_batch.request_row(obj, config.id_column, config.prompt_column)

    def _setting_error(self, message: str) -> str:
        return openai_batch.request_error(message)


class CsvInput(_RowsInput):
    name = "csv"
    suffixes = (".csv", ".csv.gz", ".csv.zst", ".csv.bz2")

    def _parse(self, raw: bytes, config) -> tuple[pa.Table, dict[int, str]]:
        import pyarrow.csv as pcsv

        bad: list[tuple[int | None, str]] = []

        def handler(row):
            bad.append((row.number, row.text))
            return "skip"

        # CSV has no types: ids stay text ("001" and "1" are different rows), as do prompts, kept
        # columns and per-row settings (parsed per row by the stage)
        strings = {c: pa.string() for c in (config.id_column, config.prompt_column, *config.keep_columns,
                                            *SAMPLING_COLUMNS)}
        table = pcsv.read_csv(io.BytesIO(raw), read_options=pcsv.ReadOptions(use_threads=False),  # line numbers
                              parse_options=pcsv.ParseOptions(invalid_row_handler=handler, newlines_in_values=True),
                              convert_options=pcsv.ConvertOptions(column_types=strings, strings_can_be_null=False))
        names = table.schema.names
        twice = sorted({c for c in names if names.count(c) > 1})
        if twice:
            raise ValueError(f"the header names column(s) {twice} more than once")
        if config.id_column in names:  # an empty id cell is a missing id, not the id ""
            ids = table[config.id_column]
            table = table.set_column(names.index(config.id_column), config.id_column,
                                     pa.array([v or None for v in ids.to_pylist()], pa.string()))
        errors = {}
        if bad:  # malformed rows: after the good ones, id null, the line in the error
            n = table.num_rows
            empty = pa.table({name: pa.nulls(len(bad), table.schema.field(name).type) for name in table.schema.names})
            table = pa.concat_tables([table, empty])
            for k, (line, text) in enumerate(bad):
                errors[n + k] = (f"invalid_row: record {line if line is not None else '?'} does not parse as CSV "
                                 f"({text[:60]!r})")
        return table, errors


INPUT_FORMATS = {f.name: f for f in (ParquetInput(), JsonlInput(), CsvInput(), OpenAIBatchInput())}
DATA_SUFFIXES = tuple(dict.fromkeys(s for f in INPUT_FORMATS.values() for s in f.suffixes))


def input_format(path: str, forced: str | None = None) -> InputFormat:
    if forced and forced != "auto":
        return INPUT_FORMATS[forced]
    for fmt in INPUT_FORMATS.values():
        if fmt.by_extension and path.endswith(fmt.suffixes):
            return fmt
    return INPUT_FORMATS["parquet"]


def strip_suffix(name: str) -> str:
    for suffix in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---- outputs --------------------------------------------------------------------------------------
class OutputFormat:
    name, extension = "", ""

    def open(self, stream, schema: pa.Schema, config):
        raise NotImplementedError

    def read_stats(self, loc: Location) -> dict | None:
        """The stats of a committed output, or None if it is not a complete one."""
        raise NotImplementedError

    def sidecar(self, final: Location) -> Location | None:
        return None


class ParquetOutput(OutputFormat):
    name, extension = "parquet", ".parquet"

    class Writer:
        def __init__(self, stream, schema):
            self.writer = pq.ParquetWriter(stream, schema)

        def write(self, table: pa.Table) -> None:
            self.writer.write_table(table)

        def finish(self, stats: dict) -> bytes | None:
            self.writer.add_key_value_metadata({STATS_KEY: json.dumps(stats)})
            self.writer.close()
            return None

        def close(self) -> None:
            self.writer.close()

    def open(self, stream, schema, config):
        return self.Writer(stream, schema)

    def read_stats(self, loc: Location) -> dict | None:
        def _open():
            with loc.fs.open_input_file(loc.path) as f:
                return pq.ParquetFile(f).metadata

        meta = retry(_open, f"read footer of {loc.uri}", loc.retries)
        raw = (meta.metadata or {}).get(STATS_KEY)
        stats = json.loads(raw) if raw else None
        if stats is None or stats.get("rows_out") != meta.num_rows:
            return None
        stats["_file_columns"] = meta.schema.to_arrow_schema().names  # read here, never stored
        return stats


class JsonlOutput(OutputFormat):
    name, extension = "jsonl", ".jsonl"

    class Writer:
        def __init__(self, stream, schema, line=None):
            self.stream, self.schema, self.size = stream, schema, 0
            self.line = line or (lambda row: row)  # output row -> the JSON object written

        def write(self, table: pa.Table) -> None:
            data = "".join(json.dumps(_finite(self.line(row)), ensure_ascii=False, default=_json_default,
                                      allow_nan=False) + "\n" for row in table.to_pylist()).encode()
            self.stream.write(data)
            self.size += len(data)

        def finish(self, stats: dict) -> bytes:
            return json.dumps({**stats, "data_bytes": self.size, "columns": self.schema.names}).encode()

        def close(self) -> None:
            pass

    def open(self, stream, schema, config):
        return self.Writer(stream, schema)

    def sidecar(self, final: Location) -> Location:
        return final.parent.join("_stats", final.path.rsplit("/", 1)[-1] + ".json")

    def read_stats(self, loc: Location) -> dict | None:
        side = self.sidecar(loc)
        try:
            stats = json.loads(read_bytes(side))
            size = loc.fs.get_file_info(loc.path).size
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(stats, dict) or stats.get("data_bytes") != size:
            return None  # the data file is not the one the sidecar describes
        stats["_file_columns"] = stats.get("columns")
        return stats


class OpenAIBatchOutput(JsonlOutput):
    """OpenAI Batch API output lines (pipeline/openai_batch.py), committed as JSONL is."""

    name = "openai-batch"

    def open(self, stream, schema, config):
        import time

        model, created = model_name(config.model), int(time.time())
        return self.Writer(stream, schema,
                           lambda row: openai_batch.response_line(row, config.id_column, model, created))


def model_name(model: str) -> str:
    """How answers name the model: a hub id as given, else the checkpoint directory's name."""
    import os

    text = str(model).rstrip("/")
    local = os.path.exists(os.path.expanduser(text))
    return text.rsplit("/", 1)[-1] if "://" in text or local else text


def _json_default(value):
    if isinstance(value, bytes):  # distinct bytes stay distinct: undecodable ones as \xNN
        return value.decode("utf-8", errors="backslashreplace")
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
