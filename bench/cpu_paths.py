"""Which CPU features speed up which path: oneDNN weight packing and the C attention kernel.

    python bench/cpu_paths.py [--dtypes float32,bfloat16] [--repeats 3] [--isa native,avx2]

For each instruction set (`native`: this CPU as it is; `avx2`: the same machine limited to
AVX2 + FMA, as most AMD Zen 2/3 and older Intel servers are: oneDNN with
ONEDNN_MAX_CPU_ISA=AVX2, ATen with ATEN_CPU_CAPABILITY=avx2 and the kernel built with
-march=x86-64-v3), a child process times greedy generation on one random Persimmon-shaped model
(vocab 32000, hidden 1024, 8 layers) with each variant:

- `plain`: F.linear weights, attention by gather + SDPA (the baseline: runs everywhere);
- `packed`: oneDNN-packed weights (where torch says this CPU can run the dtype packed), gather;
- `kernel`: F.linear, attention by the C kernel over the paged cache;
- `packed+kernel`: both (what the engine picks by default where it can).

Variants alternate within each repeat and ratios are medians of per-repeat ratios against
`plain` in the same process. Tokens must be identical across variants in fp32 (asserted in
the output as `tokens_identical`). Prints one JSON line per instruction set, with the CPU's
model name and its AVX-512 / AMX flags.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ISA_ENV = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                  "PERSIMMON_KERNEL_MARCH": "x86-64-v3"}}
CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
              num_attention_heads=16, max_position_embeddings=2048)


def cpu_description() -> dict:
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_bf16",
              "amx_tile")
    return {"cpu": name, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def child(dtypes: list[str], repeats: int, prompts_n: int, new_tokens: int) -> dict:
    import torch

    from model import PersimmonConfig, PersimmonForCausalLM, cpu_kernels
    from model.cpu_packing import cpu_packing_unsupported
    from model.engine import Engine
    from model.sampling_params import SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 97, (prompts_n,), generator=g).tolist()
    prompts = [torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = {"aten_capability": torch.backends.cpu.get_cpu_capability(), "dtypes": {}}

    def kernel(on: bool):
        os.environ["PERSIMMON_CPU_KERNELS"] = "1" if on else "0"
        cpu_kernels._loaded.clear()  # load (or not) again under the new setting

    for name in dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        model = PersimmonForCausalLM(PersimmonConfig(**CONFIG)).init_weights(torch.Generator().manual_seed(0))
        model = model.eval().to(dtype)
        can_pack = cpu_packing_unsupported(dtype) is None
        kernel(True)
        has_kernel = cpu_kernels.available(dtype)
        variants = [("plain", False, False)]
        if can_pack:
            variants.append(("packed", True, False))
        if has_kernel:
            variants.append(("kernel", False, True))
        if can_pack and has_kernel:
            variants.append(("packed+kernel", True, True))
        times = {v: [] for v, _, _ in variants}
        tokens = {}
        for _ in range(repeats):
            for label, packed, use_kernel in variants:
                kernel(use_kernel)
                engine = Engine(model, None, max_batch_size=prompts_n, max_seq_len=96 + new_tokens,
                                packed_cpu_linears=packed, kv_cache_gib=0.5)
                assert (engine.runner.attn.name == "cpu_kernel") == use_kernel and engine.runner.packed == packed
                engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
                t0 = time.perf_counter()
                done = engine.generate(prompts, params)
                times[label].append(time.perf_counter() - t0)
                tokens[label] = [c.token_ids for c in done]
                del engine
        total = prompts_n * new_tokens
        row = {"packing": "available" if can_pack else cpu_packing_unsupported(dtype),
               "kernel": "available" if has_kernel else "unavailable"}
        for label in times:
            row[label] = {"tokens_per_s": round(total / median(times[label]), 1),
                          "vs_plain": round(median([p / t for p, t in zip(times["plain"], times[label])]), 2)}
        if name == "float32":
            row["tokens_identical"] = all(t == tokens["plain"] for t in tokens.values())
        else:  # 16-bit: other summation orders may flip near-ties; report how many rows agree
            row["rows_identical_to_plain"] = {k: sum(a == b for a, b in zip(v, tokens["plain"])) for k, v in tokens.items()}
        out["dtypes"][name] = row
    kernel(True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--isa", default="native,avx2", help="instruction sets to run: native, avx2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if args.child:
        print(json.dumps(child(dtypes, args.repeats, args.prompts, args.new_tokens)))
        return
    for isa in args.isa.split(","):
        env = {**os.environ, **ISA_ENV[isa]}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dtypes", args.dtypes, "--repeats",
               str(args.repeats), "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            print(json.dumps({"isa": isa, "error": done.stderr[-2000:]}))
            continue
        print(json.dumps({"isa": isa, **cpu_description(), **json.loads(done.stdout.strip().splitlines()[-1])}))


if __name__ == "__main__":
    main()
