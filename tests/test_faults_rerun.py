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

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, assert_exactly_once, read_output, tiny_model

from model import Engine, SamplingParams
from pipeline import run_generate
from pipeline.cli import main

pytestmark = pytest.mark.ray


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
    assert first["complete"] and first["units"]["total"] == 2
    again = run_generate(**args)  # the outputs now sit in the input tree: not inputs
    assert again["complete"] and again["units"] == {"total": 2, "done": 0, "skipped": 2, "failed": 0, "bad": 0,
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
    assert report["complete"] and report["units"]["stale"] == 1 and report["units"]["done"] == 1
    assert [s["output"] for s in report["stale_units"]] == ["part-00001.parquet"]
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
    footer = json.loads(pq.ParquetFile(tmp_path / "out" / "part-00000.parquet").metadata.metadata[b"persimmon_batch"])
    from pipeline import PipelineConfig
    from pipeline.modelcheck import model_identity

    now = model_identity(PipelineConfig(input="-", output="-", model=str(model)))
    assert footer["result_config"]["model_identity"] == now  # recomputed with the new weights
    assert main(argv + ["--dtype", "float32"]) == 0  # what auto means on CPU replicas: the same run
    assert main(argv + ["--dtype", "bfloat16"]) == 2  # another dtype: a result-affecting setting
    assert "dtype='float32' (now 'bfloat16')" in capsys.readouterr().err


def test_adding_a_partition_keeps_output_names_and_resumes(ray_local, tmp_path):
    src, out = tmp_path / "events", tmp_path / "out"
    write(str(src / "date=2024-01-01" / "part-0.parquet"), list(range(5)))
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=3)
    assert run_generate(**args)["complete"]
    assert outputs(out) == ["date=2024-01-01__part-0.parquet"]
    write(str(src / "date=2024-01-02" / "part-0.parquet"), list(range(5, 9)))
    report = run_generate(**args)
    assert report["complete"] and report["units"]["skipped"] == 1 and report["units"]["done"] == 1
    assert outputs(out) == ["date=2024-01-01__part-0.parquet", "date=2024-01-02__part-0.parquet"]
    assert_exactly_once(read_output(str(out))["id"].to_pylist(), list(range(9)))


def _driver(tmp_path, args: dict):
    """The CLI as a separate process attached to this module's Ray, as a user runs it."""
    import subprocess
    import sys

    import ray

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--ray-address", f"127.0.0.1:{port}"]
    cmd += [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": repo, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = open(tmp_path / "driver.log", "wb")
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT), tmp_path / "driver.log"


@pytest.mark.parametrize("sig,code", [("SIGTERM", 1), ("SIGINT", 130)])
def test_signal_stops_the_driver_with_a_report_and_the_rerun_finishes(ray_local, tmp_path, sig, code):
    import json
    import signal
    import time

    src, out = tmp_path / "in", tmp_path / "out"
    for k in range(6):
        write(str(src / f"part-{k:05d}.parquet"), list(range(40 * k, 40 * k + 40)))
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=12,
                batch_size=4)
    driver, log = _driver(tmp_path, args)
    try:
        deadline = time.time() + 120
        while not (out.exists() and outputs(out)):  # stop it once work is under way
            assert driver.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        driver.send_signal(getattr(signal, sig))
        assert driver.wait(timeout=60) == code, log.read_text(errors="replace")[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    report = json.loads((out / "_run_report.json").read_text())
    assert report["complete"] is False and report["interrupted"] == sig
    assert report["error"].startswith(f"interrupted by {sig}")
    assert report["units"]["done"] < 6 and not (out / "_lease.json").exists()
    final = run_generate(**{k: v for k, v in args.items()})
    assert final["complete"]
    assert_exactly_once(read_output(str(out))["id"].to_pylist(), list(range(240)))


def test_a_second_run_on_a_leased_output_is_refused(tmp_path, capsys):
    import json
    import socket
    import time

    write(str(tmp_path / "in" / "part-00000.parquet"), [1, 2])
    (tmp_path / "out").mkdir()
    lease = {"run_id": "abc123", "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time() - 5,
             "heartbeat_at": time.time(), "expires_after_s": 60}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(lease))
    argv = ["generate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
            tiny_model("causal"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "in use by run abc123" in err and f"pid {os.getpid()}" in err
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["run_id"] == "abc123"  # untouched
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".parquet")]


def test_a_stale_lease_is_taken_over(ray_local, tmp_path, caplog):
    import json
    import time

    write(str(tmp_path / "in" / "part-00000.parquet"), [1, 2])
    (tmp_path / "out").mkdir()
    dead = {"run_id": "gone42", "host": "elsewhere", "pid": 1, "started_at": time.time() - 900,
            "heartbeat_at": time.time() - 600, "expires_after_s": 60}
    (tmp_path / "out" / "_lease.json").write_text(json.dumps(dead))
    with caplog.at_level("WARNING"):
        report = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model("causal"),
                              replicas=1, max_new_tokens=2)
    assert report["complete"] and "taking over the lease of run gone42" in caplog.text
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_a_pickle_checkpoint_that_needs_code_is_refused_on_the_driver(tmp_path, capsys):
    import argparse

    import torch

    model = tmp_path / "legacy"
    shutil.copytree(tiny_model("causal"), model)
    from safetensors.torch import load_file

    state = load_file(str(model / "model.safetensors"))
    os.remove(model / "model.safetensors")
    torch.save({**state, "args": argparse.Namespace(lr=1.0)}, model / "pytorch_model.bin")  # not allow-listed
    write(str(tmp_path / "in" / "part-00000.parquet"), [1])
    argv = ["generate", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", str(model)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights_only=True" in err[0] and "convert them to safetensors" in err[0]
