"""The duplicate-id check of the plan: rows whose id appeared earlier in input order, or is null.

Input order is the files sorted by URI, rows in file order; an id's first occurrence runs, every
later one gets error_kind duplicate_id ("id 'x' already appeared at part-00003.parquet row 17"),
a null (or NaN) id `invalid_id`. Ids compare exactly, as their Python values: bytes with trailing
NULs are distinct, integers beyond int64 are themselves, `001` and `1` in a CSV are two ids,
0.0 and -0.0 one.

Driver memory follows the files and the flagged rows, not the rows (only flagged ids become
Python objects): one pass reads each file's ids (a row group at a time), hashes them (numpy) and
adds (id, place in input order) to one of P hash partitions (in memory when P is 1, else an
Arrow IPC file each); each partition is then sorted by id: in a run of equal ids the smallest
place is the first occurrence. P: about `PARTITION_ROWS` ids a partition, `MAX_PARTITIONS` at most.
"""

from __future__ import annotations

import bisect
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, RowError
from .settings import PipelineConfig
from .formats import input_format
from .stages import column_values  # a string id holding invalid UTF-8: as bytes

PARTITION_ROWS = 1 << 20
MAX_PARTITIONS = 256                # spill files open at once
FLUSH_ROWS = 1 << 16                # most ids a partition gathers in memory before they go to its file
HASH_BYTES = 1 << 17                # id bytes hashed at a time: ~32 bytes of temporaries per byte, in each
                                    # of up to 16 reader threads (1 MiB took 32+ MiB each; 128 KiB is as fast)
NULL_ID = RowError("invalid_id", "the id is null, so the row cannot be matched to its result")


class InputChanged(ValueError):
    """A file whose row count differs from the one counted when it was listed."""


def flag_ids(config: PipelineConfig, files: list, threads: int = 16, partition_rows: int | None = None) -> dict:
    """Null ids and ids seen earlier in `files` ([(Location, name, units)] in input order) into the
    units' `row_errors`; returns the run report's id summary."""
    summary = {"checked": True, "duplicate_rows": 0, "duplicate_ids": 0, "null_ids": 0, "examples": []}
    if not files:
        return summary
    sizes = [sum(u.num_rows for u in units) for _, _, units in files]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # each file's first place
    parts = min(MAX_PARTITIONS, max(1, -(-int(starts[-1]) // (partition_rows or PARTITION_ROWS))))
    flagged: list[list] = [[] for _ in files]  # per file: [row, message], errors only
    with _Partitions(parts) as partitions:
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            list(pool.map(lambda k: _read(config, files[k][0], sizes[k], starts[k], partitions, flagged[k]),
                          range(len(files))))
        pa.default_memory_pool().release_unused()  # what the readers' threads cached (~200 MB for 30M ids)
        summary["null_ids"] = sum(len(errors) for errors in flagged)
        place, first, value, summary["duplicate_ids"] = _duplicates(partitions)
    k_of, fk_of = (np.searchsorted(starts, p, side="right") - 1 for p in (place, first))  # each one's file
    for at, was, k, fk, v in zip(place.tolist(), first.tolist(), k_of.tolist(), fk_of.tolist(), value):
        row, frow = at - int(starts[k]), was - int(starts[fk])
        flagged[k].append([row, RowError("duplicate_id", f"id {_short(v)} already appeared at {files[fk][1]} row {frow}")])
        if len(summary["examples"]) < 10:
            summary["examples"].append({"id": _short(v), "first": f"{files[fk][0].uri} row {frow}",
                                        "again": f"{files[k][0].uri} row {row}"})
    summary["duplicate_rows"] = len(place)
    for k, (_, _, units) in enumerate(files):
        firsts_of = [u.first_row for u in units]  # a file's units, in row order
        for row, message in sorted(flagged[k]):
            unit = units[bisect.bisect_right(firsts_of, row) - 1]
            unit.row_errors.append([row - unit.first_row, message])
        flagged[k] = None  # its errors live on in the units only
    return summary


def _read(config: PipelineConfig, loc, size: int, start: int, partitions: "_Partitions", flagged: list) -> None:
    """One file's ids into the partitions with their places (`start` + row), its null ids into `flagged`."""
    row = 0
    for ids in input_format(loc.path, config.input_format).read_ids(loc, config):
        n = len(ids)
        ids, here = _comparable(config, ids), start + row + np.arange(n)
        if ids.null_count or pa.types.is_floating(ids.type):  # a null or a NaN is no id
            null = pc.is_null(ids, nan_is_null=True).to_numpy(zero_copy_only=False)
            flagged.extend([row + int(r), NULL_ID] for r in np.flatnonzero(null))
            ids, here = ids.filter(pa.array(~null)), here[~null]
        partitions.add(ids, here)
        row += n
    if row != size:
        raise InputChanged(f"{loc.uri} has {row} rows now but had {size} when it was listed: it changed while "
                           "the run was planned; plan again once it is written")


def _duplicates(partitions: "_Partitions") -> tuple[np.ndarray, np.ndarray, list, int]:
    """Every later occurrence of an id in input order: (its place, the first one's, the id's Python
    value), and how many distinct ids repeat."""
    places, firsts, values, distinct = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [], 0
    for p in range(partitions.parts):
        table = partitions.take(p)
        if table is None:
            continue
        rows, first, repeated = _repeats(table)
        distinct += repeated
        places.append(table.column("place").to_numpy()[rows])
        firsts.append(first)
        values.append(table.column("id").combine_chunks().take(pa.array(rows)))
    place, first = np.concatenate(places), np.concatenate(firsts)
    order = np.argsort(place, kind="stable")
    value = column_values(pa.concat_arrays(values).take(pa.array(order))) if values else []
    return place[order], first[order], value, distinct


def _comparable(config: PipelineConfig, ids: pa.Array) -> pa.Array:
    """The ids in a type Arrow sorts (view types as their plain twins); ConfigError for non-scalars."""
    kind = ids.type
    if pa.types.is_nested(kind) or pa.types.is_dictionary(kind):
        raise ConfigError(f"id column {config.id_column!r} has type {kind}; ids must be scalars "
                          "(numbers, strings or bytes)")
    if pa.types.is_string_view(kind):
        return ids.cast(pa.large_string())
    if pa.types.is_binary_view(kind):
        return ids.cast(pa.large_binary())
    return ids


def _repeats(table: pa.Table) -> tuple[np.ndarray, np.ndarray, int]:
    """A partition's rows whose id a row of smaller place has too, that place, distinct ids repeated."""
    n = table.num_rows
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    ids = table.column("id")
    order = pc.sort_indices(ids).to_numpy()
    ids = ids.take(pa.array(order))
    same = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)  # as its left neighbour
    runs = np.flatnonzero(np.concatenate([[True], ~same]))  # where each run of equal ids starts
    places = table.column("place").to_numpy()[order]
    lengths = np.diff(np.append(runs, n))
    first = np.repeat(np.minimum.reduceat(places, runs), lengths)  # not the run's first: the order of
    later = places != first  # equal ids within a run is not the input order
    return order[later], first[later], int(np.count_nonzero(lengths > 1))


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- hash partitions ------------------------------------------------------------------------------
class _Partitions:
    """(id, place) rows by partition until `take(p)`: in memory with one partition, else FLUSH_ROWS
    at a time appended to its Arrow IPC file in a temp directory. `add` is thread-safe."""

    def __init__(self, parts: int):
        self.parts = parts
        self.flush_rows = max(1, min(FLUSH_ROWS, PARTITION_ROWS // parts))  # all waiting: ~PARTITION_ROWS ids
        self.pending: list[list[pa.RecordBatch]] = [[] for _ in range(parts)]
        self.pending_rows = [0] * parts
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.lock = threading.Lock()
        self.dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> "_Partitions":
        if self.parts > 1:
            self.dir = tempfile.TemporaryDirectory(prefix="persimmon-ids-")
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.dir is not None:
            self.dir.cleanup()

    def _path(self, p: int) -> str:
        return os.path.join(self.dir.name, f"{p:04d}.arrow")

    def add(self, ids: pa.Array, places: np.ndarray) -> None:
        if not len(ids):
            return
        if self.parts == 1:
            pieces = [(0, ids, places)]
        else:
            part = (_hash(ids) % np.uint64(self.parts)).astype(np.int64)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(self.parts + 1))
            ids, places = ids.take(pa.array(order)), places[order]
            pieces = [(p, ids.slice(a, b - a), places[a:b])
                      for p, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())) if b > a]
        with self.lock:
            for p, part_ids, part_places in pieces:
                self.pending[p].append(pa.record_batch([part_ids, pa.array(part_places)], names=["id", "place"]))
                self.pending_rows[p] += len(part_ids)
                if self.dir is not None and self.pending_rows[p] >= self.flush_rows:
                    self._flush(p)

    def _flush(self, p: int) -> None:
        table = pa.Table.from_batches(self.pending[p]).combine_chunks()
        if p not in self.writers:
            self.writers[p] = pa.ipc.new_stream(self._path(p), table.schema)
        self.writers[p].write_table(table)
        self.pending[p], self.pending_rows[p] = [], 0

    def take(self, p: int) -> pa.Table | None:
        """Partition p's rows, all at once (None if it has none); its file is removed."""
        batches, self.pending[p], self.pending_rows[p] = self.pending[p], [], 0
        if p in self.writers:
            self.writers.pop(p).close()
            with pa.OSFile(self._path(p)) as f:
                batches = pa.ipc.open_stream(f).read_all().to_batches() + batches
            os.remove(self._path(p))
        return pa.Table.from_batches(batches).combine_chunks() if batches else None


_INTS = {8: pa.int8(), 16: pa.int16(), 32: pa.int32(), 64: pa.int64()}
_POWERS = np.ones(1, np.uint64)


def _hash(ids: pa.Array) -> np.ndarray:
    """A uint64 per id (no nulls), equal for equal ids: their bits or bytes, mixed."""
    kind = ids.type
    if pa.types.is_floating(kind):
        bits = pc.add(ids.cast(pa.float64()), 0.0).to_numpy().view(np.uint64)  # -0.0 + 0.0 is 0.0
    elif pa.types.is_boolean(kind):
        bits = ids.cast(pa.uint8()).to_numpy().astype(np.uint64)
    elif (pa.types.is_integer(kind) or pa.types.is_temporal(kind)) and kind.bit_width in _INTS:
        bits = ids.view(_INTS[kind.bit_width]).to_numpy().astype(np.int64).view(np.uint64)
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind) \
            or pa.types.is_large_string(kind) or pa.types.is_fixed_size_binary(kind):
        bits = _bytes_hash(ids.cast(pa.large_binary()))
    else:  # decimals and the rare rest: their text is as distinct as they are within one type
        try:
            bits = _bytes_hash(ids.cast(pa.string()).cast(pa.large_binary()))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            raise ConfigError(f"ids of type {kind} cannot be compared; use numbers, strings or bytes") from None
    return _mix(bits)


def _powers(n: int) -> np.ndarray:
    """M**1, M**2, ... (mod 2**64), at least n of them."""
    global _POWERS
    powers = _POWERS
    if len(powers) < n:
        powers = np.cumprod(np.full(max(n, 2 * len(powers)), 0x100000001B3, np.uint64), dtype=np.uint64)
        _POWERS = powers
    return powers


def _bytes_hash(ids: pa.Array) -> np.ndarray:
    """Sum of byte_i * M**(i + 1) (mod 2**64) over each id's bytes, its length mixed in; HASH_BYTES at a time."""
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset: ids.offset + n + 1]
    data = ids.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    out = np.empty(n, np.uint64)
    a = 0
    while a < n:
        b = min(n, max(a + 1, int(np.searchsorted(offsets, offsets[a] + HASH_BYTES, side="right")) - 1))
        off = offsets[a:b + 1] - offsets[a]
        lengths = np.diff(off)
        seg = data[offsets[a]:offsets[b]].astype(np.uint64)
        seg *= _powers(int(lengths.max()))[np.arange(len(seg)) - np.repeat(off[:-1], lengths)]
        sums = np.concatenate([np.zeros(1, np.uint64), np.cumsum(seg, dtype=np.uint64)])
        out[a:b] = (sums[off[1:]] - sums[off[:-1]]) ^ (lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        a = b
    return out


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit (partitions by x % P)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
