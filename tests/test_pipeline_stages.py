"""Pipeline pieces without Ray: config, stages on hand-built batches, planning, the shard
runner's commit/skip logic, the CLI parser and the example job configs."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import LABELS, PROMPTS, error_of, read_output, tiny_model, write_shards
from tolerances import approx_forward

from model import ChoiceScores, Classification, Completion, Engine, SamplingParams
from pipeline import ClassifyStage, ConfigError, GenerateStage, InputError, LabelStage, PipelineConfig
from pipeline.cli import build_parser, config_from_args, main, summary
from pipeline.plan import make_plan
from pipeline.unit_runner import UnitRunner
from pipeline.stages import row_seed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeEngine:
    """Echo engine: completion = reversed prompt; raises if a prompt contains 'BOOM'."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(list(prompts))
        if any("BOOM" in p for p in prompts):
            raise RuntimeError("kaboom")
        out = []
        for p in prompts:
            if "TOO LONG" in p:
                out.append(Completion(error="prompt has 900 tokens, more than the 511 this engine allows",
                                      error_kind="prompt_too_long"))
            else:
                out.append(Completion(text=p[::-1], finish_reason="length", num_prompt_tokens=len(p),
                                      num_generated_tokens=3))
        return out

    def classify(self, texts):
        return [Classification(label="positive", score=0.75, probs=[0.25, 0.75]) for _ in texts]

    def score_choices(self, prompts, choices, normalize="sum", separator=" "):
        return [ChoiceScores(label=choices[-1], scores=[-2.0] * (len(choices) - 1) + [-1.0]) for _ in prompts]


def cfg(**kw) -> PipelineConfig:
    base = dict(task="generate", input="in", output="out", model="m", batch_size=4)
    if kw.get("task", "generate") == "generate":  # another task refuses a generate setting
        base["max_new_tokens"] = 4
    return PipelineConfig(**{**base, **kw})


# ---- config ------------------------------------------------------------------------------
def test_another_tasks_setting_is_refused_not_ignored():
    """A setting only other tasks take, changed from its default, would change nothing here: refused,
    naming it and the tasks that take it; at its default it passes (a shared YAML may spell it out)."""
    for task, change, words in (("label", dict(temperature=0.5), "temperature: applies to the generate task only"),
                                ("classify", dict(choices=["a", "b"]), "choices: applies to the generate and label "
                                                                       "tasks only, not classify"),
                                ("generate", dict(score_rolling=False), "score_rolling: applies to the score task"),
                                ("score", dict(stop=["x"]), "stop: applies to the generate task only, not score")):
        extra = dict(choices=["a", "b"]) if task == "label" else {}
        with pytest.raises(ConfigError, match=words):
            cfg(task=task, **extra, **change).validate()
    with pytest.raises(ConfigError, match=r"^max_new_tokens, temperature: apply to the generate task only; "
                       r"score_rolling: applies to the score task only, not label: remove them from the config"):
        cfg(task="label", choices=["a", "b"], max_new_tokens=8, temperature=0.5, score_rolling=False).validate()
    assert cfg(task="label", choices=["a", "b"], max_new_tokens=64, stop=[]).validate()
    for constraint in (dict(regex="a+"), dict(json_schema={"type": "string"})):  # named as the config names them
        with pytest.raises(ConfigError, match="^choices: constrain generation, as --regex and --json-schema do"):
            cfg(choices=["x", "y"], **constraint).validate()


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="prompt_template"):
        cfg(prompt_template="no field").validate()
    with pytest.raises(ConfigError, match="prompt_template"):
        cfg(prompt_template="{prompt} {other}").validate()
    with pytest.raises(ConfigError, match="choices"):
        cfg(task="label", choices=["only"]).validate()
    with pytest.raises(ConfigError, match="replicas"):
        cfg(replicas="4,2").validate()
    with pytest.raises(ConfigError, match="keep_columns"):
        cfg(keep_columns=["completion"]).validate()
    with pytest.raises(ConfigError, match="keep_columns"):
        cfg(keep_columns=["id"]).validate()
    with pytest.raises(ConfigError, match="did you mean max_new_tokens"):
        PipelineConfig.from_dict({"max_new_token": 3})
    assert cfg(replicas="2,8").replica_range == (2, 8)
    assert cfg(replicas=3).replica_range == (3, 3)
    assert cfg(replicas=[1, 4]).replica_range == (1, 4)
    assert cfg(choices="a, b,c", task="label").choices == ["a", "b", "c"]
    assert cfg(chat_template=True, prompt_template="Q: {prompt}").template == "human: Q: {prompt}\n\nadept:"


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")),       # every row would be invalid_sampling, the run "complete"
    ("temperature", float("inf")),
    ("num_cpus_per_replica", float("inf")),  # an OverflowError traceback in the placement check
    ("num_cpus_per_replica", float("nan")),
    ("num_gpus_per_replica", float("inf")),
    ("num_gpus_per_replica", float("nan")),
    ("num_cpus", 0),                     # 0 silently meant the default, -3 gave "use --replicas -3"
    ("num_cpus", -3),
    ("max_seq_len", (1 << 24) + 1),      # past the engine's bounds: failed in every replica's constructor
    ("max_num_seqs", (1 << 20) + 1),
])
def test_config_refuses_what_every_replica_would_refuse(field, value):
    """Values the engine or the placement check cannot take are refused on the driver, naming the
    field (exit 2), not found by each replica or as a traceback."""
    with pytest.raises(ConfigError, match=field):
        cfg(**{field: value}).validate()


def test_config_engine_bounds_are_the_engines():
    cfg(max_seq_len=1 << 24, max_num_seqs=1 << 20, num_cpus=1).validate()
    from model import Engine

    for kw in ({"max_seq_len": (1 << 24) + 1}, {"max_batch_size": (1 << 20) + 1}):
        with pytest.raises(ValueError, match="must be an integer in"):
            Engine(FakeModelForBounds(), **kw)


class FakeModelForBounds:
    """Just enough of a model for Engine's argument checks, which run first."""

    class config:
        max_position_embeddings = 512

    def eval(self):
        return self

    def modules(self):
        return iter(())


def test_secrets_never_in_public_dict_or_repr(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    monkeypatch.setenv("PERSIMMON_S3_ENDPOINT", "http://127.0.0.1:9")
    c = cfg().with_env()
    assert c.s3_secret_access_key.get_secret_value() == "super-secret-value" and c.s3_endpoint == "http://127.0.0.1:9"
    text = repr(c) + json.dumps(c.public_dict())
    assert "super-secret-value" not in text and "AKIAEXAMPLE" not in text
    assert "s3_endpoint" in c.public_dict()
    assert cfg(s3_endpoint="http://user:pw@127.0.0.1:9").public_dict()["s3_endpoint"] == "http://***@127.0.0.1:9"


def test_row_seeds():
    assert row_seed(None, 1) is None
    assert row_seed(7, 1) == row_seed(7, 1) != row_seed(7, 2)


# ---- stages on hand-built batches ----------------------------------------------------------
def test_generate_stage_bad_rows_are_isolated():
    engine = FakeEngine()
    stage = GenerateStage(cfg(keep_columns=["meta"]), engine=engine)
    batch = {"id": [1, 2, 3, 4, 5, 6, 7], "meta": list("abcdefg"),
             "prompt": ["hello", None, "   ", 5, b"\xff\xfe", "a TOO LONG prompt", "world"]}
    out = stage(batch)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["meta"] for r in rows] == list("abcdefg")
    assert rows[0]["completion"] == "olleh" and rows[0]["error"] is None
    assert rows[6]["completion"] == "dlrow" and rows[6]["error"] is None
    kinds = [r["error_kind"] for r in rows]
    assert kinds == [None, "invalid_prompt", "empty_prompt", "invalid_prompt", "invalid_prompt",
                     "prompt_too_long", None]
    assert all(r["completion"] is None for r in rows[1:6])
    # the message alone says what is wrong: it was "null", which the error column (or a JSON
    # output's "error": "null") reads as no error at all
    assert rows[1]["error"] == "prompt is null"
    assert engine.calls == [["hello", "a TOO LONG prompt", "world"]]  # bad rows never reach it
    assert out.schema.field("num_generated_tokens").type == pa.int32()


def test_engine_exception_fails_only_the_poisoned_row():
    stage = GenerateStage(cfg(), engine=FakeEngine())
    rows = stage(pa.table({"id": [1, 2, 3], "prompt": ["a", "BOOM", "c"]})).to_pylist()
    assert [r["completion"] for r in rows] == ["a", None, "c"]
    assert rows[1]["error_kind"] == "engine_error" and rows[1]["error"].startswith("RuntimeError: kaboom")


def test_invalid_utf8_in_a_string_column_fails_one_row():
    good = pa.array(["fine"], pa.string())
    raw = pa.array([b"ok", b"\xc3\x28"], pa.binary()).cast(pa.string(), safe=False)  # invalid UTF-8
    stage = GenerateStage(cfg(), engine=FakeEngine())
    rows = stage(pa.table({"id": [1, 2, 3], "prompt": pa.concat_arrays([good, raw])})).to_pylist()
    assert [r["error"] is None for r in rows] == [True, True, False]


def test_template_and_label_and_classify_stages():
    engine = FakeEngine()
    stage = GenerateStage(cfg(prompt_template="Q: {prompt}", chat_template=True), engine=engine)
    stage({"id": [1], "prompt": ["hi"]})
    assert engine.calls[-1] == ["human: Q: hi\n\nadept:"]
    lab = LabelStage(cfg(task="label", choices=["yes", "no"]), engine=engine)
    row = lab({"id": [1], "prompt": ["x"]}).to_pylist()[0]
    p_no = math.exp(1.0) / (1 + math.exp(1.0))  # softmax([-2, -1]) by hand
    assert row["label"] == "no" and row["scores"] == [-2.0, -1.0] and row["error"] is None
    assert row["probs"] == pytest.approx([1 - p_no, p_no]) and row["margin"] == pytest.approx(2 * p_no - 1)
    cls = ClassifyStage(cfg(task="classify"), engine=engine)
    assert cls({"id": [1], "prompt": ["x"]}).to_pylist() == [
        {"id": 1, "label": "positive", "score": 0.75, "probs": [0.25, 0.75], "error_kind": None, "error": None}]


def test_model_load_and_every_engine_call_run_on_one_thread(monkeypatch):
    """Ray Data builds the stage on the actor's main thread and calls it from another; torch
    must still see a single thread (one OpenMP team), whichever thread calls."""
    import threading

    import pipeline.stages as stages

    seen = {}

    class ThreadRecordingEngine(FakeEngine):
        def generate(self, prompts, params):
            seen.setdefault("calls", set()).add(threading.get_ident())
            return super().generate(prompts, params)

    def fake_load(config):
        seen["load"] = threading.get_ident()
        return ThreadRecordingEngine()

    monkeypatch.setattr(stages, "load_engine", fake_load)
    stage = GenerateStage(cfg())
    stage({"id": [1], "prompt": ["a"]})  # from this thread
    caller = threading.Thread(target=stage, args=({"id": [2, 3], "prompt": ["b", "BOOM"]},))  # row-by-row retry too
    caller.start()
    caller.join()
    assert seen["calls"] == {seen["load"]}
    assert seen["load"] not in (threading.get_ident(), caller.ident)


def test_stages_with_the_real_tiny_engine_match_direct_calls():
    causal = tiny_model("causal")
    engine = Engine.from_pretrained(causal, max_batch_size=4, dtype="float32", device="cpu")
    ids, prompts = list(range(6)), PROMPTS[:6]
    rows = GenerateStage(cfg(model=causal), engine=engine)({"id": ids, "prompt": prompts}).to_pylist()
    direct = Engine.from_pretrained(causal, max_batch_size=4, dtype="float32", device="cpu").generate(
        prompts, SamplingParams(max_new_tokens=4))
    assert [r["completion"] for r in rows] == [c.text for c in direct]
    assert [r["num_generated_tokens"] for r in rows] == [c.num_generated_tokens for c in direct]
    labels = LabelStage(cfg(task="label", model=causal, choices=["yes", "no"]), engine=engine)(
        {"id": ids, "prompt": prompts}).to_pylist()
    assert [r["label"] for r in labels] == [c.label for c in engine.score_choices(prompts, ["yes", "no"])]
    clf_dir = tiny_model("sequence_classification")
    clf = Engine.from_pretrained(clf_dir, max_batch_size=4, dtype="float32", device="cpu")
    got = ClassifyStage(cfg(task="classify", model=clf_dir), engine=clf)({"id": ids, "prompt": prompts}).to_pylist()
    assert [r["label"] for r in got] == [c.label for c in clf.classify(prompts)]
    assert set(r["label"] for r in got) <= set(LABELS.values())


# ---- planning and the shard runner (no Ray) ----------------------------------------------
def test_plan_names_splits_and_bad_shards(tmp_path):
    write_shards(str(tmp_path / "in"), shards=2, rows=10, row_group_size=3)
    plan = make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert [u.output_name for u in plan.units] == ["part-00000.parquet", "part-00001.parquet"]
    plan = make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), rows_per_unit=6))
    assert [u.output_name for u in plan.units][:2] == ["part-00000.rg00000-00001.parquet",
                                                       "part-00000.rg00002-00003.parquet"]
    assert sum(u.num_rows for u in plan.units) == 20
    (tmp_path / "in" / "part-00002.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / "in" / "part-00003.parquet")
    with pytest.raises(InputError) as e:
        make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    assert "part-00002.parquet" in str(e.value) and "part-00003.parquet" in str(e.value)
    assert "missing column(s) ['prompt']" in str(e.value)
    plan = make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), on_bad_input="skip"))
    assert len(plan.units) == 2 and len(plan.bad_inputs) == 2
    globbed = make_plan(cfg(input=f"file://{tmp_path}/in/part-0000[01].parquet", output=str(tmp_path / "o2")))
    assert [u.output_name for u in globbed.units] == ["part-00000.parquet", "part-00001.parquet"]
    with pytest.raises(FileNotFoundError, match="matches no input files"):
        make_plan(cfg(input=str(tmp_path / "nothing"), output=str(tmp_path / "out")))


def test_shard_runner_commits_once_and_resume_plan_skips(tmp_path):
    write_shards(str(tmp_path / "in"), shards=3, rows=7, row_group_size=4)
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), keep_columns=["meta"])
    plan = make_plan(config)
    engine = FakeEngine()
    runner = UnitRunner(config, plan.schema, engine=engine)
    first = [runner.run_unit(u) for u in plan.units[:2]]
    assert [s["status"] for s in first] == ["done", "done"] and first[0]["rows_out"] == 7
    assert not glob.glob(str(tmp_path / "out" / "_tmp" / "*"))  # temp files committed away
    calls = len(engine.calls)
    assert runner.run_unit(plan.units[0])["status"] == "skipped" and len(engine.calls) == calls

    plan2 = make_plan(config)  # a rerun: two committed, one to do
    assert sorted(plan2.done) == ["part-00000.parquet", "part-00001.parquet"]
    assert [u.output_name for u in plan2.todo] == ["part-00002.parquet"]
    assert plan2.done["part-00000.parquet"]["rows_out"] == 7
    table = pq.read_table(tmp_path / "out" / "part-00001.parquet")
    assert table.column_names == ["id", "meta", *("completion finish_reason num_prompt_tokens "
                                                   "num_generated_tokens parsed logprobs prompt_logprobs error_kind "
                                                   "error").split()]
    assert table["id"].to_pylist() == list(range(7, 14))

    with pytest.raises(ConfigError, match="different settings"):
        make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), keep_columns=["meta"],
                      max_new_tokens=9))
    with pytest.raises(ConfigError, match="--overwrite"):
        make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), keep_columns=["meta"], resume=False))
    (tmp_path / "out" / "stranger.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="would not write"):
        make_plan(config)


def test_partial_output_is_not_treated_as_done(tmp_path):
    write_shards(str(tmp_path / "in"), shards=1, rows=3)
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "part-00000.parquet").write_bytes(b"PAR1 truncated garbage")
    plan = make_plan(config)
    assert plan.done == {} and len(plan.todo) == 1
    stats = UnitRunner(config, plan.schema, engine=FakeEngine()).run_unit(plan.todo[0])
    assert stats["status"] == "done" and pq.read_table(tmp_path / "out" / "part-00000.parquet").num_rows == 3


def test_an_output_whose_footer_stats_do_not_describe_it_is_not_done(tmp_path):
    """Rows deleted from a committed output by a tool that copies the footer's key-value metadata
    along: the stats still say rows_out=3 over 2 rows. Such a file is not a committed output
    (its rows and stats disagree), and the rerun redoes it."""
    write_shards(str(tmp_path / "in"), shards=1, rows=3)
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan = make_plan(config)
    assert UnitRunner(config, plan.schema, engine=FakeEngine()).run_unit(plan.units[0])["status"] == "done"
    path = tmp_path / "out" / "part-00000.parquet"
    table, footer = pq.read_table(path), pq.ParquetFile(path).metadata.metadata[b"persimmon_batch"]
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table.slice(0, 2))
        writer.add_key_value_metadata({b"persimmon_batch": footer})
    assert json.loads(pq.ParquetFile(path).metadata.metadata[b"persimmon_batch"])["rows_out"] == 3
    again = make_plan(config)
    assert again.done == {} and [u.output_name for u in again.todo] == ["part-00000.parquet"]
    stats = UnitRunner(config, again.schema, engine=FakeEngine()).run_unit(again.todo[0])
    assert stats["status"] == "done" and pq.read_table(path).num_rows == 3


def test_input_rewritten_with_the_same_size_and_mtime_is_stale(tmp_path):
    """A file copied over with its size and modification time kept (cp -p, rsync -t of another
    version: one prompt edited to one of the same length) is told apart by its content hash."""
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"id": i, "prompt": f"prompt number {i}"}) for i in range(4)]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    config = cfg(input=str(src), output=str(tmp_path / "out"))
    plan = make_plan(config)
    runner = UnitRunner(config, plan.schema, engine=FakeEngine())
    assert runner.run_unit(plan.units[0])["status"] == "done"
    assert list(make_plan(config).done) == ["a.parquet"]
    before = os.stat(src / "a.jsonl")
    lines[2] = lines[2].replace("number 2", "number 7")
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    os.utime(src / "a.jsonl", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(src / "a.jsonl")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = make_plan(config)
    assert again.done == {} and [s["output"] for s in again.stale] == ["a.parquet"]
    assert runner.run_unit(again.todo[0])["status"] == "done"
    assert "7 rebmun" in pq.read_table(tmp_path / "out" / "a.parquet")["completion"].to_pylist()[2]


def test_failed_unit_is_reported_not_raised(tmp_path):
    paths = write_shards(str(tmp_path / "in"), shards=1, rows=3)
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan = make_plan(config)
    os.remove(paths[0])
    stats = UnitRunner(config, plan.schema, engine=FakeEngine()).run_unit(plan.units[0])
    assert stats["status"] == "failed" and "part-00000.parquet" in stats["error"]
    assert not os.path.exists(tmp_path / "out" / "part-00000.parquet")


# ---- CLI and job configs ---------------------------------------------------------------------
def test_cli_help_for_every_command(capsys):
    for command in ("generate", "classify", "label", "demo"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-new-tokens" in out and "--choices" in out and "--s3-endpoint" in out
    assert "--s3-secret-access-key" not in out


@pytest.mark.parametrize("argv", [["generate", "--batch-size", "abc"], ["generate", "--max-new-tokens", "nan"],
                                  ["plan", "label", "--on-bad-input", "maybe"], ["capacity", "--gpu", "V100"],
                                  ["generate", "--no-such-flag"]])
def test_cli_a_flag_argparse_refuses_is_one_line(capsys, argv):
    """A value of the wrong type printed argparse's usage block first: 45 lines for a task
    command, the one line naming the flag at the very end."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--input", "i", "--output", "o", "--model", "m"] if argv[0] != "capacity" else argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "error: " in err and "--help" in err, err
    assert argv[-2] in err if argv[-1] != "--no-such-flag" else "--no-such-flag" in err


def test_cli_config_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: label\ninput: s3://b/in/\noutput: s3://b/out/\nmodel: /m\nchoices: [pos, neg]\n"
                    "prompt-template: \"Review: {prompt}\\nSentiment:\"\nreplicas: 2,8\n")
    args = build_parser().parse_args(["label", "--config", str(path), "--batch-size", "16",
                                      "--no-resume", "--overwrite"])
    c = config_from_args(args)
    assert (c.task, c.choices, c.batch_size, c.resume, c.overwrite, c.replica_range) == \
        ("label", ["pos", "neg"], 16, False, True, (2, 8))
    assert c.prompt_template == "Review: {prompt}\nSentiment:"
    args = build_parser().parse_args(["label", "--input", "a", "--output", "b", "--model", "m",
                                      "--choices", "x,y", "--prompt-template", "T: {prompt}\\nA:"])
    assert config_from_args(args).prompt_template == "T: {prompt}\nA:"
    with pytest.raises(ConfigError, match="not 'generate'"):
        config_from_args(build_parser().parse_args(["generate", "--config", str(path)]))
    assert main(["generate", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o"),
                 "--model", str(tmp_path / "no-model")]) == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "jobs", "configs", "*.yaml"))))
def test_example_job_configs_validate(path):
    import yaml

    raw = yaml.safe_load(open(path))
    named = os.path.basename(path).split("_")[0]  # label_reviews_8b.yaml is a label job
    args = build_parser().parse_args([named, "--config", path])
    config = config_from_args(args)  # validates every field, strictly typed
    assert raw["task"] == config.task == named
    assert config.model_identity is None and config.dtype == "bfloat16"  # shipped for GPUs


def test_summary_mentions_failures():
    report = {"task": "generate", "complete": False, "rows_in": 3, "rows_written": 2, "rows_with_error": 1,
              "errors_by_kind": {"empty_prompt": 1}, "wall_time_s": 1.0, "tokens_per_s": 2.0,
              "units": {"done": 1, "skipped": 0, "failed": 1, "bad": 0},
              "this_run": {"startup_s": 0.5, "tokens_generated": 2}, "output": "o",
              "failed_units": [{"input": "in/x.parquet", "error": "OSError: nope"}], "bad_inputs": []}
    text = summary(report)
    assert "INCOMPLETE" in text and "in/x.parquet" in text and "empty_prompt" in text
    # a lost node and how each replica ended (pipeline/report.py) reach the console too
    report["nodes_lost"] = {"nodes": ["a1b2c3d4e5f6a7b8"], "units_retried": 2, "rows_retried": 40}
    report["replicas"] = [{"node_id": "n1", "ended": "finished"}, {"node_id": "a1b2c3d4e5f6a7b8", "ended": "node_lost"},
                          {"node_id": "n1", "ended": "finished"}]
    text = summary(report)
    assert "1 lost mid-run (a1b2c3d4e5f6); 2 unit(s), 40 row(s) run again elsewhere" in text
    assert "replicas 3 on 2 node(s): 2 finished, 1 node lost" in text


def test_label_calibration_and_few_shot_with_the_real_tiny_engine(tmp_path):
    """--calibrate divides softmax(scores) by p_cf, the mean distribution the template gives
    content-free inputs (computed here by hand from the engine's own scores); --examples
    prefixes every row, is computed once per replica, and changes the scores exactly as
    prepending the rendered text would."""
    from pipeline.attachments import load_examples

    causal = tiny_model("causal")
    engine = Engine.from_pretrained(causal, max_batch_size=8, device="cpu")
    choices = ["yes", "no", "maybe"]
    template = "Q: {prompt}\nA:"
    base = dict(task="label", choices=choices, prompt_template=template)
    plain = LabelStage(cfg(**base), engine=engine)
    calib = LabelStage(cfg(**base, calibrate=True), engine=engine)
    prompts = PROMPTS[:6]
    batch = {"id": list(range(6)), "prompt": prompts}
    raw, cal = plain(batch).to_pylist(), calib(batch).to_pylist()
    free = engine.score_choices([template.format(prompt=x) for x in ["N/A", "", "[MASK]"]], choices)

    def softmax(xs):
        e = [math.exp(x - max(xs)) for x in xs]
        return [v / sum(e) for v in e]

    p_cf = [sum(softmax(r.scores)[k] for r in free) / 3 for k in range(3)]
    assert [math.exp(x) for x in calib.log_p_cf] == pytest.approx(p_cf)
    for r, c in zip(raw, cal):
        assert c["scores"] == approx_forward(r["scores"], engine.config, keys=64) and r["probs"] == pytest.approx(softmax(r["scores"]))
        q = [p / w for p, w in zip(softmax(c["scores"]), p_cf)]
        q = [v / sum(q) for v in q]
        assert c["probs"] == pytest.approx(q)
        assert c["label"] == choices[max(range(3), key=q.__getitem__)]
        top = sorted(q, reverse=True)
        assert c["margin"] == pytest.approx(top[0] - top[1])
    assert max(abs(a - b) for r, c in zip(raw, cal) for a, b in zip(r["probs"], c["probs"])) > 1e-3  # it acts
    # few-shot: the rendered examples prefix every row
    ex = tmp_path / "ex.jsonl"
    ex.write_text('{"prompt": "is it red", "label": "yes"}\n\n{"prompt": "is it blue", "label": "no"}\n')
    config = load_examples(cfg(**base, examples=str(ex)).validate())
    prefix = "Q: is it red\nA: yes\n\nQ: is it blue\nA: no\n\n"
    fresh = Engine.from_pretrained(causal, max_batch_size=8, device="cpu", kv_block_size=4)
    few = LabelStage(config, engine=fresh)
    assert few.prefix == prefix and fresh.stats()["pinned_prefix_tokens"] >= 4 * (len(fresh.tokenizer.encode(prefix)) // 4)
    after_pin = fresh.stats()["prefill_tokens"]
    got = few(batch).to_pylist()
    direct = engine.score_choices([prefix + template.format(prompt=p) for p in prompts], choices)
    assert [g["scores"] for g in got] == [approx_forward(d.scores, engine.config, keys=128) for d in direct]
    # the prefix's full blocks were not computed again for the rows
    pinned = fresh.stats()["pinned_prefix_tokens"]
    naive = sum(len(fresh.tokenizer.encode(prefix + template.format(prompt=p))) for p in prompts) * 3
    assert fresh.stats()["prefill_tokens"] - after_pin <= naive - len(prompts) * pinned
    # mean normalisation reaches the engine
    mean = LabelStage(cfg(**base, choice_score="mean"), engine=engine)(batch).to_pylist()
    direct_mean = engine.score_choices([template.format(prompt=p) for p in prompts], choices, normalize="mean")
    assert [m["scores"] for m in mean] == [approx_forward(d.scores, engine.config, keys=64) for d in direct_mean]


def test_label_options_are_validated(tmp_path):
    from pipeline.attachments import load_examples

    with pytest.raises(ConfigError, match="calibrate"):
        cfg(calibrate=True).validate()  # generate
    with pytest.raises(ConfigError, match="choice_score"):
        cfg(task="label", choices=["a", "b"], choice_score="max").validate()
    with pytest.raises(ConfigError, match="low_margin"):
        cfg(task="label", choices=["a", "b"], low_margin=2).validate()
    with pytest.raises(ConfigError, match="content_free_inputs"):
        cfg(task="label", choices=["a", "b"], calibrate=True, content_free_inputs=[""]).validate()
    with pytest.raises(ConfigError, match="examples"):
        cfg(task="classify", examples="x.jsonl").validate()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "label": "c"}\n')
    with pytest.raises(ConfigError, match="row 1 has label 'c'"):
        load_examples(cfg(task="label", choices=["a", "b"], examples=str(bad)).validate())
    bad.write_text('{"prompt": "p", "label": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        load_examples(cfg(task="label", choices=["a", "b"], examples=str(bad)).validate())
    with pytest.raises(ConfigError, match="cannot read"):
        load_examples(cfg(task="label", choices=["a", "b"], examples=str(tmp_path / "missing.jsonl")).validate())


@pytest.mark.parametrize("key,value,kind", [("overwrite", "false", "true or false"), ("max_new_tokens", "64", "an integer"),
                                            ("temperature", True, "a number"), ("kv_cache_gib", "2", "a number"),
                                            ("batch_size", 2.0, "an integer"), ("choices", 5, "a list")])
def test_config_values_are_typed_strictly(tmp_path, key, value, kind, capsys):
    """A quoted "false" for overwrite would be truthy and delete finished work; a quoted number
    used to end in a traceback. Both are exit 2 naming the key, from YAML and Python alike."""
    with pytest.raises(ConfigError, match=f"{key}: expected {kind}"):
        cfg(**{key: value}).validate()
    job = tmp_path / "job.yaml"
    job.write_text(f"task: generate\ninput: in\noutput: out\nmodel: m\n{key}: {json.dumps(value)}\n")
    assert main(["generate", "--config", str(job)]) == 2
    assert f"{key}: expected {kind}" in capsys.readouterr().err


def test_binary_ids_are_compared_exactly(tmp_path):
    """b"a" and b"a\\x00" are different ids; a repeated b"a" is a duplicate (pandas crashed here)."""
    src = tmp_path / "in"
    src.mkdir()
    ids = [b"a", b"a\x00", b"a", b"\x00", b"a\x00\x00", None]
    pq.write_table(pa.table({"id": pa.array(ids, pa.binary()), "prompt": ["p"] * 6}), src / "part-0.parquet")
    plan = make_plan(cfg(input=str(src), output=str(tmp_path / "out")).validate())
    assert plan.ids["duplicate_rows"] == 1 and plan.ids["null_ids"] == 1 and plan.ids["duplicate_ids"] == 1
    errors = dict(plan.units[0].row_errors)
    assert set(errors) == {2, 5} and str(errors[2]).startswith("duplicate_id: id b'a' already appeared at part-0.parquet row 0")


def test_markers_and_hidden_files_are_never_inputs_and_input_inside_output_is_refused(tmp_path):
    src = tmp_path / "in"
    write_shards(str(src), shards=2, rows=3)
    for junk in ("_SUCCESS", ".part-00000.parquet.crc", "_tmp/part-9.parquet", ".hidden/part-8.parquet"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_bytes(b"not parquet")
    for pattern in (str(src), str(src / "*"), str(src / "**")):
        plan = make_plan(cfg(input=pattern, output=str(tmp_path / "out"), check_duplicate_ids=False).validate())
        assert [os.path.basename(u.input_uri) for u in plan.units] == ["part-00000.parquet", "part-00001.parquet"]
        assert not plan.bad_inputs
    with pytest.raises(ConfigError, match="is inside the output directory"):
        make_plan(cfg(input=str(src), output=str(tmp_path)).validate())


def test_credentials_in_urls_are_refused_and_masked(capsys):
    for flag in ("--input", "--output", "--model"):
        argv = ["generate", "--input", "in", "--output", "out", "--model", "m"]
        argv[argv.index(flag) + 1] = "s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@bucket/path"
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "carries credentials" in err and "s3://***@bucket/path" in err
        assert "wJalrXUtnFEMIsecret" not in err and "AKIAEXAMPLE" not in err


def test_label_review_findings(tmp_path, capsys):
    """Found in review: unquoted YAML yes/no choices, calibration underflow, a few-shot prefix
    longer than the context, JSONL with U+2028 / a BOM, --stop with a grammar, settings that do
    not affect a task's results refusing its resume, a --low-margin changed on resume."""
    from pipeline.attachments import check_prefix_length, load_examples
    from pipeline.stages import calibrated

    job = tmp_path / "job.yaml"
    job.write_text("task: label\ninput: in\noutput: out\nmodel: m\nchoices: [yes, no]\n")
    assert main(["label", "--config", str(job)]) == 2
    assert "choices: every item must be a string, got bool True" in capsys.readouterr().err
    # calibration in log space: a content-free probability of 1e-400 (0.0 as a float) is no division by zero
    probs = calibrated([-1.0, -900.0], [0.0, -921.0])
    assert all(math.isfinite(p) for p in probs) and probs[1] == pytest.approx(1 / (1 + math.exp(-1.0 + 900 - 921)))
    # examples: a JSON string holding U+2028, and a UTF-8 BOM, are fine
    ex = tmp_path / "ex.jsonl"
    ex.write_bytes('\ufeff{"prompt": "a\u2028b", "label": "yes"}\n{"prompt": "c", "label": "no"}\n'.encode())
    loaded = load_examples(cfg(task="label", choices=["yes", "no"], examples=str(ex)).validate())
    assert [e["prompt"] for e in loaded.examples] == ["a\u2028b", "c"]
    # a prefix longer than the context: exit 2 on the driver, a clear error in the engine
    ex.write_text("".join(f'{{"prompt": "{"word " * 40}", "label": "yes"}}\n' for _ in range(10)))
    long = load_examples(cfg(task="label", choices=["yes", "no"], examples=str(ex), model=tiny_model("causal"),
                             max_seq_len=128).validate())
    with pytest.raises(ConfigError, match="few-shot prefix has .* tokens"):
        check_prefix_length(long)
    engine = Engine.from_pretrained(tiny_model("causal"), max_seq_len=128, device="cpu")
    with pytest.raises(ValueError, match="must be shorter than max_seq_len=128"):
        engine.pin_prefix("word " * 400)
    # a stop string would cut structured output mid-way
    with pytest.raises(ConfigError, match="stop"):
        cfg(json_schema={"type": "object"}, stop=['"']).validate()
    with pytest.raises(ValueError, match="stop strings"):
        SamplingParams(regex="a+", stop=["b"])


def test_resume_checks_only_what_the_task_depends_on(tmp_path):
    """A label rerun with other --stop or (without --calibrate) other content-free inputs resumes;
    another --choice-score is refused; a rerun with
    another --low-margin counts its close calls again from the files."""
    import dataclasses

    src = tmp_path / "in"
    write_shards(str(src), shards=2, rows=4)
    base = cfg(task="label", choices=["yes", "no"], input=str(src), output=str(tmp_path / "out"),
               low_margin=0.9).validate()
    plan = make_plan(base)
    runner = UnitRunner(base, plan.schema, engine=FakeEngine())
    for unit in plan.units:
        assert runner.run_unit(unit)["status"] == "done"
    for change in (dict(stop=["x"]), dict(content_free_inputs=["none"]), dict(max_new_tokens=9)):
        assert len(make_plan(dataclasses.replace(base, **change)).done) == 2, change
    with pytest.raises(ConfigError, match="choice_score='sum' \\(now 'mean'\\)"):
        make_plan(dataclasses.replace(base, choice_score="mean"))
    with pytest.raises(ConfigError, match="calibrate=False \\(now True\\)"):
        make_plan(dataclasses.replace(base, calibrate=True))
    again = make_plan(base)
    assert len(again.done) == 2
    from pipeline.api import build_report

    margins = read_output(str(tmp_path / "out"))["margin"].to_pylist()  # all 0.462 with the echo engine
    assert sum(m < 0.9 for m in margins) == 8 and sum(m < 0.3 for m in margins) == 0
    assert build_report(base, again, {}, None, 0.0, 1.0)["labels"]["low_margin_rows"] == 8
    report = build_report(dataclasses.replace(base, low_margin=0.3), again, {}, None, 0.0, 1.0)
    assert report["labels"]["low_margin_rows"] == 0 and report["labels"]["low_margin"] == 0.3

    # the same with JSONL outputs: margins are counted again from the JSON lines
    as_jsonl = dataclasses.replace(base, output=str(tmp_path / "out_jsonl"), output_format="jsonl").validate()
    plan = make_plan(as_jsonl)
    runner = UnitRunner(as_jsonl, plan.schema, engine=FakeEngine())
    assert [runner.run_unit(u)["status"] for u in plan.units] == ["done", "done"]
    again = make_plan(dataclasses.replace(as_jsonl, low_margin=0.5))
    assert len(again.done) == 2
    assert build_report(dataclasses.replace(as_jsonl, low_margin=0.5), again, {}, None, 0.0, 1.0)["labels"][
        "low_margin_rows"] == 8  # 0.462 < 0.5 on every row


@pytest.mark.parametrize("change", [dict(max_new_tokens=5), dict(temperature=0.9), dict(top_k=40), dict(top_p=0.8),
                                    dict(stop=["."]), dict(seed=2), dict(truncate=None), dict(logprobs=2),
                                    dict(prompt_logprobs=True)],
                         ids=lambda c: next(iter(c)))
def test_a_generate_rerun_with_other_sampling_settings_is_refused(tmp_path, change):
    """Every sampling setting changes what a generate row's result is: a rerun with another
    value would mix two runs' rows in one output directory, so it is refused by name."""
    import dataclasses

    write_shards(str(tmp_path / "in"), shards=1, rows=3)
    base = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), temperature=0.7, top_k=20,
               top_p=0.95, seed=1, truncate="left").validate()
    plan = make_plan(base)
    assert UnitRunner(base, plan.schema, engine=FakeEngine()).run_unit(plan.units[0])["status"] == "done"
    assert len(make_plan(base).done) == 1
    (name,) = change
    with pytest.raises(ConfigError, match=f"different settings: {name}="):
        make_plan(dataclasses.replace(base, **change))


def test_no_check_duplicate_ids_runs_every_row(tmp_path):
    """README: --no-check-duplicate-ids skips the id check: repeated and null ids are run like
    any row (one output row each) and the report says the ids were not checked."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2, 1, None], pa.int64()), "prompt": ["a", "b", "c", "d"]}),
                   src / "part-0.parquet")
    checked = make_plan(cfg(input=str(src), output=str(tmp_path / "o1")).validate())
    assert sorted(i for i, _ in checked.units[0].row_errors) == [2, 3]
    config = cfg(input=str(src), output=str(tmp_path / "o2"), check_duplicate_ids=False).validate()
    plan = make_plan(config)
    assert plan.units[0].row_errors == [] and not plan.ids
    UnitRunner(config, plan.schema, engine=FakeEngine()).run_unit(plan.units[0])
    out = pq.read_table(tmp_path / "o2" / "part-0.parquet")
    assert out["id"].to_pylist() == [1, 2, 1, None] and out["error"].null_count == 4
    assert out["completion"].to_pylist() == ["a", "b", "c", "d"]  # the echo engine reverses one letter
    from pipeline.api import build_report

    assert build_report(config, make_plan(config), {}, None, 0.0, 1.0)["ids"] == {"checked": False}


def test_rerun_review_findings(tmp_path, monkeypatch, caplog):
    """Found in review: same-size rewrites, ids claimed by an added file, outputs reached through
    a symlink, glob semantics, a runner skipping an output of other settings, corrupt and lost
    leases, secrets holding '/', an output path that is a file, directories named with '['."""
    import dataclasses
    import time

    from pipeline import lease as lease_mod
    from pipeline.storage import glob_regex

    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["ab", "cd"]}), src / "b.parquet")
    config = cfg(input=str(src), output=str(tmp_path / "out")).validate()
    plan = make_plan(config)
    runner = UnitRunner(config, plan.schema, engine=FakeEngine())
    assert runner.run_unit(plan.units[0])["status"] == "done"
    # the same bytes count, other rows (swapped): stale, not skipped
    time.sleep(0.01)
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["cd", "ab"]}), src / "b.parquet")
    again = make_plan(config)
    assert [s["output"] for s in again.stale] == ["b.parquet"] and not again.done
    assert runner.run_unit(again.units[0])["status"] == "done"
    # a file added before it in input order claims id 1: b's unit is stale, its id 1 row gets the error
    pq.write_table(pa.table({"id": [1], "prompt": ["zz"]}), src / "a.parquet")
    grown = make_plan(config)
    assert [s["output"] for s in grown.stale] == ["b.parquet"]
    for unit in grown.todo:
        runner.run_unit(unit)
    b = pq.read_table(tmp_path / "out" / "b.parquet").to_pylist()
    assert error_of(b[1]) == ("duplicate_id", "id 1 already appeared at a.parquet row 0")
    # a runner never skips an output written with other settings (a late replica of another run)
    other = UnitRunner(dataclasses.replace(config, max_new_tokens=9), plan.schema, engine=FakeEngine())
    assert other.run_unit(grown.units[1])["status"] == "done"
    # output inside the input tree through a symlink: still excluded
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    via_link = make_plan(cfg(input=str(src), output=str(tmp_path / "link" / "out"), check_duplicate_ids=False).validate())
    via_link_runner = UnitRunner(via_link_cfg := cfg(input=str(src), output=str(tmp_path / "link" / "out"),
                                                      check_duplicate_ids=False).validate(),
                                  via_link.schema, engine=FakeEngine())
    for unit in via_link.units:
        via_link_runner.run_unit(unit)
    assert sorted(u.output_name for u in make_plan(via_link_cfg).units) == ["a.parquet", "b.parquet"]
    # globs as shells read them
    r = glob_regex("/d/**/*.parquet")
    assert r.match("/d/top.parquet") and r.match("/d/x/y.parquet") and not glob_regex("/d/*.parquet").match("/d/x/y.parquet")
    # a directory whose name has glob characters is taken as it is
    odd = tmp_path / "run[1]"
    odd.mkdir()
    pq.write_table(pa.table({"id": [5], "prompt": ["x"]}), odd / "p.parquet")
    assert [u.output_name for u in make_plan(cfg(input=str(odd), output=str(tmp_path / "o9")).validate()).units] == \
        ["p.parquet"]
    # leases: a corrupt file is taken over; a run whose lease was taken over notices
    out = resolve_local(tmp_path / "leased")
    os.makedirs(tmp_path / "leased")
    (tmp_path / "leased" / "_lease.json").write_text("")
    with caplog.at_level("WARNING"):
        held = lease_mod.Lease(out, "runA").acquire()
    assert "unreadable" in caplog.text
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.05)
    held.release()
    held = lease_mod.Lease(out, "runA").acquire()
    (tmp_path / "leased" / "_lease.json").write_text(json.dumps({"run_id": "runB", "heartbeat_at": time.time()}))
    deadline = time.time() + 5
    while held.lost is None and time.time() < deadline:
        time.sleep(0.02)
    assert held.lost and "runB" in held.lost
    held.release()
    # an output path that is a file
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        lease_mod.Lease(resolve_local(tmp_path / "afile"), "r").acquire()
    # a secret with '/' (AWS secret keys have them) is refused and masked
    with pytest.raises(ConfigError) as e:
        cfg(input="s3://AKIAXX:abc/def+ghi@bucket/in").validate()
    assert "s3://***@bucket/in" in str(e.value) and "def+ghi" not in str(e.value)


def resolve_local(path):
    from pipeline.storage import resolve

    return resolve(str(path), cfg())


def test_model_identity_sees_a_layer_retrained_in_the_middle(tmp_path):
    """Weights changed in one middle layer only (a partial fine-tune: embeddings and head
    frozen) change the model's identity; a copy of the same files does not."""
    import struct

    from safetensors.torch import load_file

    from model.tiny import build_tiny_checkpoint
    from pipeline.modelcheck import model_identity

    big = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4)
    path = build_tiny_checkpoint(str(tmp_path / "m"), config_overrides=big)
    assert os.path.getsize(os.path.join(path, "model.safetensors")) > 8e6  # windows do not cover it all
    before = model_identity(cfg(model=path))
    shutil.copytree(path, tmp_path / "copy")
    assert model_identity(cfg(model=str(tmp_path / "copy"))) == before
    # rewrite one middle tensor's bytes in place: same size, same header, only its data changes
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    begin, end = header["model.layers.4.mlp.dense_h_to_4h.weight"]["data_offsets"]
    weights = load_file(file)["model.layers.4.mlp.dense_h_to_4h.weight"] * 1.01
    with open(file, "r+b") as f:
        f.seek(8 + n + begin)
        f.write(weights.numpy().tobytes())
    assert load_file(file)["model.layers.4.mlp.dense_h_to_4h.weight"].equal(weights)
    assert model_identity(cfg(model=path)) != before


def test_each_task_is_declared_once_and_everything_reads_the_declaration():
    from pipeline.plan import result_fields
    from pipeline.stages import TASK_SETTINGS, TASKS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name, task in TASKS.items():
        kw = {"choices": ["yes", "no"]} if name == "label" else {}
        stage = task(cfg(task=name, **kw), engine=FakeEngine())
        out = stage({"id": [1, 2], "prompt": ["a", "b"]})
        assert out.schema.names == ["id", *(c for c, _ in task.columns)]
        assert [out.schema.field(c).type for c, _ in task.columns] == [t for _, t in task.columns]
        flags = {a.dest for a in sub[name]._actions}
        assert set(task.settings) <= flags and not (TASK_SETTINGS - set(task.settings)) & flags, name
        assert set(task.result_settings) <= set(result_fields(cfg(task=name, **kw)))
        assert sub[name].description == task.description


def test_a_relative_model_dir_is_fixed_on_the_driver(tmp_path, monkeypatch):
    from pipeline.hub import pin
    from pipeline.storage import model_location

    (tmp_path / "owner").mkdir()
    shutil.copytree(tiny_model("causal"), tmp_path / "owner" / "tiny")
    monkeypatch.chdir(tmp_path)
    pinned = pin(cfg(model="owner/tiny"))  # a local directory here (it looks like a hub id too)
    assert pinned.model_dir == str(tmp_path / "owner" / "tiny") and pinned.model_commit is None
    monkeypatch.chdir("/")  # a replica elsewhere loads the same directory, never a hub snapshot
    assert model_location(pinned.model, pinned).path == str(tmp_path / "owner" / "tiny")
    with pytest.raises(ConfigError, match="model_dir: set by the driver"):
        PipelineConfig.from_dict({**pinned.public_dict()})  # a report's config pasted back


def test_yaml_keys_yield_to_flags_and_secrets_in_lists_are_masked(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nmodel: m\nrows_per_unit: 2\n")
    args = build_parser().parse_args(["generate", "--config", str(path), "--rows-per-unit", "5"])
    assert config_from_args(args).rows_per_unit == 5  # the flag wins, as for every option
    secret = PipelineConfig(task="generate", input=["s3://AKIA:topse,cret@b/x.parquet", "s3://b/y.parquet"],
                            output="o", model="m")
    assert "topse" not in repr(secret) and "topse" not in json.dumps(secret.public_dict())
    one = PipelineConfig(task="generate", input="s3://AKIA:topse,cret@b/x.parquet", output="o", model="m")
    with pytest.raises(ConfigError, match="carries credentials"):  # refused whole, not split at its comma
        one.validate()
