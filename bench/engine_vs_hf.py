"""Engine vs transformers' generate on the same random Persimmon-shaped model and prompts.

    python bench/engine_vs_hf.py [--dtype bfloat16] [--engine-batch 32] [--hf-batch 8] [--repeats 3]

Model: vocab 32000, hidden 1024, intermediate 4096, 8 layers, 16 heads, random (seed 0).
Prompts: 32 random prompts of 16-128 tokens; greedy, 64 new tokens, eos ignored.
Prints one JSON line. Both run in this process, on this machine, after a warm-up, alternating
--repeats times (default 3); tokens/s are medians, speedup is the median of per-pair ratios.
"""

import argparse
import json
import os
import platform
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import PersimmonConfig, PersimmonForCausalLM  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.sampling_params import SamplingParams  # noqa: E402

BENCH_CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=16, max_position_embeddings=2048, pad_token_id=0)


def build(dtype, seed=0):
    config = PersimmonConfig(**BENCH_CONFIG)
    torch.manual_seed(seed)
    model = PersimmonForCausalLM(config).init_weights(torch.Generator().manual_seed(seed)).eval()
    return model.to(dtype)


def hf_twin(model):
    """transformers' PersimmonForCausalLM with `model`'s config and weights, in eval mode (same
    dtype as the weights it is given; imported only when a bench compares against it)."""
    import transformers

    hf = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**model.config.to_dict()))
    hf.load_state_dict(model.state_dict())
    return hf.eval()


def make_prompts(n, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def hf_generate(hf, prompts, new_tokens, batch):
    outs = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        T = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=0,
                              do_sample=False, pad_token_id=0)
        outs += out[:, T:].tolist()
    return outs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--engine-batch", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true", help="time only the engine")
    ap.add_argument("--repeats", type=int, default=3,
                    help="engine / transformers runs, alternating; speedup = median of the pairs")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count() or 1)

    model = build(dtype)
    prompts = make_prompts(args.prompts, 16, 128, BENCH_CONFIG["vocab_size"])
    total_new = args.prompts * args.new_tokens
    result = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "dtype": args.dtype, "prompts": args.prompts, "new_tokens": args.new_tokens,
              "hf_batch": args.hf_batch, "engine_batch": args.engine_batch}

    engine = Engine(model, None, max_batch_size=args.engine_batch, max_seq_len=128 + args.new_tokens)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    result["engine_warmup_s"] = round(time.perf_counter() - t0, 3)
    hf = None
    if not args.skip_hf:
        hf = hf_twin(model).to(dtype)
        hf.generation_config.eos_token_id = None  # eos ignored: always generate new_tokens
        hf_generate(hf, prompts[:2], 4, 2)  # warm-up

    # Alternate: this box's speed drifts 10-30 % within minutes, so each engine run is paired
    # with the transformers run right after it and the speedup is the median of the pairs.
    engine_s, hf_s, outputs, ref = [], [], [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        completions = engine.generate(prompts, params)
        engine_s.append(time.perf_counter() - t0)
        outputs.append([c.token_ids for c in completions])
        if hf is not None:
            t0 = time.perf_counter()
            ref = hf_generate(hf, prompts, args.new_tokens, args.hf_batch)
            hf_s.append(time.perf_counter() - t0)
    ours = outputs[0]
    result["engine_runs_deterministic"] = all(o == ours for o in outputs)
    result["engine_tokens_per_s"] = round(total_new / median(engine_s), 1)
    result["engine_runs_s"] = [round(t, 2) for t in engine_s]
    if hf is not None:
        result["hf_tokens_per_s"] = round(total_new / median(hf_s), 1)
        result["hf_runs_s"] = [round(t, 2) for t in hf_s]
        speedups = [h / e for h, e in zip(hf_s, engine_s)]
        result["speedup"] = round(median(speedups), 2)
        result["speedup_runs"] = [round(x, 2) for x in speedups]
        same = [a == b for a, b in zip(ours, ref)]
        result["greedy_tokens_identical"] = all(same)
        result["prompts_identical"] = sum(same)
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ours, ref)]
        result["min_matching_prefix"] = min(first)
        result["mean_matching_prefix"] = round(sum(first) / len(first), 1)
        result["first_token_identical"] = sum(a[:1] == b[:1] for a, b in zip(ours, ref))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
