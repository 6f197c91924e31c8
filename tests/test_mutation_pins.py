"""Behaviours a planted bug once changed while every other test stayed green (issue 20's
mutation audit), each pinned here against a hand computation or a literal: calibration in the
few-shot context, a changed tokenizer refused on rerun, a live lease kept for its whole expiry,
the row-error metric counting rows, and `rows_with_error` over a resumed run."""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, tiny_model

from model import Completion, Engine
from pipeline import ConfigError, LabelStage, PipelineConfig
from pipeline.plan import make_plan
from pipeline.report import build_report
from pipeline.unit_runner import UnitRunner


def cfg(**kw) -> PipelineConfig:
    base = {"task": "generate", "input": "in", "output": "out", "model": "m", "batch_size": 4}
    if kw.get("task", "generate") == "generate":  # another task refuses a generate setting
        base["max_new_tokens"] = 4
    return PipelineConfig(**{**base, **kw})


class EchoEngine:
    """Completion = the prompt reversed, one token; no model."""

    def generate(self, prompts, params):
        return [Completion(text=p[::-1], finish_reason="stop", num_prompt_tokens=1, num_generated_tokens=1)
                for p in prompts]


def _softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_calibration_with_examples_scores_content_free_inputs_after_the_prefix(tmp_path):
    """Contextual calibration (Zhao et al.) measures the bias of the context the rows see: with
    --examples that context starts with the few-shot prefix, so the content-free inputs are
    scored as prefix + template(input). Scored without it, p_cf (and every row's probs and
    margin) came out different by up to 0.009."""
    from pipeline.attachments import load_examples

    causal = tiny_model("causal")
    engine = Engine.from_pretrained(causal, max_batch_size=8, device="cpu")
    choices, template = ["yes", "no", "maybe"], "Q: {prompt}\nA:"
    ex = tmp_path / "ex.jsonl"
    ex.write_text('{"prompt": "is it red", "label": "yes"}\n{"prompt": "is it blue", "label": "no"}\n')
    config = load_examples(cfg(task="label", choices=choices, prompt_template=template, calibrate=True,
                               examples=str(ex)).validate())
    stage = LabelStage(config, engine=Engine.from_pretrained(causal, max_batch_size=8, device="cpu"))
    prefix = "Q: is it red\nA: yes\n\nQ: is it blue\nA: no\n\n"
    assert stage.prefix == prefix

    def p_cf(context: str) -> list[float]:
        free = engine.score_choices([context + template.format(prompt=x) for x in ("N/A", "", "[MASK]")], choices)
        return [sum(_softmax(r.scores)[k] for r in free) / 3 for k in range(3)]

    in_context, bare = p_cf(prefix), p_cf("")
    assert max(abs(a - b) for a, b in zip(in_context, bare)) > 1e-4  # the prefix matters to the test
    assert [math.exp(x) for x in stage.log_p_cf] == pytest.approx(in_context, abs=1e-6)
    rows = stage({"id": [0, 1, 2], "prompt": PROMPTS[:3]}).to_pylist()
    for row in rows:
        q = [p / w for p, w in zip(_softmax(row["scores"]), in_context)]
        q = [v / sum(q) for v in q]
        assert row["probs"] == pytest.approx(q, abs=1e-6)
        top = sorted(q, reverse=True)
        assert row["margin"] == pytest.approx(top[0] - top[1], abs=1e-6)


def test_a_changed_tokenizer_is_refused_on_rerun(tmp_path):
    """tokenizer.model is part of the model's identity: a directory whose tokenizer was swapped
    (weights unchanged) does not resume outputs made with the old one."""
    from pipeline.modelcheck import model_identity

    model = tmp_path / "model"
    shutil.copytree(tiny_model("causal"), model)
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"]}), tmp_path / "a.parquet")

    def config():
        base = cfg(input=str(tmp_path / "a.parquet"), output=str(tmp_path / "out"), model=str(model))
        return PipelineConfig(**{**base.__dict__, "model_identity": model_identity(base)})

    first = config()
    plan = make_plan(first)
    assert UnitRunner(first, plan.schema, engine=EchoEngine()).run_unit(plan.units[0])["status"] == "done"
    assert list(make_plan(config()).done) == ["a.parquet"]  # the same model: resumed
    data = (model / "tokenizer.model").read_bytes()
    (model / "tokenizer.model").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ConfigError, match="model_identity=.*the model's config, tokenizer or weights changed"):
        make_plan(config())


@pytest.mark.parametrize("host", ["elsewhere", socket.gethostname()])
def test_a_live_lease_is_kept_until_it_expires(tmp_path, host):
    """A holder whose last heartbeat is 15 s old (renewed every 10 s; one missed beat) is alive
    until expires_after_s (60 s): a second run is refused. At 61 s it is taken over."""
    import os

    from pipeline.lease import Lease
    from pipeline.storage import resolve

    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    holder = {"run_id": "alive1", "host": host, "pid": os.getpid(), "started_at": now - 300,
              "heartbeat_at": now - 15, "expires_after_s": 60}
    (out / "_lease.json").write_text(json.dumps(holder))
    with pytest.raises(ConfigError, match="in use by run alive1"):
        Lease(resolve(str(out), cfg()), "second").acquire()
    assert json.loads((out / "_lease.json").read_text())["run_id"] == "alive1"
    (out / "_lease.json").write_text(json.dumps({**holder, "heartbeat_at": now - 61}))
    lease = Lease(resolve(str(out), cfg()), "second").acquire()
    try:
        assert json.loads((out / "_lease.json").read_text())["run_id"] == "second"
    finally:
        lease.release()


def test_the_row_error_metric_counts_rows_not_batches(tmp_path):
    """A batch with three bad rows of one kind adds 3 to persimmon_batch_row_errors{kind}, not 1;
    the runner hands the metric each batch's rows and error counts by kind."""
    from pipeline.metrics import ReplicaMetrics

    class Recorder:
        def __init__(self):
            self.calls = []

        def inc(self, n, tags):
            self.calls.append((n, tags))

        def observe(self, value, tags):
            pass

    metrics = ReplicaMetrics("generate")
    metrics.rows, metrics.tokens, metrics.errors, metrics.seconds = Recorder(), Recorder(), Recorder(), Recorder()
    metrics.enabled = True
    metrics.batch(5, 7, Counter({"empty_prompt": 3, "invalid_prompt": 1}), 0.5)
    assert metrics.rows.calls == [(5, {"task": "generate"})] and metrics.tokens.calls == [(7, {"task": "generate"})]
    assert sorted(metrics.errors.calls, key=lambda c: c[1]["kind"]) == [
        (3, {"task": "generate", "kind": "empty_prompt"}), (1, {"task": "generate", "kind": "invalid_prompt"})]

    pq.write_table(pa.table({"id": list(range(6)), "prompt": ["", " ", "ok", "\t", "fine", "good"]}),
                   tmp_path / "a.parquet")
    config = cfg(input=str(tmp_path / "a.parquet"), output=str(tmp_path / "out"), batch_size=4)
    plan = make_plan(config)
    runner = UnitRunner(config, plan.schema, engine=EchoEngine())
    seen = []
    runner.metrics.batch = lambda rows, tokens, kinds, seconds: seen.append((rows, dict(kinds)))
    assert runner.run_unit(plan.units[0])["rows_error"] == 3
    assert seen == [(4, {"empty_prompt": 3}), (2, {})]


def test_rows_with_error_over_a_resumed_run_counts_every_committed_row(tmp_path):
    """The report's totals cover every committed output: rows with an error in a unit an earlier
    run committed still count after the rerun, beside this run's."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt": ["", "ok", " "]}), src / "a.parquet")
    pq.write_table(pa.table({"id": [3, 4, 5], "prompt": ["fine", "", "good"]}), src / "b.parquet")
    config = cfg(input=str(src), output=str(tmp_path / "out"))
    plan = make_plan(config)
    assert UnitRunner(config, plan.schema, engine=EchoEngine()).run_unit(plan.units[0])["rows_error"] == 2
    rerun = make_plan(config)
    assert list(rerun.done) == ["a.parquet"]
    stats = UnitRunner(config, rerun.schema, engine=EchoEngine()).run_unit(rerun.todo[0])
    report = build_report(config, rerun, {"b.parquet": stats}, None, time.time(), 1.0)
    assert report["complete"] and report["rows_written"] == 6
    assert report["rows_with_error"] == 3 and report["errors_by_kind"] == {"empty_prompt": 3}
    assert report["this_run"]["rows_processed"] == 3 and report["units"]["skipped"] == 1
