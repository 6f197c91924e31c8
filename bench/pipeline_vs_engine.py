"""The same rows through the Ray pipeline and through the bare engine: what does Ray Data cost?

    python bench/pipeline_vs_engine.py [--model DIR] [--rows 256] [--shards 4]
                                       [--max-new-tokens 32] [--batch-size 64] [--max-num-seqs 16]
                                       [--dtype float32]
                                       [--repeats 3]

Without --model a small random Persimmon (hidden 512, 8 layers, real tokenizer) is built in a
temp dir. Both sides run greedy on the same prompts with the same engine settings; the pipeline
uses one replica given every core, so both have the same compute. Prints one JSON line:

- engine_s          bare `Engine.generate` over all rows (after load; chunks of the size the
                    pipeline feeds), in this process with Ray up and idle; mean of the runs
                    just before and after each pipeline run, as this box's speed drifts
- ray_init_s        starting local Ray (once per process; not per run)
- pipeline_wall_s   `run_generate` with Ray up: plan, replica start, model load, inference, commit
- model_load_s      `Engine.from_pretrained` inside the replica
- replica_start_s   (per run) run start -> replica process up, before its model load
- startup_s         run start -> first shard starts (planning, actor process, model load)
- overhead_pct      (pipeline_wall_s - startup_s) / engine_s - 1: reading, Arrow conversion,
                    scheduling, writing and committing, once replicas are up (target <= 15 %)
- overhead_incl_startup_pct   (pipeline_wall_s - model_load_s) / engine_s - 1: also counts the
                    fixed cost of planning and starting the replica process
- replica_*_s       (per run) the replica's time by part, summed over units: its engine calls,
                    reading input, writing output, the rest (the stage's conversions, heartbeats);
                    between_units_s: time between one unit's end and the next one's start
- engine_in_replica_pct   replica_engine_s / engine_s - 1: the same engine work, slower or not
                    inside the replica (threads, other processes on the cores)
- outputs_match     pipeline completions == engine completions
Top-level timings and percentages are medians over --repeats runs (each run's numbers in `runs`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCH_MODEL = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   max_position_embeddings=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: build a small random one)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per engine call (the pipeline's --batch-size)")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="rows in flight (the pipeline's --max-num-seqs)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="pipeline runs, each between two bare-engine runs")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from model import Engine, SamplingParams
    from pipeline import PipelineConfig, init_ray, run_generate
    from pipeline.demo import SAMPLE_PROMPTS

    work = tempfile.mkdtemp(prefix="pb-bench-")
    model_dir = args.model
    if model_dir is None:
        from model.tiny import build_tiny_checkpoint

        model_dir = build_tiny_checkpoint(os.path.join(work, "model"), config_overrides=BENCH_MODEL)
    prompts = [f"{SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]} #{i}" for i in range(args.rows)]
    per = -(-args.rows // args.shards)
    os.makedirs(os.path.join(work, "in"))
    for s in range(args.shards):
        ids = list(range(s * per, min(args.rows, (s + 1) * per)))
        pq.write_table(pa.table({"id": ids, "prompt": [prompts[i] for i in ids]}),
                       os.path.join(work, "in", f"part-{s:05d}.parquet"))
    cores = os.cpu_count() or 1
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # ---- bare engine ------------------------------------------------------------------------
    t = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, max_batch_size=args.max_num_seqs, dtype=args.dtype, device=device)
    engine_load_s = time.perf_counter() - t
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    chunk = args.batch_size  # rows per engine call, as the pipeline hands them over

    def bare_engine():
        t = time.perf_counter()
        out = []
        for s in range(args.shards):  # the pipeline's order: shard by shard, chunk by chunk
            shard = prompts[s * per:(s + 1) * per]
            for i in range(0, len(shard), chunk):
                out += engine.generate(shard[i:i + chunk], params)
        return out, time.perf_counter() - t

    # ---- pipeline, alternating with the bare engine ------------------------------------------
    # This box's speed drifts by 10-30 % between runs a minute apart, so each pipeline run is
    # compared with the mean of the bare-engine runs just before and just after it.
    t = time.perf_counter()
    init_ray(PipelineConfig(input="-", output="-", model="-"))
    ray_init_s = time.perf_counter() - t
    direct, engine_prev = bare_engine()
    tokens = sum(c.num_generated_tokens for c in direct)
    runs = []
    for k in range(args.repeats):
        out_dir = os.path.join(work, f"out{k}")
        config = PipelineConfig(task="generate", input=os.path.join(work, "in"), output=out_dir,
                                model=model_dir, replicas=1, num_cpus_per_replica=cores, batch_size=args.batch_size,
                                max_num_seqs=args.max_num_seqs,
                                max_new_tokens=args.max_new_tokens, dtype=args.dtype, progress=False)
        t = time.perf_counter()
        report = run_generate(config)
        wall = time.perf_counter() - t
        _, engine_next = bare_engine()
        engine_s = (engine_prev + engine_next) / 2
        out = pq.read_table(out_dir).sort_by("id")
        units = [json.loads(pq.ParquetFile(os.path.join(out_dir, f)).metadata.metadata[b"persimmon_batch"])
                 for f in sorted(os.listdir(out_dir)) if f.endswith(".parquet")]
        startup_s, load_s = report["this_run"]["startup_s"], report["this_run"]["model_load_s"]
        runs.append({
            "engine_s": round(engine_s, 3), "pipeline_wall_s": round(wall, 3), "startup_s": startup_s,
            "model_load_s": load_s, "replica_start_s": report["this_run"]["replica_start_s"],
            "processing_s": round(max(u["finished_at"] for u in units) - min(u["started_at"] for u in units), 3),
            # the replica's time by part, summed over its units: engine calls, reading, writing
            "replica_engine_s": round(sum(u["engine_seconds"] for u in units), 3),
            "replica_read_s": round(sum(u["read_seconds"] for u in units), 3),
            "replica_write_s": round(sum(u["write_seconds"] for u in units), 3),
            "replica_other_s": round(sum(u["seconds"] - u["engine_seconds"] - u["read_seconds"] - u["write_seconds"]
                                         for u in units), 3),
            "between_units_s": round(max(u["finished_at"] for u in units) - min(u["started_at"] for u in units)
                                     - sum(u["seconds"] for u in units), 3),
            "engine_in_replica_pct": round(100 * (sum(u["engine_seconds"] for u in units) / engine_s - 1), 1),
            "overhead_pct": round(100 * ((wall - startup_s) / engine_s - 1), 1),
            "overhead_incl_startup_pct": round(100 * ((wall - load_s) / engine_s - 1), 1),
            "outputs_match": out["completion"].to_pylist() == [c.text for c in direct],
            "complete": report["complete"],
        })
        engine_prev = engine_next

    def median(key):
        values = sorted(r[key] for r in runs)
        return values[len(values) // 2]

    print(json.dumps({
        "bench": "pipeline_vs_engine", "device": device, "cpu": platform.processor() or platform.machine(),
        "cores": cores, "torch_threads": torch.get_num_threads(), "dtype": args.dtype,
        "model": "random hidden 512 x 8 layers" if args.model is None else args.model,
        "rows": args.rows, "shards": args.shards, "batch_size": args.batch_size, "max_num_seqs": args.max_num_seqs,
        "max_new_tokens": args.max_new_tokens, "tokens_generated": tokens, "repeats": args.repeats,
        "engine_load_s": round(engine_load_s, 3), "ray_init_s": round(ray_init_s, 3),
        "engine_s": median("engine_s"), "pipeline_wall_s": median("pipeline_wall_s"),
        "startup_s": median("startup_s"), "model_load_s": median("model_load_s"),
        "overhead_pct": median("overhead_pct"), "overhead_incl_startup_pct": median("overhead_incl_startup_pct"),
        "engine_in_replica_pct": median("engine_in_replica_pct"),
        "outputs_match": all(r["outputs_match"] for r in runs), "complete": all(r["complete"] for r in runs),
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
