"""Fault injection, part 5: a replica that dies right after committing its unit, before the
driver hears of it. Ray restarts the replica and retries the unit; the retry finds the output
committed by this run, for this input and these settings, and skips it: the unit is counted
once, as done, and its file is not written twice.

The death is deterministic: this module's Ray workers start with a `sitecustomize` (first on
their PYTHONPATH) that wraps `pipeline.unit_runner.commit` so the first commit of the chosen unit
ends the process (os._exit) once the file is in place. No hook exists in the product code.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, assert_exactly_once, local_ray, patched_env, read_output, tiny_model

from pipeline import run_generate

pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SITECUSTOMIZE = textwrap.dedent('''
    import importlib.abc, importlib.util, os, sys

    TARGET, MARKER = os.environ.get("PB_DIE_AFTER_COMMIT"), os.environ.get("PB_DIE_MARKER")

    class _Wrap(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "pipeline.unit_runner" or not TARGET:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                real = module.commit

                def commit(tmp, final):
                    real(tmp, final)
                    if final.uri.endswith("/" + TARGET) and not os.path.exists(MARKER):
                        open(MARKER, "w").write(str(os.getpid()))
                        os._exit(1)  # dead after the commit, before returning the unit's stats
                module.commit = commit
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Wrap())
''')


@pytest.fixture(scope="module")
def dying_ray(tmp_path_factory):
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = hook / "died"
    path = os.pathsep.join([str(hook), REPO, os.environ.get("PYTHONPATH", "")])
    with patched_env(PYTHONPATH=path, PB_DIE_AFTER_COMMIT="part-00001.parquet", PB_DIE_MARKER=str(marker)):
        with local_ray():  # workers inherit this environment
            yield marker


def test_a_replica_that_dies_after_committing_is_counted_once(dying_ray, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    ids = {}
    for k in range(3):
        ids[k] = list(range(10 * k, 10 * k + 6))
        pq.write_table(pa.table({"id": pa.array(ids[k], pa.int64()),
                                 "prompt": [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in ids[k]]}),
                       src / f"part-{k:05d}.parquet")
    report = run_generate(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1,
                          max_new_tokens=4, max_unit_retries=2)
    assert dying_ray.exists()  # the replica really died after committing part-00001
    assert report["complete"], report
    assert report["units"] == {"total": 3, "done": 3, "skipped": 0, "failed": 0, "bad": 0, "stale": 0}
    assert_exactly_once(read_output(str(out))["id"].to_pylist(), [i for v in ids.values() for i in v])
    footer = json.loads(pq.ParquetFile(out / "part-00001.parquet").metadata.metadata[b"persimmon_batch"])
    assert footer["run_id"] == report["this_run"]["run_id"]
    # committed once, by the attempt that died: the file is older than the death
    assert os.stat(out / "part-00001.parquet").st_mtime_ns <= os.stat(dying_ray).st_mtime_ns
    # Ray's retry of the unit found it committed and skipped it: no rows were computed again
    assert report["rows_retried"] == 0 and report["this_run"]["rows_processed"] == 18
    digest = hashlib.sha256((out / "part-00001.parquet").read_bytes()).hexdigest()
    again = run_generate(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1,
                         max_new_tokens=4)
    assert again["complete"] and again["units"]["skipped"] == 3
    assert hashlib.sha256((out / "part-00001.parquet").read_bytes()).hexdigest() == digest
