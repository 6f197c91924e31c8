"""The duplicate-id check, partitioned, against a plain reference.

`pipeline.ids.flag_ids` hashes ids into partitions (spilled to temp files when there is more
than one) and finds repeats by sorting each partition. The reference below is the check as it
was before: every id as a Python value in one dict, first occurrence in input order wins. Both
must give every unit the same row errors and the same summary, for each id type the formats
produce, with one partition and with many (forced on small inputs)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
import random
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PipelineConfig
from pipeline import ids as ids_mod
from pipeline.plan import make_plan


def reference(files: list[tuple[str, str, list]]) -> tuple[dict[str, list], dict]:
    """{file name: [[row, error], ...]} and the id summary, from ids as Python values in a dict
    (files: [(uri, name, ids)] in input order)."""
    first_at, repeated, errors = {}, set(), {}
    summary = {"checked": True, "duplicate_rows": 0, "duplicate_ids": 0, "null_ids": 0, "examples": []}
    for uri, name, values in files:
        errors[name] = []
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and value != value):
                errors[name].append([row, ids_mod.NULL_ID])
                summary["null_ids"] += 1
            elif value not in first_at:
                first_at[value] = (uri, name, row)
            else:
                furi, fname, frow = first_at[value]
                repeated.add(value)
                errors[name].append([row, ("duplicate_id", f"id {ids_mod._short(value)} already appeared at {fname} "
                                                           f"row {frow}")])
                summary["duplicate_rows"] += 1
                if len(summary["examples"]) < 10:
                    summary["examples"].append({"id": ids_mod._short(value), "first": f"{furi} row {frow}",
                                                "again": f"{uri} row {row}"})
    summary["duplicate_ids"] = len(repeated)
    return errors, summary


def planned_errors(plan) -> dict[str, list]:
    """{input file name: [[row in file, error], ...]} from the units' row errors."""
    out: dict[str, list] = {}
    for unit in plan.units:
        name = os.path.basename(unit.input_path)
        out.setdefault(name, []).extend([unit.first_row + row, message] for row, message in unit.row_errors)
    return {name: sorted(errors) for name, errors in out.items()}


def config(src, out, **kw) -> PipelineConfig:
    return PipelineConfig(task="generate", input=str(src), output=str(out), model="unused", **kw).validate()


def write_parquet(src, columns: list[list], kind: pa.DataType, row_group_size=None) -> list[tuple[str, str, list]]:
    """part-000k.parquet with the ids of columns[k]; returns (uri, name, ids as read back) per file."""
    src.mkdir(exist_ok=True)
    files = []
    for k, values in enumerate(columns):
        name = f"part-{k:03d}.parquet"
        pq.write_table(pa.table({"id": pa.array(values, kind), "prompt": [f"p{i}" for i in range(len(values))]}),
                       src / name, row_group_size=row_group_size)
        files.append((str(src / name), name, pq.read_table(src / name)["id"].to_pylist()))
    return files


def random_ids(rng: random.Random, make, files: int, rows: int, pool: int, null_rate=0.05) -> list[list]:
    """`files` lists of `rows` ids drawn from `pool` distinct values (so many repeat), some null."""
    return [[None if rng.random() < null_rate else make(rng.randrange(pool)) for _ in range(rows)]
            for _ in range(files)]


ID_TYPES = {
    "int64": (pa.int64(), lambda i: i * 7919 - 500),
    "uint64 beyond int64": (pa.uint64(), lambda i: 2**64 - 1 - i * 3),
    "strings": (pa.string(), lambda i: f"row-{i:09d}"),
    "large strings, unicode": (pa.large_string(), lambda i: f"é{i}😀" if i % 2 else f"e\u0301{i}"),
    "bytes with trailing NULs": (pa.binary(), lambda i: b"a" + b"\x00" * (i % 5) + bytes([i % 3])),
    "float64 with -0.0": (pa.float64(), lambda i: -0.0 if i == 0 else i / 4),
    "decimal": (pa.decimal128(12, 3), lambda i: decimal.Decimal(i) / 8),
    "date": (pa.date32(), lambda i: datetime.date(2020, 1, 1) + datetime.timedelta(i)),
    "bool": (pa.bool_(), lambda i: bool(i % 2)),
}


@pytest.mark.parametrize("name", list(ID_TYPES))
@pytest.mark.parametrize("partition_rows", [10**9, 7])  # one partition in memory; many spilled to files
def test_partitioned_check_equals_the_reference(tmp_path, monkeypatch, name, partition_rows):
    kind, make = ID_TYPES[name]
    rng = random.Random(zlib.crc32(name.encode()))
    files = write_parquet(tmp_path / "in", random_ids(rng, make, files=6, rows=40, pool=90), kind, row_group_size=9)
    monkeypatch.setattr(ids_mod, "PARTITION_ROWS", partition_rows)
    monkeypatch.setattr(ids_mod, "FLUSH_ROWS", 5)  # spill files written in many small appends
    plan = make_plan(config(tmp_path / "in", tmp_path / "out", rows_per_unit=9))
    want_errors, want_summary = reference(files)
    assert planned_errors(plan) == {n: e for n, e in want_errors.items() if e}
    assert plan.ids == want_summary
    assert plan.ids["duplicate_rows"] > 10 and plan.ids["null_ids"] > 0  # the input does repeat ids


def test_many_partitions_see_what_one_sees(tmp_path, monkeypatch):
    """The spill path on its own: the same files, 1 partition vs 50 (64 ids each on average),
    most of them read back from their files."""
    rng = random.Random(5)
    files = write_parquet(tmp_path / "in", random_ids(rng, lambda i: f"id-{i}", files=20, rows=160, pool=1500),
                          pa.string())
    one = make_plan(config(tmp_path / "in", tmp_path / "o1"))
    from_files = []
    take = ids_mod._Partitions.take

    def counting_take(self, p):
        from_files.append(p in self.writers)
        return take(self, p)

    monkeypatch.setattr(ids_mod._Partitions, "take", counting_take)
    monkeypatch.setattr(ids_mod, "PARTITION_ROWS", 64)
    monkeypatch.setattr(ids_mod, "FLUSH_ROWS", 16)
    many = make_plan(config(tmp_path / "in", tmp_path / "o2"))
    assert len(from_files) == 50 and sum(from_files) >= 40
    assert many.ids == one.ids == reference(files)[1]
    assert planned_errors(many) == planned_errors(one) and one.ids["duplicate_rows"] > 500


def _files_of(cfg):
    """(Location, name, units without errors) per input file, as make_plan hands them to flag_ids."""
    from pipeline.storage import resolve

    plan = make_plan(dataclasses.replace(cfg, check_duplicate_ids=False))
    by_file: dict[str, list] = {}
    for unit in plan.units:
        by_file.setdefault(unit.input_uri, []).append(unit)
    return [(resolve(uri, cfg), os.path.basename(uri), units) for uri, units in sorted(by_file.items())]


def test_jsonl_and_csv_ids_keep_their_exact_semantics(tmp_path):
    """JSONL ids are integers or strings as written; CSV ids are text ('001' is not '1'; an empty
    cell is a null id). Checked with many partitions against the reference."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"id": i, "prompt": "x"}) for i in [1, 2, 3, 2, None, 10**18])
                                 + "\n")
    (src / "b.jsonl").write_text("\n".join(json.dumps({"id": i, "prompt": "y"}) for i in [3, 10**18, 4]) + "\n")
    (src / "c.csv").write_text("id,prompt\n001,a\n1,b\n,c\n001,d\n")
    (src / "d.csv").write_text("id,prompt\n1,e\n01,f\n")
    for pattern, files in (("*.jsonl", [("a.jsonl", [1, 2, 3, 2, None, 10**18]), ("b.jsonl", [3, 10**18, 4])]),
                           ("*.csv", [("c.csv", ["001", "1", None, "001"]), ("d.csv", ["1", "01"])])):
        cfg = config(f"{src}/{pattern}", tmp_path / f"out-{pattern[2:]}")
        got = ids_mod.flag_ids(cfg, _files_of(cfg), partition_rows=2)
        want_errors, want_summary = reference([(str(src / n), n, v) for n, v in files])
        assert got == want_summary
        plan = make_plan(cfg)
        assert planned_errors(plan) == {n: e for n, e in want_errors.items() if e}
    assert planned_errors(plan) == {"c.csv": [[2, ids_mod.NULL_ID],
                                              [3, ("duplicate_id", "id '001' already appeared at c.csv row 0")]],
                                    "d.csv": [[0, ("duplicate_id", "id '1' already appeared at c.csv row 1")]]}


def test_a_file_that_changes_while_planned_is_an_input_error(tmp_path, monkeypatch):
    from pipeline.plan import InputError

    files = write_parquet(tmp_path / "in", [[1, 2, 3], [4, 5]], pa.int64())
    original = ids_mod.input_format

    def grown(path, forced=None):  # the file gains a row between listing and the id pass
        fmt = original(path, forced)
        read = fmt.read_ids

        class Grown:
            def read_ids(self, loc, cfg):
                yield from read(loc, cfg)
                if loc.path.endswith(files[1][1]):
                    yield pa.array([6], pa.int64())
        return Grown()

    monkeypatch.setattr(ids_mod, "input_format", grown)
    with pytest.raises(InputError, match=r"part-001.parquet has 3 rows now but had 2 when it was listed"):
        make_plan(config(tmp_path / "in", tmp_path / "out"))


def test_ids_that_are_not_scalars_are_a_config_error(tmp_path):
    from pipeline.settings import ConfigError

    write_parquet(tmp_path / "in", [[[1], [2]]], pa.list_(pa.int64()))
    with pytest.raises(ConfigError, match="ids must be scalars"):
        make_plan(config(tmp_path / "in", tmp_path / "out"))


def test_hash_is_a_function_of_the_value():
    """Equal ids hash equally whatever their chunk, offset or neighbours; the bytes hash sees
    every byte (trailing NULs included) and the length."""
    values = [b"", b"a", b"a\x00", b"\x00a", b"ab" * 300, b"a"]
    arr = pa.array(values, pa.binary())
    h = ids_mod._hash(arr)
    assert h[1] == h[5] and len(set(h[:5].tolist())) == 5
    sliced = ids_mod._hash(pa.concat_arrays([pa.array([b"zz"] * 3), arr]).slice(3))
    assert sliced.tolist() == h.tolist()
    floats = ids_mod._hash(pa.array([0.0, -0.0, 1.5]))
    assert floats[0] == floats[1] != floats[2]


def test_hashing_memory_per_reader_stays_small():
    """Up to 16 reader threads hash ids at once, each a chunk of HASH_BYTES of id bytes at a time
    with ~32 bytes of numpy temporaries per byte. With 1 MiB chunks that was 32+ MiB per thread:
    2M string ids in 20 files planned at 1.0 GB peak RSS (+640 MiB for the id check, +170 MiB with
    one thread). Measured by tracemalloc (numpy reports its buffers to it): what hashing 1M ids
    needs beyond its 8 MB of output stays a few MiB."""
    import tracemalloc

    ids = pa.array([f"row-{i:09d}" for i in range(1 << 20)]).cast(pa.large_binary())
    ids_mod._bytes_hash(ids[:10])  # the powers table, grown once per process
    tracemalloc.start()
    try:
        out = ids_mod._bytes_hash(ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - out.nbytes < 8 << 20, (peak - out.nbytes) / 2**20

