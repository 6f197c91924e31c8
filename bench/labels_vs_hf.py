"""Label scoring: the engine's score_choices vs the naive way, on the same model and rows.

    python bench/labels_vs_hf.py [--rows 64] [--choices 3,8] [--fewshot-tokens 256] [--repeats 2]

Model: bench/engine_vs_hf.py's (vocab 32000, hidden 1024, 8 layers, random, fp32). Rows: a
few-shot prefix of --fewshot-tokens random tokens shared by every row, then 16-96 tokens of
the row's own; choices of 1-4 tokens each (token ids: the model has no tokenizer).
- naive: transformers, one forward over prefix + row + choice for every (row, choice) pair,
  batched 16 pairs at a time (right-padded), summing the choice tokens' log-probabilities;
- engine: one Engine kept across calls (as a replica is), the prefix pinned once
  (`pin_prefix`), then `score_choices` over all rows: each pair is a scoring row sharing the
  prefix's and its prompt's KV blocks.
Prints one JSON line: rows/s of both per choice count (median of alternating runs), the ratio,
and the largest score difference.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_vs_hf import BENCH_CONFIG, build, hf_twin, median  # noqa: E402
from kv_budget import cpu_flags  # noqa: E402

from model import Engine  # noqa: E402


def naive_scores(hf, prefix, rows, choices, batch=16):
    pairs = [(r, c) for r in rows for c in choices]
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        seqs = [prefix + r + c for r, c in chunk]
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        with torch.no_grad():
            logp = hf(ids, attention_mask=mask).logits.float().log_softmax(-1)
        for b, (r, c) in enumerate(chunk):
            start = len(prefix) + len(r)
            out.append(sum(logp[b, start - 1 + j, t].item() for j, t in enumerate(c)))
    k = len(choices)
    return [out[i * k:(i + 1) * k] for i in range(len(rows))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--choices", default="3,8")
    ap.add_argument("--fewshot-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(torch.float32)
    hf = hf_twin(model)
    V = BENCH_CONFIG["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, V, (args.fewshot_tokens,), generator=g).tolist()

    def new_rows():  # fresh rows for every run: no run reuses another's cached blocks
        return [torch.randint(3, V, (int(torch.randint(16, 97, (1,), generator=g)),), generator=g).tolist()
                for _ in range(args.rows)]
    engine = Engine(model, None, max_batch_size=256, max_seq_len=1024)
    engine.pin_prefix(prefix)
    result = {"bench": "labels_vs_hf", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "rows": args.rows,
              "fewshot_tokens": args.fewshot_tokens, "pinned_prefix_tokens": engine.stats()["pinned_prefix_tokens"]}
    for k in [int(x) for x in args.choices.split(",")]:
        choices = [torch.randint(3, V, (1 + i % 4,), generator=g).tolist() for i in range(k)]
        engine.score_choices([prefix + r for r in new_rows()[:2]], choices)  # warm-up
        eng_s, hf_s, diff = [], [], 0.0
        for _ in range(args.repeats):
            rows = new_rows()
            prompts = [prefix + r for r in rows]
            t0 = time.perf_counter()
            ours = engine.score_choices(prompts, choices)
            eng_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = naive_scores(hf, prefix, rows, choices)
            hf_s.append(time.perf_counter() - t0)
            diff = max(diff, max(abs(a - b) for o, r in zip(ours, ref) for a, b in zip(o.scores, r)))
        result[f"choices_{k}"] = {
            "engine_rows_per_s": round(args.rows / median(eng_s), 2), "naive_rows_per_s": round(args.rows / median(hf_s), 2),
            "speedup": round(median([h / e for h, e in zip(hf_s, eng_s)]), 2),
            "engine_runs_s": [round(x, 2) for x in eng_s], "naive_runs_s": [round(x, 2) for x in hf_s],
            "max_abs_score_diff": round(diff, 6)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
