"""GPU benchmark: transformers' generate vs our engine on a Persimmon-shaped random model.

    bash bench/gpu.sh            # installs, then runs this with defaults
    python bench/gpu_bench.py --layers 12 --batches 1,8,32,64 --dtype bfloat16

Default shape: hidden 4096, 64 heads, MLP 16384, vocab 262144 (Persimmon-8B's widths) with 12
of its 36 layers (~4.6B parameters). Reports, per batch size: tokens/s for both, the speedup,
greedy agreement over the first 32 tokens, the engine's decode-step time against the floor set
by reading the weights once per step, plus peak memory and checkpoint load time. One JSON line.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams, load_pretrained  # noqa: E402
from model.engine import Runner  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", default="64,256", help="min,max prompt length")
    ap.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="HBM bandwidth for the floor (H100 SXM)")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dtype, dev = getattr(torch, args.dtype), torch.device("cuda")
    lo, hi = map(int, args.prompt_len.split(","))
    cfg = PersimmonConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, pad_token_id=0,
                          initializer_range=0.02)
    out = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "layers": args.layers}

    with torch.device(dev):
        model = PersimmonForCausalLM(cfg).init_weights(torch.Generator(dev).manual_seed(0)).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = n_params * torch.finfo(dtype).bits // 8
    out["params_b"] = round(n_params / 1e9, 2)
    with tempfile.TemporaryDirectory() as tmp:  # load time: safetensors straight to GPU, no CPU copy
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = load_pretrained(tmp, dtype=dtype, device="cuda")
        torch.cuda.synchronize()
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["load_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["weights_gib"] = round(weight_bytes / 2**30, 2)

    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**cfg.to_dict()))
        hf.load_state_dict(model.state_dict())
        hf = hf.to(device=dev, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None

    g = torch.Generator().manual_seed(0)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(B)]
        row = {"batch": B}
        engine = Engine(model, None, max_batch_size=B, max_seq_len=hi + args.new_tokens)
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # graph capture
        row["engine_warmup_s"] = round(time.perf_counter() - t0, 2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ours = engine.generate(prompts, params)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row["engine_tok_s"] = round(B * args.new_tokens / dt, 1)
        row["engine_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # decode-step time: replay the captured step alone
        runner: Runner = engine.runner
        slots, toks, pos = list(range(B)), [5] * B, [hi] * B
        for _ in range(3):
            runner.decode(slots, toks, pos)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            runner.decode(slots, toks, pos)
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / 20 * 1e3
        floor_ms = weight_bytes / (args.bandwidth_gbs * 1e9) * 1e3
        row["decode_step_ms"], row["weight_floor_ms"] = round(step_ms, 2), round(floor_ms, 2)
        row["step_over_floor"] = round(step_ms / floor_ms, 2)
        if hf is not None:
            T = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=dev)
            mask = (torch.arange(T, device=dev)[None] >= torch.tensor([T - len(p) for p in prompts], device=dev)[:, None]).long()
            hf.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=0)
            torch.cuda.synchronize()
            hf_dt = time.perf_counter() - t0
            row["hf_tok_s"] = round(B * args.new_tokens / hf_dt, 1)
            row["speedup"] = round(hf_dt / dt, 2)
            ref = ref[:, T:].tolist()
            row["first32_identical"] = sum(a.token_ids[:32] == b[:32] for a, b in zip(ours, ref))
        rows.append(row)
        del engine
        torch.cuda.empty_cache()
    out["results"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
