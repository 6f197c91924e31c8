"""Weight quantization on CPU: quality against the unquantized model, and decode speed.

    python bench/quantization.py [--positions 512] [--repeats 2] [--skip-speed]

Everything runs in this process, on this machine; one JSON line at the end, with the CPU flags.
Quality (the unquantized model is the reference):
- real width: Persimmon-8B's hidden 4096, MLP 16384 and 64 heads, two layers, vocab 32000,
  random (transformers' init, seed 0), written as a bf16 checkpoint and loaded with
  quantization none / int8 / int8 + lm_head (the loader's layer-by-layer path). Text: this
  repository's README.md through the tiny tokenizer, its first --positions tokens. Per
  next-token position: top-1 agreement and KL(unquantized || quantized) in nats; bf16's own
  distance from fp32 beside it, for scale.
- greedy tokens: bench/engine_vs_hf.py's model (vocab 32000, hidden 1024, 8 layers, random),
  16 prompts of 16-128 tokens, 32 new tokens: int8 vs bf16 engines, and bf16 vs fp32 for scale.
- labels: bench/labels_vs_hf.py's setup (same model, fp32, a pinned 256-token prefix, 64 rows
  of 16-96 tokens, 3 choices of 1-3 tokens): rows whose best choice agrees, largest score
  difference.
Speed: decode of the real-width model (its layers: 0.4 G weights; the 32k head is 0.13 G) at 1,
8 and 64 rows in flight, prompts of 8 tokens: int8 (bf16 and fp32 activations), bf16, fp32.
generate(1 + n tokens) less generate(1 token) = n decode steps; tokens/s = rows x n / that
time, median of --repeats.
"""

import argparse
import copy
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine_vs_hf import BENCH_CONFIG, build, make_prompts, median  # noqa: E402
from kv_budget import cpu_flags  # noqa: E402

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams, load_pretrained  # noqa: E402
from model.checkpoint import save_pretrained  # noqa: E402
from model.quantization import quantize_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=16384, num_hidden_layers=2,
            num_attention_heads=64, max_position_embeddings=2048)
VARIANTS = {"bf16": ("bfloat16", "none", False), "int8": ("bfloat16", "int8", False),
            "int8+lm_head": ("bfloat16", "int8", True), "fp32": ("float32", "none", False),
            "int8_fp32": ("float32", "int8", False)}  # int8 weights, fp32 activations (CPU replicas' default dtype)


def wide_checkpoint(path: str) -> None:
    with torch.device("meta"):
        model = PersimmonForCausalLM(PersimmonConfig(**WIDE))
    model = model.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(0))
    save_pretrained(model.to(torch.bfloat16), path)


def readme_tokens(n: int) -> list[int]:
    from model import PersimmonTokenizer
    from model.tiny_tokenizer import train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as d:
        train_tiny_tokenizer(d)
        tokenizer = PersimmonTokenizer.from_pretrained(d)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < n:
        raise SystemExit(f"README.md has {len(ids)} tokens, fewer than --positions {n}")
    return ids[:n]


def logit_quality(path: str, ids: list[int]) -> dict:
    """Top-1 agreement and mean KL against bf16 (and bf16 against fp32), per next-token position."""
    logp = {}
    for name, (dtype, quantization, head) in VARIANTS.items():
        if name == "int8_fp32":
            continue
        model = load_pretrained(path, dtype=dtype, quantization=quantization, quantize_lm_head=head)
        with torch.inference_mode():
            logp[name] = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
        del model
        gc.collect()

    def compare(ref, other):
        kl = (logp[ref].exp() * (logp[ref] - logp[other])).sum(-1)  # [T]
        agree = (logp[ref].argmax(-1) == logp[other].argmax(-1)).float().mean()
        return {"top1_agreement": round(agree.item(), 4), "mean_kl": float(f"{kl.mean().item():.3g}"),
                "max_kl": float(f"{kl.max().item():.3g}")}
    return {"positions": len(ids), "int8_vs_bf16": compare("bf16", "int8"),
            "int8_lm_head_vs_bf16": compare("bf16", "int8+lm_head"), "bf16_vs_fp32": compare("fp32", "bf16")}


def greedy_agreement() -> dict:
    """int8 engine vs bf16 engine, and bf16 vs fp32 beside it: on a random model the top tokens
    are close calls, so one flipped token sends a row elsewhere; bf16's own flips give the scale."""
    base = build(torch.bfloat16)
    prompts = make_prompts(16, 16, 128, BENCH_CONFIG["vocab_size"])
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)

    def tokens(model):
        return [c.token_ids for c in Engine(model, None, max_batch_size=16, max_seq_len=160).generate(prompts, params)]

    def compare(ref, got):
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ref, got)]
        return {"identical_sequences": sum(a == b for a, b in zip(ref, got)),
                "first_token_identical": sum(a[0] == b[0] for a, b in zip(ref, got)),
                "mean_matching_prefix": round(sum(prefix) / len(prefix), 1)}
    quant = quantize_model(copy.deepcopy(base), "int8")  # before an engine packs base's weights in place
    bf16 = tokens(base)
    out = {"model": "engine_vs_hf bench model", "prompts": len(prompts), "new_tokens": 32,
           "int8_vs_bf16": compare(bf16, tokens(quant))}
    out["bf16_vs_fp32"] = compare(tokens(build(torch.float32)), bf16)
    return out


def label_agreement() -> dict:
    base = build(torch.float32)
    quant = quantize_model(copy.deepcopy(base), "int8")
    V, g = BENCH_CONFIG["vocab_size"], torch.Generator().manual_seed(0)
    prefix = torch.randint(3, V, (256,), generator=g).tolist()
    rows = [prefix + torch.randint(3, V, (int(torch.randint(16, 97, (1,), generator=g)),), generator=g).tolist()
            for _ in range(64)]
    choices = [torch.randint(3, V, (1 + i % 3,), generator=g).tolist() for i in range(3)]
    results = []
    for model in (base, quant):
        engine = Engine(model, None, max_batch_size=256, max_seq_len=1024)
        engine.pin_prefix(prefix)
        results.append(engine.score_choices(rows, choices))
    ref, got = results
    diff = max(abs(a - b) for r, q in zip(ref, got) for a, b in zip(r.scores, q.scores))
    return {"model": "labels_vs_hf setup, fp32", "rows": len(rows), "choices": len(choices),
            "labels_identical": sum(r.label == q.label for r, q in zip(ref, got)),
            "max_abs_score_diff": round(diff, 4)}


def decode_speed(path: str, repeats: int) -> dict:
    out = {}
    for name in ("int8", "bf16", "int8_fp32", "fp32"):
        dtype, quantization, head = VARIANTS[name]
        model = load_pretrained(path, dtype=dtype, quantization=quantization, quantize_lm_head=head)
        engine = Engine(model, None, max_batch_size=64, max_seq_len=64, kv_cache_gib=0.5)
        engine.generate(make_prompts(2, 8, 8, 300), SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        for rows, steps in ((1, 16), (8, 16), (64, 6)):
            prompts = make_prompts(rows, 8, 8, 300, seed=rows)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))
                t1 = time.perf_counter()
                engine.generate(prompts, SamplingParams(max_new_tokens=1 + steps, ignore_eos=True))
                times.append((time.perf_counter() - t1) - (t1 - t0))
            out[f"{name}_rows{rows}"] = {"decode_tokens_per_s": round(rows * steps / median(times), 1),
                                         "step_ms": round(1000 * median(times) / steps, 1),
                                         "runs_s": [round(t, 2) for t in times]}
        out[f"{name}_packed_cpu_linears"] = engine.stats()["packed_cpu_linears"]
        del engine, model
        gc.collect()
    for rows in (1, 8, 64):
        for quantized, plain in (("int8", "bf16"), ("int8_fp32", "fp32")):
            out[f"{quantized}_vs_{plain}_rows{rows}"] = round(out[f"{quantized}_rows{rows}"]["decode_tokens_per_s"]
                                                              / out[f"{plain}_rows{rows}"]["decode_tokens_per_s"], 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    result = {"bench": "quantization", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cpu_flags": cpu_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as path:
        wide_checkpoint(path)
        result["logits_real_width"] = logit_quality(path, readme_tokens(args.positions))
        result["greedy"] = greedy_agreement()
        result["labels"] = label_agreement()
        if not args.skip_speed:
            result["decode_real_width"] = decode_speed(path, args.repeats)
    result["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
