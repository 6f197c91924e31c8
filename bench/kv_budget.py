"""What a paged KV pool buys under one fixed memory budget: rows in flight and tokens/s.

    python bench/kv_budget.py [--dtype float32] [--budget-slots 8] [--repeats 2]

Model: bench/engine_vs_hf.py's (vocab 32000, hidden 1024, 8 layers, 16 heads, random).
Workload, heavy-tailed as real datasets are: 44 prompts of 16-128 tokens and 4 of 1000-1200,
192 new tokens each (eos ignored), greedy.
Budget: the KV memory that `--budget-slots` static slots of max_seq_len (the longest prompt +
192) would take, i.e. what the old engine reserved for that many rows. The same engine runs the
workload twice per repeat, alternating:
- capped: rows in flight limited to those static slots (what a slot cache could run);
- paged: rows admitted by free KV blocks (up to 256), growing block by block, preempting when
  the pool runs out.
Prefix caching is off, so the second run of a pair cannot reuse the first's prompts. Prints one
JSON line: tokens/s (median), rows in flight peak, preemptions, the ratios, and whether both
runs produced identical tokens.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_vs_hf import BENCH_CONFIG, build, median  # noqa: E402

from model import Engine, SamplingParams, capacity  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
        return sorted(f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2")))
    except (OSError, StopIteration):
        return []


def workload(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (44,), generator=g).tolist() + torch.randint(1000, 1201, (4,), generator=g).tolist()
    order = torch.randperm(len(lengths), generator=g).tolist()  # the long ones spread through the queue
    return [torch.randint(3, BENCH_CONFIG["vocab_size"], (lengths[i],), generator=g).tolist() for i in order]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--budget-slots", type=int, default=8, help="static slots whose memory is the KV budget")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    model = build(dtype)
    prompts = workload()
    max_seq_len = max(len(p) for p in prompts) + args.new_tokens
    per_token = capacity.kv_bytes_per_token(model.config, dtype)
    budget_tokens = args.budget_slots * max_seq_len
    engine = Engine(model, None, max_batch_size=256, max_seq_len=max_seq_len, prefix_caching=False,
                    kv_cache_gib=(budget_tokens + 2 * 16) * per_token / 2**30)  # + the 2 reserved blocks
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    total_new = len(prompts) * args.new_tokens
    runs = {"capped": [], "paged": []}
    outputs = {}
    for _ in range(args.repeats):
        for mode in ("capped", "paged"):
            engine.scheduler.max_rows = args.budget_slots if mode == "capped" else 256
            before = engine.stats()
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            seconds = time.perf_counter() - t0
            after = engine.stats()
            engine.scheduler.rows_in_flight_peak = 0  # per run
            runs[mode].append({"seconds": round(seconds, 2), "tokens_per_s": round(total_new / seconds, 1),
                               "rows_in_flight_peak": after["rows_in_flight_peak"],
                               "preemptions": after["preemptions"] - before["preemptions"]})
            outputs.setdefault(mode, [o.token_ids for o in out])
    result = {"bench": "kv_budget", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "dtype": args.dtype,
              "prompts": len(prompts), "prompt_tokens": sum(len(p) for p in prompts), "new_tokens": args.new_tokens,
              "max_seq_len": max_seq_len, "kv_budget_tokens": engine.stats()["kv_tokens_capacity"],
              "kv_budget_mib": round(engine.stats()["kv_cache_bytes"] / 2**20, 1), "static_slots": args.budget_slots}
    for mode, rs in runs.items():
        result[mode] = {"tokens_per_s": median([r["tokens_per_s"] for r in rs]),
                        "rows_in_flight_peak": max(r["rows_in_flight_peak"] for r in rs),
                        "preemptions": max(r["preemptions"] for r in rs), "runs": rs}
    result["tokens_per_s_ratio"] = round(result["paged"]["tokens_per_s"] / result["capped"]["tokens_per_s"], 2)
    result["rows_in_flight_ratio"] = round(result["paged"]["rows_in_flight_peak"]
                                           / result["capped"]["rows_in_flight_peak"], 2)
    result["identical_tokens"] = outputs["capped"] == outputs["paged"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
