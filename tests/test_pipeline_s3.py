"""Input, output and model on s3:// served by a local moto server (127.0.0.1 only).

Ray starts before the S3 credentials are put in the driver's environment, so the replicas can
only reach the store through the settings the pipeline ships to them, as on a real cluster.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from pipeline_fixtures import (patched_env, all_prompts, moto_s3, read_output, s3_filesystem, tiny_model, upload_dir,
                               write_shards)

from model import Engine, SamplingParams
from pipeline import run_generate

pytestmark = pytest.mark.ray
SHARDS, ROWS = 4, 4


@pytest.fixture(scope="module")
def s3(ray_local):
    with moto_s3() as server, patched_env(AWS_ACCESS_KEY_ID=server["AWS_ACCESS_KEY_ID"],
                                          AWS_SECRET_ACCESS_KEY=server["AWS_SECRET_ACCESS_KEY"],
                                          PERSIMMON_S3_ENDPOINT=server["endpoint"]):
        fs = s3_filesystem(server)
        write_shards(f"{server['bucket']}/in", shards=SHARDS, rows=ROWS, fs=fs)
        upload_dir(tiny_model("causal"), fs, f"{server['bucket']}/models/tiny")
        yield {**server, "fs": fs}


def test_generate_on_s3_exactly_once_and_resume(s3, tmp_path):
    b, fs = s3["bucket"], s3["fs"]
    cache = str(tmp_path / "cache")
    kwargs = dict(input=f"s3://{b}/in/", output=f"s3://{b}/out", model=f"s3://{b}/models/tiny",
                  replicas=2, max_new_tokens=5, batch_size=4, model_cache_dir=cache)
    report = run_generate(**kwargs)
    assert report["complete"], report
    assert report["this_run"]["replicas"] == 2 and report["units"]["done"] == SHARDS

    ids, prompts = all_prompts(SHARDS, ROWS)
    table = read_output(f"{b}/out", fs=fs).sort_by("id")
    assert Counter(table["id"].to_pylist()) == Counter(ids)
    direct = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, device="cpu").generate(
        prompts, SamplingParams(max_new_tokens=5))
    assert table["completion"].to_pylist() == [c.text for c in direct]

    # the model was fetched once into the node cache, completely
    cached = [d for d in os.listdir(cache) if not d.endswith(".lock")]
    assert len(cached) == 1 and os.path.exists(os.path.join(cache, cached[0], ".complete"))
    # no secret in the report, in the object store or returned
    with fs.open_input_stream(f"{b}/out/_run_report.json") as f:
        saved = f.read().decode()
    assert s3["AWS_SECRET_ACCESS_KEY"] not in saved + json.dumps(report)
    assert json.loads(saved)["config"]["s3_endpoint"] == s3["endpoint"]

    # resume: drop one committed object, rerun, only that shard is recomputed
    fs.delete_file(f"{b}/out/part-00002.parquet")
    report = run_generate(**kwargs)
    assert report["complete"] and report["units"]["done"] == 1 and report["units"]["skipped"] == SHARDS - 1
    table = read_output(f"{b}/out", fs=fs)
    assert Counter(table["id"].to_pylist()) == Counter(ids)
    names = [i.base_name for i in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(f"{b}/out", recursive=True))]
    assert not [n for n in names if n.endswith(".tmp")], names  # temp objects cleaned up
