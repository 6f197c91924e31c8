"""GPU benchmark of engine v2: transformers' generate vs the engine on a Persimmon-width model.

    bash bench/gpu.sh                     # CUDA tests, then this; JSON under $OUT (or ./gpu_out)
    python bench/gpu_bench.py --layers 4 --batches 1,8,64,256 --out DIR
    python bench/gpu_bench.py --device cpu --tiny --out /tmp/g   # dry run of the script on CPU

Model: hidden 4096, 64 heads, MLP 16384, vocab 262144 (Persimmon-8B's widths), `--layers` of its
36 layers, random bf16. Measured, each written to DIR/gpu_bench.json as it completes:
- per batch size (rows in flight): tokens/s of the engine and of transformers' generate on the
  same prompts, speedup, greedy agreement over the first 32 tokens;
- decode step time (forward of one decode step, CUDA graph replay vs eager) against the floor
  of reading the weights once per step at the device's measured copy bandwidth; a copy of the
  JSON under bench/results/ calibrates `persimmon-batch plan --gpu`'s estimate for that GPU;
- peak memory against kv_cache_gib, and `capacity.plan` vs what the engine actually allocated;
- with --quantization int8,fp8: per quantization (fp8 only on compute capability 8.9+), the
  decode step at each batch vs bf16's, and top-1 agreement of next-token logits with bf16;
- with --pipeline, one pipeline run with two replicas at num_gpus_per_replica=0.5.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams, capacity, save_pretrained  # noqa: E402
from model.scheduler import Sequence  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted once each)."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(dev)
    return 2 * n * 10 / (time.perf_counter() - t0)


def decode_step_ms(engine, rows: int, prompt_len: int, dev, repeats=20) -> float:
    """Time one decode step's forward for `rows` rows whose context is ~prompt_len tokens."""
    sched, runner = engine.scheduler, engine.runner
    params = SamplingParams(max_new_tokens=engine.max_seq_len, ignore_eos=True)
    for i in range(rows):
        sched.add(Sequence(10**6 + i, [5 + (i + j) % 1000 for j in range(prompt_len)], params))
    try:
        while True:
            step = sched.schedule()
            if step.items and all(item.decode for item in step.items) and len(step.items) == rows:
                break
            hidden = runner.execute(step)
            n = sum(1 for item in step.items if item.sample)
            sched.update(step, runner.model.lm_head(hidden[:n]).argmax(-1).tolist() if n else [])
        runner.execute(step)  # capture / warm up this shape
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            runner.execute(step)
        sync(dev)
        return (time.perf_counter() - t0) / repeats * 1e3
    finally:
        sched.abort_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", default="32,256", help="min,max prompt length")
    ap.add_argument("--kv-cache-gib", type=float, default=16.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model (dry run on CPU)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--pipeline", action="store_true", help="also one pipeline run with 2 replicas at 0.5 GPU")
    ap.add_argument("--quantization", default="", help="comma-separated: int8, fp8 (decode step and logits vs bf16)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if dev.type == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
    os.makedirs(args.out, exist_ok=True)
    lo, hi = map(int, args.prompt_len.split(","))
    shape = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, vocab_size=4096) if args.tiny else {}
    cfg = PersimmonConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, pad_token_id=0, **shape)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": args.dtype, "layers": args.layers, "params_b": round(capacity.param_count(cfg) / 1e9, 3),
           "prompt_len": [lo, hi], "new_tokens": args.new_tokens}  # decode_step_ms: rows of ~hi tokens of context

    def save():
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(out, f, indent=2)

    bw = copy_bandwidth(dev)
    out["copy_bandwidth_gbs"] = round(bw / 1e9, 1)
    def build():  # the same weights every time (the engine packs CPU weights in place: no deepcopy)
        with torch.device(dev):
            return PersimmonForCausalLM(cfg).init_weights(torch.Generator(dev).manual_seed(0)).to(dtype).eval()

    model = build()
    weights = capacity.weights_bytes(cfg, dtype)
    out["weights_gib"] = round(weights / 2**30, 2)
    floor_ms = weights / bw * 1e3
    out["weight_read_floor_ms"] = round(floor_ms, 3)
    hf = None
    if not args.skip_hf:
        import transformers

        hf = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**cfg.to_dict()))
        hf.load_state_dict(model.state_dict())
        hf = hf.to(device=dev, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None
    save()

    g = torch.Generator().manual_seed(0)
    results = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(B)]
        row = {"batch": B}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        engine = Engine(model, None, max_batch_size=max(B, 1), max_seq_len=hi + args.new_tokens + 16,
                        kv_cache_gib=args.kv_cache_gib)
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        ours = engine.generate(prompts, params)
        sync(dev)
        dt = time.perf_counter() - t0
        st = engine.stats()
        row.update(engine_tok_s=round(B * args.new_tokens / dt, 1), rows_in_flight_peak=st["rows_in_flight_peak"],
                   preemptions=st["preemptions"], kv_cache_gib=args.kv_cache_gib,
                   kv_cache_allocated_gib=round(st["kv_cache_bytes"] / 2**30, 3))
        if dev.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        step = decode_step_ms(engine, B, hi, dev)
        row.update(decode_step_ms=round(step, 3), step_over_floor=round(step / floor_ms, 2), decode_mode=engine.decode_mode)
        if engine.decode_mode == "cuda_graph":
            eager = Engine(model, None, max_batch_size=max(B, 1), max_seq_len=hi + args.new_tokens + 16,
                           kv_cache_gib=args.kv_cache_gib, decode_mode="dynamic")
            row["decode_step_eager_ms"] = round(decode_step_ms(eager, B, hi, dev), 3)
            del eager
        if hf is not None:
            T = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=dev)
            mask = (torch.arange(T, device=dev)[None]
                    >= torch.tensor([T - len(p) for p in prompts], device=dev)[:, None]).long()
            with torch.no_grad():
                hf.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
                sync(dev)
                t0 = time.perf_counter()
                ref = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=0)
                sync(dev)
            hf_dt = time.perf_counter() - t0
            row.update(hf_tok_s=round(B * args.new_tokens / hf_dt, 1), speedup=round(hf_dt / dt, 2))
            ref = ref[:, T:].tolist()
            row["first32_identical"] = sum(a.token_ids[:32] == b[:32] for a, b in zip(ours, ref))
            row["first_token_identical"] = sum(a.token_ids[:1] == b[:1] for a, b in zip(ours, ref))
        results.append(row)
        out["results"] = results
        save()
        del engine

    # capacity.plan vs what an engine sized by memory_fraction allocates on this device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        engine = Engine(model, None, max_batch_size=256, max_seq_len=4096)
        planned = capacity.plan(cfg, device_memory_gib=total / 2**30, dtype=dtype, max_batch_size=256,
                                prompt_tokens=hi, new_tokens=args.new_tokens)
        out["capacity_check"] = {"planned_kv_tokens": planned.kv_tokens,
                                 "engine_kv_tokens": engine.stats()["kv_tokens_capacity"],
                                 "free_before_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}
        del engine
        save()
    for kind in filter(None, args.quantization.split(",")):
        out.setdefault("quantized", {})[kind] = quantized_run(build, kind, args, dev, [r["batch"] for r in results],
                                                              {r["batch"]: r["decode_step_ms"] for r in results})
        save()
    if args.pipeline:
        out["pipeline"] = pipeline_run(model, args, cfg)
        save()
    print(json.dumps(out))


def quantized_run(build, kind: str, args, dev, batches: list[int], base_ms: dict) -> dict:
    """The bench model with `kind` weights: its decode step per batch against the unquantized
    one's, and how often its next-token argmax equals the unquantized model's on 8 prompts."""
    from model.quantization import quantize_model

    model = build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=g).to(dev)
    with torch.no_grad():
        reference = model(ids).logits.argmax(-1)
    try:
        quantized = quantize_model(model, kind)
    except (RuntimeError, ValueError, ImportError) as e:  # fp8 below sm89, torchao missing
        return {"error": str(e)}
    with torch.no_grad():
        agree = (quantized(ids).logits.argmax(-1) == reference).float().mean().item()
    row = {"top1_agreement_vs_unquantized": round(agree, 4)}
    lo, hi = map(int, args.prompt_len.split(","))
    for B in batches:
        engine = Engine(quantized, None, max_batch_size=max(B, 1), max_seq_len=hi + args.new_tokens + 16,
                        kv_cache_gib=args.kv_cache_gib)
        step = decode_step_ms(engine, B, hi, dev)
        row[f"decode_step_ms_b{B}"] = round(step, 3)
        row[f"vs_unquantized_b{B}"] = round(base_ms[B] / step, 2)  # > 1: faster
        del engine
    del quantized
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def pipeline_run(model, args, cfg) -> dict:
    """Two replicas sharing one GPU (num_gpus_per_replica=0.5) over 4 shards of 64 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import run_generate

    with tempfile.TemporaryDirectory() as work:
        from model.tiny_tokenizer import train_tiny_tokenizer

        model_dir = os.path.join(work, "model")
        save_pretrained(model, model_dir)
        train_tiny_tokenizer(model_dir)  # a few hundred pieces: ids well inside the vocabulary
        os.makedirs(os.path.join(work, "in"))
        g = torch.Generator().manual_seed(1)
        for s in range(4):
            ids = list(range(s * 64, (s + 1) * 64))
            pq.write_table(pa.table({"id": ids, "prompt": [" ".join(str(int(x)) for x in torch.randint(0, 999, (40,), generator=g))
                                                           for _ in ids]}), os.path.join(work, "in", f"p{s}.parquet"))
        t0 = time.perf_counter()
        report = run_generate(input=os.path.join(work, "in"), output=os.path.join(work, "out"), model=model_dir,
                              replicas=2, num_gpus_per_replica=0.5 if args.device == "cuda" else 0,
                              max_new_tokens=16, progress=False)
        eng = report.get("engine", {})
        return {"complete": report["complete"], "wall_s": round(time.perf_counter() - t0, 1),
                "rows": report["rows_written"], "replicas": report["this_run"]["replicas"],
                "kv_tokens_capacity_per_replica": [r.get("kv_tokens_capacity") for r in eng.get("replicas", [])],
                "error": report.get("error")}


if __name__ == "__main__":
    main()
