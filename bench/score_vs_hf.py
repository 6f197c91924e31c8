"""Text scoring (perplexity filtering): Engine.score vs transformers' batched loss, same model and texts.

    python bench/score_vs_hf.py [--rows 64] [--min-tokens 32] [--max-tokens 512] [--hf-batch 8] [--repeats 3]

Model: bench/engine_vs_hf.py's (vocab 32000, hidden 1024, 8 layers, random, fp32; no tokenizer,
so texts are token ids, BOS first). Texts: --rows random lengths in [--min-tokens, --max-tokens].
- transformers: batches of --hf-batch texts in input order, right-padded, one forward with
  `labels` (pads -100) per batch, as a filtering script does; per-row log-likelihoods from the
  same logits (log_softmax, gather), so both sides give one number per text;
- engine: one Engine kept across calls (as a replica is); `Engine.score` over all rows.
Both run in this process after a warm-up, alternating --repeats times; rows/s are medians,
the speedup is the median of per-pair ratios. Prints one JSON line with the CPU and its flags.
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hf_scores(hf, texts, batch):
    """Per-text sum of log p(token | before) over every token after the first, batched."""
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        T = max(len(t) for t in chunk)
        ids = torch.tensor([t + [0] * (T - len(t)) for t in chunk])
        mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in chunk])
        labels = ids.masked_fill(mask == 0, -100)
        with torch.no_grad():
            res = hf(ids, attention_mask=mask, labels=labels)  # res.loss: the batch's mean NLL
            logp = res.logits[:, :-1].float().log_softmax(-1)
            target = labels[:, 1:]
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
        out += picked.sum(-1).tolist()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(torch.float32)
    hf = hf_twin(model)
    V = BENCH_CONFIG["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def new_texts(n):  # fresh texts for every run: no run reuses another's cached blocks
        lengths = torch.randint(args.min_tokens, args.max_tokens + 1, (n,), generator=g).tolist()
        return [[1] + torch.randint(3, V, (t - 1,), generator=g).tolist() for t in lengths]

    engine = Engine(model, None, max_batch_size=256, max_seq_len=1024)
    t0 = time.perf_counter()
    engine.score(new_texts(4), add_bos=False)  # warm-up (token ids carry their BOS)
    hf_scores(hf, new_texts(4), args.hf_batch)
    warmup_s = time.perf_counter() - t0
    eng_s, hf_s, diff, tokens = [], [], 0.0, 0
    for _ in range(args.repeats):
        texts = new_texts(args.rows)
        tokens = sum(len(t) for t in texts)
        t0 = time.perf_counter()
        ours = engine.score(texts, add_bos=False)
        eng_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = hf_scores(hf, texts, args.hf_batch)
        hf_s.append(time.perf_counter() - t0)
        diff = max(diff, max(abs(o.logprob - r) / max(1.0, abs(r)) for o, r in zip(ours, ref)))
    stats = engine.stats()
    print(json.dumps({
        "bench": "score_vs_hf", "device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "rows": args.rows, "tokens_per_run": tokens,
        "lengths": [args.min_tokens, args.max_tokens], "hf_batch": args.hf_batch, "warmup_s": round(warmup_s, 2),
        "engine_rows_per_s": round(args.rows / median(eng_s), 2), "hf_rows_per_s": round(args.rows / median(hf_s), 2),
        "engine_tokens_per_s": round(tokens / median(eng_s), 1), "hf_tokens_per_s": round(tokens / median(hf_s), 1),
        "speedup": round(median([h / e for h, e in zip(hf_s, eng_s)]), 2),
        "engine_runs_s": [round(x, 2) for x in eng_s], "hf_runs_s": [round(x, 2) for x in hf_s],
        "max_rel_logprob_diff": float(f"{diff:.2g}"), "packed_cpu_linears": stats["packed_cpu_linears"],
        "attention_backend": stats["attention_backend"], "rows_in_flight_peak": stats["rows_in_flight_peak"]}))


if __name__ == "__main__":
    main()
