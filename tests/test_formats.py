"""Input and output formats other than Parquet: JSONL (plain or compressed) and CSV in, JSONL out.

Reading is checked line by line against what the file says (bad lines become error rows with their
line number, never dropped), and the end-to-end runs against the bare engine on the same prompts;
a JSONL output resumes and goes stale like a Parquet one."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import error_of, read_all, tiny_model

from model import Engine, SamplingParams
from pipeline import PipelineConfig, run_generate
from pipeline.formats import INPUT_FORMATS, input_format, strip_suffix
from pipeline.plan import list_inputs
from pipeline.storage import resolve


def config(**kw) -> PipelineConfig:
    return PipelineConfig(input="-", output="-", model="-", **kw)


JSONL_LINES = [
    '{"id": 1, "prompt": "first", "meta": "a"}',
    '{"id": 2, "prompt": "has\\u2028a line separator", "meta": "b"}',  # not a line break in JSONL
    "",  # blank lines are skipped, not rows
    "{not json",
    "[1, 2]",
    '{"id": "x", "prompt": "id of another type"}',
    '{"id": 5, "prompt": "no meta"}',
]


def test_jsonl_rows_and_bad_lines_with_their_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(JSONL_LINES) + "\n")
    rows, errors = read_all(str(path), config(keep_columns=["meta"]))
    assert [r["id"] for r in rows] == [1, 2, None, None, None, 5]
    assert rows[1]["prompt"] == "has\u2028a line separator"
    assert rows[5]["meta"] is None and rows[0]["meta"] == "a"
    assert sorted(errors) == [2, 3, 4]
    assert str(errors[2]).startswith("invalid_line: line 4 is not JSON")
    assert str(errors[3]).startswith("invalid_line: line 5 holds a JSON array")
    assert str(errors[4]).startswith("invalid_id: id 'x' is a str")


def test_compressed_jsonl_reads_the_same_rows(tmp_path):
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    text = "\n".join(JSONL_LINES) + "\n"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    cfg = config(keep_columns=["meta"])
    assert read_all(str(packed), cfg) == read_all(str(plain), cfg)


def test_jsonl_string_ids_and_row_splits(tmp_path):
    path = tmp_path / "s.ndjson"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "prompt": f"p{i}"}) + "\n" for i in range(7)))
    cfg = config(rows_per_unit=3)
    found = INPUT_FORMATS["jsonl"].inspect(resolve(str(path), cfg), cfg)
    assert [(s.first_row, s.num_rows) for s in found.splits] == [(0, 3), (3, 3), (6, 1)]
    rows, errors = read_all(str(path), cfg)
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(7)] and errors == {}


def test_csv_quotes_newlines_and_a_malformed_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('id,prompt,meta\n1,"a, b",x\n2,"two\nlines",y\n3,broken,z,extra\n4,0042,\n5,,w\n')
    rows, errors = read_all(str(path), config(keep_columns=["meta"]))
    by_id = {r["id"]: r for r in rows}  # CSV ids are text: "001" and "1" stay two ids
    assert by_id["1"]["prompt"] == "a, b" and by_id["2"]["prompt"] == "two\nlines"
    assert by_id["4"]["prompt"] == "0042" and by_id["4"]["meta"] == ""  # prompts stay text, empty stays ""
    assert by_id["5"]["prompt"] == ""
    assert len(rows) == 5 and rows[-1]["id"] is None  # the malformed row: last, with its record number
    assert list(errors.values()) == [errors[4]] and str(errors[4]).startswith("invalid_row: record 4")
    (tmp_path / "ids.csv").write_text('id,prompt\n001,a\n1,b\n,c\n')
    rows, _ = read_all(str(tmp_path / "ids.csv"), config())
    assert [r["id"] for r in rows] == ["001", "1", None]  # an empty id cell is a missing id
    (tmp_path / "twice.csv").write_text('id,prompt,prompt\n1,a,b\n')
    problem = INPUT_FORMATS["csv"].inspect(resolve(str(tmp_path / "twice.csv"), config()), config()).problem
    assert "names column(s) ['prompt'] more than once" in problem


def test_missing_columns_and_empty_files_are_named(tmp_path):
    (tmp_path / "nocol.jsonl").write_text('{"id": 1, "text": "hi"}\n')
    (tmp_path / "empty.csv").write_text("id,prompt\n")
    cfg = config()
    problem = INPUT_FORMATS["jsonl"].inspect(resolve(str(tmp_path / "nocol.jsonl"), cfg), cfg).problem
    assert "no row has column(s) ['prompt']; they have ['id', 'text']" in problem  # the key it has instead
    kept = config(keep_columns=["prompt"])  # the prompt column kept too: still named once
    problem = INPUT_FORMATS["jsonl"].inspect(resolve(str(tmp_path / "nocol.jsonl"), kept), kept).problem
    assert "no row has column(s) ['prompt'];" in problem
    assert INPUT_FORMATS["csv"].inspect(resolve(str(tmp_path / "empty.csv"), cfg), cfg).problem == "empty (0 rows)"
    (tmp_path / "latin1.jsonl").write_bytes(('{"id": 1, "prompt": "caf\xe9"}\n{"id": 2, "prompt": "ok"}\n')
                                            .encode("latin-1"))
    rows, errors = read_all(str(tmp_path / "latin1.jsonl"), cfg)  # the line is an error row, not the file
    assert errors == {0: ("invalid_line", "line 1 is not UTF-8 (byte 0xe9 at column 25)")}
    assert [r["id"] for r in rows] == [None, 2] and rows[1]["prompt"] == "ok"


def test_listing_picks_data_files_by_extension_or_forced_format(tmp_path, caplog):
    for name in ("a.parquet", "b.jsonl", "c.jsonl.gz", "d.csv", "info.json", "notes.txt", "README"):
        (tmp_path / name).write_text("")
    names = lambda files: sorted(os.path.basename(f.loc.path) for f in files)  # noqa: E731
    # a plain .json file in a directory is as often metadata as data: read only when named (with a warning)
    with caplog.at_level("WARNING"):
        assert names(list_inputs(str(tmp_path), config())) == ["a.parquet", "b.jsonl", "c.jsonl.gz", "d.csv"]
    assert "3 file(s) in the input directory are not read as data (README, info.json, notes.txt)" in caplog.text
    assert names(list_inputs(str(tmp_path / "*.json"), config())) == ["info.json"]
    assert names(list_inputs(str(tmp_path), config(input_format="jsonl"))) == ["b.jsonl", "c.jsonl.gz", "info.json"]
    assert names(list_inputs(str(tmp_path / "*.txt"), config(input_format="jsonl"))) == ["notes.txt"]  # a glob: as said
    with pytest.raises(FileNotFoundError, match="matches no input files"):
        list_inputs(str(tmp_path / "*.tsv"), config())
    assert input_format("x.data", "csv").name == "csv" and input_format("y.json.zst").name == "jsonl"
    assert strip_suffix("part-1.jsonl.gz") == "part-1" and strip_suffix("p.csv") == "p"


def _engine_texts(prompts: list[str], tokens: int) -> list[str]:
    engine = Engine.from_pretrained(tiny_model("causal"), device="cpu")
    return [c.text for c in engine.generate(prompts, SamplingParams(max_new_tokens=tokens))]


def read_jsonl_dir(out) -> list[dict]:
    return [json.loads(line) for f in sorted(os.listdir(out)) if f.endswith(".jsonl")
            for line in open(os.path.join(out, f))]


@pytest.mark.ray
def test_jsonl_in_jsonl_out_matches_engine_resumes_and_goes_stale(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    prompts = [f"The river runs past stone number {i}." for i in range(9)]
    lines = [json.dumps({"id": i, "prompt": p, "meta": f"m{i}"}) for i, p in enumerate(prompts)]
    (src / "a.jsonl").write_text("\n".join(lines[:5] + ["{broken"]) + "\n")
    (src / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[5:]) + "\n").encode()))
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=4,
                keep_columns=["meta"], output_format="jsonl")
    report = run_generate(**args)
    assert report["complete"] and report["rows_in"] == report["rows_written"] == 10
    assert sorted(os.listdir(out)) == ["_run_report.json", "_stats", "a.jsonl", "b.jsonl"]
    rows = read_jsonl_dir(out)
    good = {r["id"]: r for r in rows if r["error"] is None}
    assert sorted(good) == list(range(9)) and [good[i]["meta"] for i in range(9)] == [f"m{i}" for i in range(9)]
    assert [good[i]["completion"] for i in range(9)] == _engine_texts(prompts, 4)
    (bad,) = [r for r in rows if r["error"] is not None]
    assert bad["id"] is None and str(error_of(bad)).startswith("invalid_line: line 6")
    assert report["errors_by_kind"] == {"invalid_line": 1}

    before = os.stat(out / "a.jsonl").st_mtime_ns
    again = run_generate(**args)
    assert again["complete"] and again["units"]["skipped"] == 2 and again["units"]["done"] == 0
    assert os.stat(out / "a.jsonl").st_mtime_ns == before

    (src / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps({"id": 50, "prompt": "new row", "meta": "n"}) + "\n").encode()))
    third = run_generate(**args)
    assert third["units"]["stale"] == 1 and third["units"]["done"] == 1
    assert sorted(r["id"] for r in read_jsonl_dir(out) if r["id"] is not None) == [0, 1, 2, 3, 4, 50]

    with open(out / "a.jsonl", "a") as f:  # a data file that no longer matches its statistics
        f.write('{"id": 999}\n')
    fourth = run_generate(**args)
    assert fourth["complete"] and fourth["units"]["done"] == 1  # recomputed, not trusted
    assert sorted(r["id"] for r in read_jsonl_dir(out) if r["id"] is not None) == [0, 1, 2, 3, 4, 50]


@pytest.mark.ray
def test_csv_in_parquet_out_split_by_rows(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    prompts = [f"Name a colour, number {i}" for i in range(7)]
    body = "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts))
    (src / "rows.csv").write_text("id,prompt\n" + body)
    report = run_generate(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1,
                          max_new_tokens=3, rows_per_unit=3)
    assert report["complete"] and report["units"]["total"] == 3
    files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    assert len(files) == 3 and all(f.startswith("rows") for f in files)
    table = pa.concat_tables([pq.read_table(out / f) for f in files]).sort_by("id")
    assert table["id"].to_pylist() == [str(i) for i in range(7)]  # CSV ids are text
    assert table["completion"].to_pylist() == _engine_texts(prompts, 3)


# ---- what a user tried to break (in process: plan, UnitRunner, report; the real tiny engine) ----
@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.from_pretrained(tiny_model("causal"), max_batch_size=8, dtype="float32", device="cpu")


def _run_in_process(src, out, engine, **kw):
    from pipeline.plan import make_plan
    from pipeline.report import build_report
    from pipeline.unit_runner import UnitRunner

    cfg = PipelineConfig(task="generate", input=str(src), output=str(out), model=tiny_model("causal"),
                         max_new_tokens=3, **kw).validate()
    plan = make_plan(cfg)
    os.makedirs(out, exist_ok=True)
    runner = UnitRunner(cfg, plan.schema, engine=engine)
    results = {u.output_name: runner.run_unit(u) for u in plan.todo}
    return plan, build_report(cfg, plan, results, None, 0.0, 1.0)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_one_odd_line_changes_no_other_line(tmp_path, tiny_engine):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join([
        json.dumps({"id": 1, "prompt": "hello", "meta": "m1"}),
        json.dumps({"id": 2, "prompt": 42, "meta": {"k": [1, 2]}}),  # not a string: its own error
        json.dumps({"id": 99999999999999999999, "prompt": "too big an id"}),
        json.dumps({"id": 4, "prompt": "world", "meta": "m4"}),
    ]) + "\n")
    (src / "b.jsonl").write_text(json.dumps({"id": 5, "prompt": "x", "meta": {"k": 1, "other": True}}) + "\n")
    _, report = _run_in_process(src, tmp_path / "out", tiny_engine, keep_columns=["meta"], output_format="jsonl")
    rows = {r["id"]: r for f in ("a.jsonl", "b.jsonl") for r in _jsonl(tmp_path / "out" / f)}
    texts = [c.text for c in tiny_engine.generate(["hello", "world"], SamplingParams(max_new_tokens=3))]
    assert (rows[1]["completion"], rows[4]["completion"]) == tuple(texts)  # not run on '"hello"'
    assert rows[1]["meta"] == "m1" and rows[5]["meta"] == '{"k": 1, "other": true}'  # objects as JSON text
    assert error_of(rows[2]) == ("invalid_prompt", "expected a string, got a int (line 2)")
    assert str(error_of(rows[None])).startswith("invalid_id: id 99999999999999999999 is a int")
    assert "(line 3)" in rows[None]["error"]
    assert report["complete"] and report["rows_written"] == 5 and report["rows_with_error"] == 2


def test_files_of_only_bad_lines_give_one_error_row_each(tmp_path, tiny_engine):
    src = tmp_path / "in"
    src.mkdir()
    (src / "garbage.jsonl").write_text("garbage\n{oops\n")
    (src / "good.jsonl").write_text(json.dumps({"id": 1, "prompt": "fine"}) + "\n")
    _, report = _run_in_process(src, tmp_path / "out", tiny_engine, output_format="jsonl")
    bad = _jsonl(tmp_path / "out" / "garbage.jsonl")
    assert [(r["error_kind"], r["error"].split(" (")[0][:12]) for r in bad] == [("invalid_line", "line 1 is no"),
                                                                               ("invalid_line", "line 2 is no")]
    assert report["complete"] and report["rows_in"] == report["rows_written"] == 3

    requests = tmp_path / "req"
    requests.mkdir()
    (requests / "all_bad.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"custom_id": 7, "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
        {"custom_id": "q1", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "q2", "url": "/v1/completions"},
        {"custom_id": "q4", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": "many"}},
        {"custom_id": "q5", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 0}}]) + "\n")
    (requests / "fine.jsonl").write_text(json.dumps(
        {"custom_id": "q3", "url": "/v1/completions", "body": {"prompt": "Once"}}) + "\n")
    _, report = _run_in_process(requests, tmp_path / "out_req", tiny_engine, input_format="openai-batch")
    lines = _jsonl(tmp_path / "out_req" / "all_bad.jsonl") + _jsonl(tmp_path / "out_req" / "fine.jsonl")
    assert [x["custom_id"] for x in lines] == [None, "q1", "q2", "q4", "q5", "q3"]  # non-string custom_id: that row
    assert [x["error"]["code"] for x in lines[:3]] == ["invalid_request"] * 3 and lines[5]["error"] is None
    # setting errors in the request's terms
    assert lines[3]["error"] == {"code": "invalid_sampling", "message": "max_tokens: expected an integer, got str 'many' (line 4)"}
    assert lines[4]["error"] == {"code": "invalid_sampling", "message": "max_tokens: must be >= 1, got 0 (line 5)"}
    assert report["complete"] and report["rows_written"] == 6


def test_a_kill_between_data_and_statistics_never_passes_old_results_as_new(tmp_path, tiny_engine, monkeypatch):
    import pipeline.unit_runner as runner_module

    src = tmp_path / "in"
    src.mkdir()

    def write(p1, p2):
        (src / "a.jsonl").write_text(json.dumps({"id": "a", "prompt": p1}) + "\n" +
                                     json.dumps({"id": "b", "prompt": p2}) + "\n")

    write("hello world", "good bye")
    _run_in_process(src, tmp_path / "out", tiny_engine, output_format="jsonl")
    write("good bye", "hello world")  # swapped: the output has the same size
    real_side, real_commit, done = runner_module.write_bytes_atomic, runner_module.commit, []

    def second_write_dies(what, fn, *args):  # whichever of data and statistics lands second is killed
        if done:
            raise KeyboardInterrupt(f"killed between the two writes, before the {what}")
        done.append(what)
        return fn(*args)

    monkeypatch.setattr(runner_module, "write_bytes_atomic", lambda loc, data: second_write_dies(
        "statistics", real_side, loc, data) if "/_stats/" in loc.path else real_side(loc, data))
    monkeypatch.setattr(runner_module, "commit", lambda tmp, final: second_write_dies("data", real_commit, tmp, final))
    with pytest.raises(KeyboardInterrupt):
        _run_in_process(src, tmp_path / "out", tiny_engine, output_format="jsonl")
    monkeypatch.setattr(runner_module, "write_bytes_atomic", real_side)
    monkeypatch.setattr(runner_module, "commit", real_commit)
    plan, report = _run_in_process(src, tmp_path / "out", tiny_engine, output_format="jsonl")
    assert not plan.done  # the old statistics do not describe the new input: redone
    got = {r["id"]: r["completion"] for r in _jsonl(tmp_path / "out" / "a.jsonl")}
    want = [c.text for c in tiny_engine.generate(["good bye", "hello world"], SamplingParams(max_new_tokens=3))]
    assert [got["a"], got["b"]] == want


def test_jsonl_output_is_strict_json_and_keeps_bytes_apart():
    from pipeline.formats import OUTPUT_FORMATS

    class Sink:
        def __init__(self):
            self.data = b""

        def write(self, b):
            self.data += b

    sink = Sink()
    table = pa.table({"id": [b"\xff\x01", b"\xfe\x01"], "score": [float("nan"), float("inf")],
                      "probs": [[0.5, float("-inf")], None]})
    writer = OUTPUT_FORMATS["jsonl"].open(sink, table.schema, config())
    writer.write(table)
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
             for x in sink.data.decode().splitlines()]
    assert [x["score"] for x in lines] == [None, None] and lines[0]["probs"] == [0.5, None]
    assert lines[0]["id"] != lines[1]["id"] and lines[0]["id"] == "base64:/wE="


def test_a_jsonl_file_read_again_for_another_score_after_column_has_that_column(tmp_path):
    """The parsed-file cache was keyed without the task's input columns (--score-after): the same
    file read for a config naming another column came back without it, so its rows were scored
    after the literal text instead of the column's values."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1, "prompt": "text", "ctx": "a", "head": "b"}\n')
    loc = resolve(str(path), config())
    fmt = INPUT_FORMATS["jsonl"]
    for name in ("ctx", "head"):
        cfg = config(task="score", score_after=name)
        assert name in fmt.inspect(loc, cfg).schema.names
        (table, _), = fmt.batches(loc, fmt.inspect(loc, cfg).splits[0], cfg, ["id", "prompt", name])
        assert table[name].to_pylist() == [{"ctx": "a", "head": "b"}[name]]
