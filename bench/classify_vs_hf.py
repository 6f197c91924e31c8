"""Engine.classify vs transformers' sequence classification on the same model and rows.

    python bench/classify_vs_hf.py [--dtype bfloat16] [--repeats 3]

Model: vocab 32000, hidden 1024, intermediate 4096, 8 layers, 16 heads, 2 labels, random (seed 0).
Rows: 256 random token sequences of 16-128 tokens. transformers runs padded batches of 32 in
input order; the engine packs rows side by side (no padding) within a token budget. Runs
alternate --repeats times; rows/s are medians, speedup the median of per-pair ratios. Prints
one JSON line.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_vs_hf import BENCH_CONFIG, make_prompts, median  # noqa: E402

from model import Engine, PersimmonConfig, PersimmonForSequenceClassification  # noqa: E402


def hf_classify(hf, rows, batch):
    probs = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        T = max(len(r) for r in chunk)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in chunk])  # right-padded with pad id 0
        mask = (ids != 0).long()
        with torch.no_grad():
            probs += hf(ids, attention_mask=mask).logits.float().softmax(-1).tolist()
    return probs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3,
                    help="engine / transformers runs, alternating; speedup = median of the pairs")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)

    config = PersimmonConfig(**BENCH_CONFIG, num_labels=2)
    torch.manual_seed(0)
    model = PersimmonForSequenceClassification(config).init_weights(torch.Generator().manual_seed(0))
    model = model.to(dtype).eval()
    rows = make_prompts(args.rows, 16, 128, config.vocab_size)  # token ids >= 3, so 0 is only padding
    engine = Engine(model, None, max_batch_size=32)
    engine.classify(rows[:4])  # warm-up

    import transformers

    hf = transformers.PersimmonForSequenceClassification(transformers.PersimmonConfig(**config.to_dict()))
    hf.load_state_dict(model.state_dict())
    hf = hf.to(dtype).eval()
    hf_classify(hf, rows[:4], 4)  # warm-up

    # alternating runs, paired: this box's speed drifts 10-30 % within minutes
    engine_s, hf_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours = engine.classify(rows)
        engine_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = hf_classify(hf, rows, args.hf_batch)
        hf_s.append(time.perf_counter() - t0)

    diff = max(abs(a - b) for r, o in zip(ref, ours) for a, b in zip(r, o.probs))
    speedups = [h / e for h, e in zip(hf_s, engine_s)]
    print(json.dumps({
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "dtype": args.dtype, "rows": args.rows, "hf_batch": args.hf_batch, "repeats": args.repeats,
        "hf_rows_per_s": round(args.rows / median(hf_s), 1), "engine_rows_per_s": round(args.rows / median(engine_s), 1),
        "speedup": round(median(speedups), 2), "speedup_runs": [round(x, 2) for x in speedups],
        "max_abs_prob_diff": float(f"{diff:.3g}"),
        "labels_identical": all((o.probs[1] > o.probs[0]) == (r[1] > r[0]) for r, o in zip(ref, ours)),
    }))


if __name__ == "__main__":
    main()
