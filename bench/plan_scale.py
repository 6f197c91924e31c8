"""Planning at scale: 10 million rows in 2,000 Parquet files, and resume over 10,000 committed
outputs. Prints one JSON object: for each case the planning process's peak RSS and wall time,
the plan's own step timings, and the CPU they came from.

    python bench/plan_scale.py --cache DIR [--rows 10000000] [--files 2000] [--ids string|int]
                               [--duplicates 5] [--committed 10000] [--sample-rows 2000]
                               [--cases rows,resume] [--baseline CHECKOUT]

Inputs are written once into --cache, a directory per shape, reused while its `.complete`
marker is there:

- rows: `--files` Parquet files holding `--rows` rows in all (one row group each; ids
  "row-000001234" or int64; prompts cycled from a few short ones), with `--duplicates` ids
  planted again in later files. The plan must name exactly those.
- resume: `--committed` one-row input files and their committed outputs, written by the
  product's own `UnitRunner` with the tiny model's engine (footers with the unit's statistics,
  input fingerprint and result config, as a real run writes them; a few minutes, once).

Each case runs `persimmon-batch plan generate ... --json` in a fresh child process (its prompt
statistics included); peak RSS is that child's ru_maxrss (os.wait4), wall time is measured
here. `--baseline CHECKOUT` also runs `make_plan` from another checkout (e.g. /work/main, before
this benchmark existed) on the same input, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["Write a haiku about a quiet river.", "Explain why the sky is blue.",
           "Summarise this review: the food was cold and the service slow.",
           "Translate to French: where is the train station?", "List three uses of a persimmon."]


def cpu() -> dict:
    """The CPU every number here came from: model name and the flags that matter for it."""
    info = {"model": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo").read()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16") if f in flags]
        mem = next(line for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        info["mem_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def tiny_model(cache: str) -> str:
    from model.tiny import build_tiny_checkpoint

    path = os.path.join(cache, "tiny-model")
    if not os.path.exists(os.path.join(path, ".complete")):
        build_tiny_checkpoint(path, seed=0)
        open(os.path.join(path, ".complete"), "w").close()
    return path


def make_rows_input(cache: str, rows: int, files: int, ids: str, duplicates: int) -> tuple[str, list]:
    """The rows case's input directory, written once; returns it and the planted duplicates
    [(id, first file, its row, again file, its row)]."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = os.path.join(cache, f"rows{rows}-files{files}-{ids}-dup{duplicates}")
    marker = os.path.join(directory, ".complete")
    if os.path.exists(marker):
        return os.path.join(directory, "in"), json.load(open(marker))
    os.makedirs(os.path.join(directory, "in"), exist_ok=True)
    per_file = -(-rows // files)
    rng = np.random.default_rng(0)
    planted = []  # a later row takes the id of an earlier one
    for _ in range(duplicates):
        a, b = sorted(rng.choice(files, size=2, replace=False).tolist())
        planted.append((a, int(rng.integers(per_file)), b, int(rng.integers(per_file))))
    prompts = pa.array(PROMPTS)

    def id_of(row: np.ndarray):
        return pa.array(row, pa.int64()) if ids == "int" else pa.array(np.char.add("row-", np.char.zfill(
            row.astype(str), 9)))

    listed = []
    for k in range(files):
        first = k * per_file
        n = min(per_file, rows - first)
        if n <= 0:
            break
        numbers = np.arange(first, first + n, dtype=np.int64)
        for a, ra, b, rb in planted:
            if b == k:
                numbers[rb] = a * per_file + ra
        table = pa.table({"id": id_of(numbers), "prompt": prompts.take(pa.array(numbers % len(PROMPTS)))})
        pq.write_table(table, os.path.join(directory, "in", f"part-{k:05d}.parquet"), row_group_size=n)
    for a, ra, b, rb in planted:
        listed.append([f"part-{a:05d}.parquet", ra, f"part-{b:05d}.parquet", rb])
    json.dump(listed, open(marker, "w"))
    return os.path.join(directory, "in"), listed


def make_resume_input(cache: str, committed: int, model: str) -> tuple[str, str]:
    """`committed` one-row inputs and their outputs committed by UnitRunner; (input, output)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = os.path.join(cache, f"resume{committed}")
    src, out = os.path.join(directory, "in"), os.path.join(directory, "out")
    if os.path.exists(os.path.join(directory, ".complete")):
        return src, out
    os.makedirs(src, exist_ok=True)
    for k in range(committed):
        pq.write_table(pa.table({"id": pa.array([k], pa.int64()), "prompt": [PROMPTS[k % len(PROMPTS)]]}),
                       os.path.join(src, f"part-{k:05d}.parquet"))
    from model import Engine
    from pipeline import PipelineConfig
    from pipeline.api import _checked
    from pipeline.plan import make_plan
    from pipeline.unit_runner import UnitRunner
    from pipeline.storage import ensure_dir

    config = _checked(PipelineConfig(task="generate", input=src, output=out, model=model, max_new_tokens=1))
    plan = make_plan(config)
    ensure_dir(plan.output)
    runner = UnitRunner(config, plan.schema, engine=Engine.from_pretrained(model, max_batch_size=1, device="cpu"))
    for unit in plan.todo:
        if runner.run_unit(unit)["status"] != "done":
            raise RuntimeError(f"could not commit {unit.output_name}")
    open(os.path.join(directory, ".complete"), "w").close()
    return src, out


# Linux starts a forked child's ru_maxrss at its parent's RSS, so the child is forked by this
# small interpreter (a few MiB), not by the benchmark (which holds the tiny engine, torch, ...)
WRAPPER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
json.dump({"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "wall_s": round(time.perf_counter() - t0, 2),
           "exit_code": os.waitstatus_to_exitcode(status)}, open(sys.argv[1], "w"))
"""


def measure(argv: list[str], cwd: str = ROOT, env: dict | None = None) -> dict:
    """Run argv as a child: its own peak RSS (wait4's ru_maxrss), wall time, exit code, stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as numbers:
        subprocess.run([sys.executable, "-S", "-c", WRAPPER, numbers.name, *argv], stdout=out, stderr=err, cwd=cwd,
                       env={**os.environ, **(env or {})}, check=True)
        result = json.load(open(numbers.name))
        out.seek(0)
        err.seek(0)
        result["stdout"] = out.read().decode()
        if result["exit_code"] != 0:
            result["stderr"] = err.read().decode()[-2000:]
        return result


def plan_cli(src: str, out: str, model: str, sample_rows: int, *extra: str) -> dict:
    argv = [sys.executable, "-m", "pipeline.cli", "plan", "generate", "--input", src, "--output", out,
            "--model", model, "--sample-rows", str(sample_rows), "--json", *extra]
    run = measure(argv)
    plan = json.loads(run.pop("stdout")) if run["exit_code"] == 0 else None
    return {**run, "plan": plan}


def baseline(checkout: str, src: str, out: str, model: str, *settings: str) -> dict:
    """make_plan of another checkout (no `plan` command there) on the same input."""
    code = ("import dataclasses, time; t = time.perf_counter(); from pipeline import PipelineConfig; "
            "from pipeline.modelcheck import model_identity; from pipeline.plan import make_plan; "
            f"c = PipelineConfig(task='generate', input={src!r}, output={out!r}, model={model!r}"
            f"{''.join(', ' + s for s in settings)}).validate(); "
            "p = make_plan(dataclasses.replace(c, model_identity=model_identity(c))); "
            "print(len(p.units), len(p.done), p.ids.get('duplicate_rows'), round(time.perf_counter() - t, 2))")
    run = measure([sys.executable, "-c", code], cwd=checkout, env={"PYTHONPATH": checkout})
    run["units, done, duplicate_rows, make_plan_s"] = run.pop("stdout").strip()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="Where the generated inputs are kept between runs.")
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--ids", choices=("string", "int"), default="string")
    ap.add_argument("--duplicates", type=int, default=5)
    ap.add_argument("--committed", type=int, default=10_000)
    ap.add_argument("--sample-rows", type=int, default=2000)
    ap.add_argument("--cases", default="rows,resume")
    ap.add_argument("--baseline", help="Another checkout whose make_plan to measure on the same inputs.")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    cases = args.cases.split(",")
    import pyarrow

    report = {"cpu": cpu(), "python": platform.python_version(), "pyarrow": pyarrow.__version__}
    model = tiny_model(args.cache)
    if "rows" in cases:
        t0 = time.perf_counter()
        src, planted = make_rows_input(args.cache, args.rows, args.files, args.ids, args.duplicates)
        result = plan_cli(src, os.path.join(args.cache, "no-such-output"), model, args.sample_rows)
        plan = result.pop("plan")
        found = sorted([e["first"].rsplit("/", 1)[1], e["again"].rsplit("/", 1)[1]] for e in plan["ids"]["examples"])
        want = sorted([f"{a} row {ra}", f"{b} row {rb}"] for a, ra, b, rb in planted)
        report["rows"] = {
            "rows": plan["rows"], "files": plan["input_files"], "ids": args.ids, "input_ready_s": round(time.perf_counter() - t0, 1),
            **result, "plan_steps_s": plan["seconds"], "prompt_stats_s": plan["prompt_tokens"]["seconds"],
            "prompt_tokens": plan["prompt_tokens"]["tokens"], "duplicates_named": plan["ids"]["duplicate_rows"],
            "duplicates_planted": len(planted), "duplicates_match": found == want,
        }
        if args.baseline:
            report["rows"]["baseline"] = baseline(args.baseline, src, os.path.join(args.cache, "no-such-output"), model)
    if "resume" in cases:
        t0 = time.perf_counter()
        src, out = make_resume_input(args.cache, args.committed, model)
        result = plan_cli(src, out, model, args.sample_rows, "--max-new-tokens", "1")
        plan = result.pop("plan")
        report["resume"] = {
            "committed_outputs": args.committed, "input_ready_s": round(time.perf_counter() - t0, 1), **result,
            "already_committed": plan["already_committed"], "to_run": plan["to_run"],
            "plan_steps_s": plan["seconds"], "prompt_stats_s": plan["prompt_tokens"]["seconds"],
        }
        if args.baseline:
            report["resume"]["baseline"] = baseline(args.baseline, src, out, model, "max_new_tokens=1")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
