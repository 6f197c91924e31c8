"""build_processor: a task on any Ray Dataset (from_items, read_json, read_csv, from_pandas), with
preprocess / postprocess, per-row errors as data, results equal to the bare engine's, and
nothing started before the Dataset is consumed. The replica class first, on hand-built batches
without Ray; then real runs on one local Ray (tiny models)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
from pipeline_fixtures import PROMPTS, tiny_model

from model import Engine, SamplingParams
from pipeline import ConfigError, PipelineConfig, build_processor
from pipeline.processor import ReplicaStage

LONG = "word " * 600  # more tokens than the tiny model's 512 positions


def causal_config(**kw) -> PipelineConfig:
    return PipelineConfig.for_processor("generate", model=tiny_model("causal"), max_new_tokens=4, **kw)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(tiny_model("causal"), max_batch_size=8, dtype="float32", device="cpu")


# ---- without Ray ----------------------------------------------------------------------------
def test_settings_are_a_runs_less_its_files():
    with pytest.raises(ConfigError, match="^input, output: a processor runs on the Dataset it is given"):
        PipelineConfig.for_processor("generate", model="m", input="in/", output="out/")
    with pytest.raises(ConfigError, match=r"unknown config keys: max_new_token \(did you mean max_new_tokens\?\)"):
        PipelineConfig.for_processor("generate", model="m", max_new_token=3)
    with pytest.raises(ConfigError, match="^model: is required"):
        build_processor("generate")  # checked on the driver, before Ray starts
    with pytest.raises(ConfigError, match="choices: label needs at least two choices"):
        build_processor("label", model=tiny_model("causal"), choices=["yes"])


def test_preprocess_errors_are_rows(engine):
    def preprocess(row):
        if row["kind"] == "none":
            return None
        return {"id": row["id"], "prompt": row["text"].strip(), "temperature": row["t"]}

    stage = ReplicaStage(causal_config(), preprocess, engine=engine)
    batch = pa.table({"id": ["a", "b", "c", "d", "e"], "kind": ["ok", "none", "ok", "ok", "ok"],
                      "text": ["hello there", "x", None, LONG, "fine"], "t": [None, None, None, None, -1.0]})
    rows = stage(batch).to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert [(r["error_kind"], r["error"]) for r in rows] == [
        (None, None),
        ("preprocess_error", "TypeError: preprocess returned a NoneType, not a row (a dict)"),
        ("preprocess_error", "AttributeError: 'NoneType' object has no attribute 'strip'"),
        ("prompt_too_long", "prompt has 2401 tokens, more than the 511 this engine's max_seq_len=512 allows "
                            "(use truncate='left')"),
        ("invalid_sampling", "temperature: must be >= 0, got -1.0"),
    ]
    assert rows[0]["completion"] == engine.generate(["hello there"], SamplingParams(max_new_tokens=4))[0].text


def test_rows_without_a_prompt_column_fail_naming_it(engine):
    stage = ReplicaStage(causal_config(), engine=engine)
    with pytest.raises(ValueError, match=r"the Dataset's rows have no 'prompt' column \(they have \['text'\]\): "
                                         "set prompt_column="):
        stage(pa.table({"text": ["a"]}))
    typo = ReplicaStage(causal_config(), lambda row: {"promt": row["text"]}, engine=engine)
    with pytest.raises(ValueError, match="preprocess's rows have no 'prompt' column"):
        typo(pa.table({"text": ["a"]}))
    # a batch whose every row failed in preprocess is error rows, not a missing column
    broken = ReplicaStage(causal_config(), lambda row: {"prompt": row["missing"]}, engine=engine)
    assert broken(pa.table({"text": ["a"]}))["error"].to_pylist() == ["KeyError: 'missing'"]


# ---- on Ray ---------------------------------------------------------------------------------
@pytest.mark.ray
def test_from_items_with_preprocess_matches_engine(ray_local, engine):
    """A Hugging Face datasets-style row ({"text", "label"}) through preprocess; a non-string and
    an over-long text come back as error rows; greedy output equals Engine.generate's."""
    import ray

    items = [{"idx": i, "text": p, "label": i % 2} for i, p in enumerate(PROMPTS)]
    items += [{"idx": 100, "text": 42, "label": 0}, {"idx": 101, "text": LONG, "label": 1}]
    processor = build_processor(
        "generate", model=tiny_model("causal"), max_new_tokens=5, batch_size=3, keep_columns=["gold"],
        preprocess=lambda row: {"id": row["idx"], "prompt": row["text"], "gold": row["label"]},
        postprocess=lambda row: {**row, "chars": len(row["completion"] or "")})
    # one block: Ray Data holds a column of mixed types as Python objects within a block (it
    # refuses to unify blocks of str and int columns before any of our code runs)
    rows = {r["id"]: r for r in processor(ray.data.from_items(items, override_num_blocks=1)).take_all()}
    assert sorted(rows) == [*range(len(PROMPTS)), 100, 101]
    direct = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5))
    assert [rows[i]["completion"] for i in range(len(PROMPTS))] == [c.text for c in direct]
    assert [rows[i]["chars"] for i in range(len(PROMPTS))] == [len(c.text) for c in direct]
    assert [rows[i]["gold"] for i in range(len(PROMPTS))] == [i % 2 for i in range(len(PROMPTS))]
    assert (rows[100]["error_kind"], rows[100]["error"]) == ("invalid_prompt", "expected a string, got int")
    assert rows[101]["error_kind"] == "prompt_too_long" and rows[101]["completion"] is None
    assert all(rows[i]["error"] is None for i in range(len(PROMPTS)))


@pytest.mark.ray
def test_read_json_and_read_csv(ray_local, tmp_path, engine):
    """Files read by Ray Data's own readers, with per-row sampling columns (a CSV cell is text)."""
    import ray

    (tmp_path / "q.jsonl").write_text('{"id": "j1", "prompt": "hello"}\n{"id": "j2", "prompt": "world"}\n')
    (tmp_path / "q.csv").write_text("id,question,max_new_tokens\nc1,first,2\nc2,second,\n")
    processor = build_processor("generate", model=tiny_model("causal"), max_new_tokens=4)
    json_rows = {r["id"]: r for r in processor(ray.data.read_json(str(tmp_path / "q.jsonl"))).take_all()}
    csv_rows = {r["id"]: r for r in build_processor("generate", model=tiny_model("causal"), max_new_tokens=4,
                                                    prompt_column="question")(
        ray.data.read_csv(str(tmp_path / "q.csv"))).take_all()}
    greedy = engine.generate(["hello", "world", "first", "second"], SamplingParams(max_new_tokens=4))
    assert [json_rows["j1"]["completion"], json_rows["j2"]["completion"]] == [greedy[0].text, greedy[1].text]
    assert csv_rows["c1"]["num_generated_tokens"] == 2 and csv_rows["c1"]["completion"] == \
        engine.generate(["first"], SamplingParams(max_new_tokens=2))[0].text
    assert csv_rows["c2"]["completion"] == greedy[3].text  # an empty cell keeps the processor's setting


@pytest.mark.ray
def test_classify_filtered_by_a_result_column(ray_local):
    import pandas as pd
    import ray

    processor = build_processor("classify", model=tiny_model("sequence_classification"), batch_size=4)
    ds = processor(ray.data.from_pandas(pd.DataFrame({"id": range(len(PROMPTS)), "prompt": PROMPTS})))
    positive = sorted(r["id"] for r in ds.filter(lambda r: r["label"] == "positive").take_all())
    direct = Engine.from_pretrained(tiny_model("sequence_classification"), device="cpu").classify(PROMPTS)
    assert positive == [i for i, c in enumerate(direct) if c.label == "positive"]
    assert 0 < len(positive) < len(PROMPTS)  # the filter did something


@pytest.mark.ray
def test_nothing_starts_before_consumption(ray_local, tmp_path):
    """Building the processor and applying it start no replica: the pool's CPUs stay free and
    preprocess is never called, until the Dataset is consumed. The caller's Dataset keeps its
    DataContext; the result's carries the pool's settings."""
    import ray

    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 30  # replicas of earlier tests are released asynchronously
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    calls = tmp_path / "calls"

    def preprocess(row):
        with open(calls, "a") as f:
            f.write(row["text"] + "\n")
        return {"prompt": row["text"]}

    source = ray.data.from_items([{"text": "a b c"}, {"text": "d e f"}])
    processor = build_processor("label", model=tiny_model("causal"), choices=["yes", "no"], replicas=2,
                                num_cpus_per_replica=2, replica_start_timeout_s=120, preprocess=preprocess)
    ds = processor(source).filter(lambda r: r["margin"] >= 0)
    time.sleep(2)
    assert ray.available_resources().get("CPU", 0) == total and not calls.exists()
    assert ds.context.wait_for_min_actors_s == 120 and source.context.wait_for_min_actors_s != 120
    rows = ds.take_all()
    assert sorted(calls.read_text().split("\n")) == ["", "a b c", "d e f"]
    assert [r["id"] for r in rows] == [None, None] and {r["label"] for r in rows} <= {"yes", "no"}


@pytest.mark.ray
def test_score_filtered_by_perplexity_and_joined_back(ray_local, tmp_path, engine):
    """The README's two compositions on the score task: keep the texts under a perplexity
    threshold, and join the scores back to the source rows by id (Ray's join uses polars)."""
    import ray

    pytest.importorskip("polars", reason="Ray Data's Dataset.join needs polars")
    source = ray.data.from_items([{"id": i, "text": p, "topic": f"t{i % 3}"} for i, p in enumerate(PROMPTS)])
    scores = build_processor("score", model=tiny_model("causal"), prompt_column="text", batch_size=4)(source)
    direct = engine.score(PROMPTS)
    threshold = sorted(r.perplexity for r in direct)[len(PROMPTS) // 2]
    kept = scores.filter(lambda row: row["error"] is None and row["perplexity"] < threshold).take_all()
    assert sorted(r["id"] for r in kept) == [i for i, r in enumerate(direct) if r.perplexity < threshold]
    assert 0 < len(kept) < len(PROMPTS)
    full = source.join(scores, join_type="inner", num_partitions=2, on=("id",)).take_all()
    assert sorted((r["id"], r["text"], r["topic"]) for r in full) == \
        [(i, p, f"t{i % 3}") for i, p in enumerate(PROMPTS)]
    for r in full:
        assert r["perplexity"] == pytest.approx(direct[r["id"]].perplexity, rel=1e-6)
