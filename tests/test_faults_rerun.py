"""Fault injection, part 4: reruns that must know what they resume. Each case ran green with
`complete: true` before and lost or duplicated rows; now every id in lands exactly once, from
the data and model the output claims.

- the output directory inside the input directory: never read back as input;
- an input file replaced between a run and its rerun (same name, other rows): recomputed and
  reported stale, the new ids appear and the old ones are gone;
- the model's weights changed in place: the rerun is refused (exit 2, naming the model), or
  recomputed with --overwrite;
- a partition directory added to the input tree: committed units keep their output names and
  are skipped, the new partition is computed.
"""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, assert_exactly_once, local_ray, read_output, tiny_model

from model import Engine, SamplingParams
from pipeline import run_generate
from pipeline.cli import main

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    with local_ray():
        yield


def write(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                             "prompt": [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in ids]}), path)


def outputs(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".parquet"))


def test_output_inside_the_input_tree_is_never_read_as_input(ray_local, tmp_path):
    src = tmp_path / "data"
    write(str(src / "part-00000.parquet"), list(range(0, 6)))
    write(str(src / "part-00001.parquet"), list(range(6, 12)))
    out = src / "labels"  # inside the input directory
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=3)
    first = run_generate(**args)
    assert first["complete"] and first["shards"]["total"] == 2
    again = run_generate(**args)  # the outputs now sit in the input tree: not inputs
    assert again["complete"] and again["shards"] == {"total": 2, "done": 0, "skipped": 2, "failed": 0, "bad": 0,
                                                     "stale": 0}
    assert outputs(out) == ["part-00000.parquet", "part-00001.parquet"]
    assert_exactly_once(read_output(str(out))["id"].to_pylist(), list(range(12)))


def test_input_replaced_between_runs_is_recomputed_and_reported_stale(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        write(str(src / f"part-{k:05d}.parquet"), list(range(10 * k, 10 * k + 5)))
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=3)
    assert run_generate(**args)["complete"]
    untouched = {f: os.stat(out / f).st_mtime_ns for f in ("part-00000.parquet", "part-00002.parquet")}
    write(str(src / "part-00001.parquet"), [100, 101, 102])  # same name, other rows
    report = run_generate(**args)
    assert report["complete"] and report["shards"]["stale"] == 1 and report["shards"]["done"] == 1
    assert [s["output"] for s in report["stale_shards"]] == ["part-00001.parquet"]
    table = read_output(str(out))
    assert_exactly_once(table["id"].to_pylist(), [0, 1, 2, 3, 4, 100, 101, 102, 20, 21, 22, 23, 24])
    assert {f: os.stat(out / f).st_mtime_ns for f in untouched} == untouched  # the others were skipped
    part = pq.read_table(out / "part-00001.parquet")
    engine = Engine.from_pretrained(tiny_model("causal"), device="cpu")
    direct = engine.generate([f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in (100, 101, 102)],
                             SamplingParams(max_new_tokens=3))
    assert part["completion"].to_pylist() == [c.text for c in direct]


def test_a_model_changed_in_place_is_refused_unless_overwrite(ray_local, tmp_path, capsys):
    from model.tiny import build_tiny_checkpoint

    model = tmp_path / "model"
    shutil.copytree(tiny_model("causal"), model)
    write(str(tmp_path / "in" / "part-00000.parquet"), list(range(4)))
    argv = ["generate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model),
            "--replicas", "1", "--max-new-tokens", "3", "--quiet"]
    assert main(argv) == 0
    build_tiny_checkpoint(str(tmp_path / "other"), seed=1)  # other weights, same file names and shapes
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model_identity" in err and "weights changed" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv + ["--dtype", "bfloat16"]) == 2  # dtype is a result-affecting setting too
    assert "dtype='auto' (now 'bfloat16')" in capsys.readouterr().err


def test_adding_a_partition_keeps_output_names_and_resumes(ray_local, tmp_path):
    src, out = tmp_path / "events", tmp_path / "out"
    write(str(src / "date=2024-01-01" / "part-0.parquet"), list(range(5)))
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=3)
    assert run_generate(**args)["complete"]
    assert outputs(out) == ["date=2024-01-01__part-0.parquet"]
    write(str(src / "date=2024-01-02" / "part-0.parquet"), list(range(5, 9)))
    report = run_generate(**args)
    assert report["complete"] and report["shards"]["skipped"] == 1 and report["shards"]["done"] == 1
    assert outputs(out) == ["date=2024-01-01__part-0.parquet", "date=2024-01-02__part-0.parquet"]
    assert_exactly_once(read_output(str(out))["id"].to_pylist(), list(range(9)))
