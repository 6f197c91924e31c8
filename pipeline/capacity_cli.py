"""`persimmon-batch capacity`: does a model fit a GPU, and how many rows run at once?

From config.json alone (no weights are read): weights bytes, KV bytes per token, the KV cache a
replica would allocate (model/capacity.py: the same arithmetic the engine uses) and how many
rows of a given length fit in it at once. With `--config JOB.yaml` the job's dtype,
quantization, quantize_lm_head, max_num_seqs, max_seq_len, max_new_tokens, kv_cache_gib,
memory_fraction and num_gpus_per_replica are used (flags override them). Exit status 0 when it
fits, 1 when it does not, 2 for bad input (fp8 on a GPU without fp8 included).

    persimmon-batch capacity --model adept/persimmon-8b-chat --gpu L40S
    persimmon-batch capacity --model adept/persimmon-8b-chat --gpu L4 --quantization int8
    persimmon-batch capacity --config jobs/configs/label_reviews_8b.yaml --model adept/persimmon-8b-chat \\
        --gpu L40S --json
"""

from __future__ import annotations

import argparse
import json
import math
import os

from model import capacity
from model.config import PersimmonConfig
from model.scheduler import MAX_NUM_SEQS, MAX_SEQ_LEN

from .stages import TASKS

# Released checkpoints whose config.json is PersimmonConfig's defaults: sized without a download.
PRESETS = {"adept/persimmon-8b-base": "PersimmonForCausalLM", "adept/persimmon-8b-chat": "PersimmonForCausalLM"}
HEADS = {"PersimmonForCausalLM": "causal", "PersimmonForSequenceClassification": "sequence_classification"}


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="Will a model fit a GPU, and how many rows run at once? (config.json only)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint directory, object-store URI or Hugging Face hub id (only its "
                   f"config.json is fetched), or one of {sorted(PRESETS)} (default: the --config job's model).")
    p.add_argument("--config", metavar="JOB.yaml", help="A job config: its model and engine settings are used.")
    p.add_argument("--architecture", choices=sorted(HEADS),
                   help="Size the model as this architecture instead of its config.json's, e.g. a sequence "
                        "classifier fine-tuned from a preset: --model adept/persimmon-8b-base --architecture "
                        "PersimmonForSequenceClassification.")
    gpu = p.add_mutually_exclusive_group(required=True)
    gpu.add_argument("--gpu", choices=sorted(capacity.GPUS),
                     help="A GPU by name (its memory as the driver reports it).")
    gpu.add_argument("--gpu-memory-gib", type=float, help="Device memory in GiB.")
    p.add_argument("--dtype", choices=sorted(capacity.DTYPE_BYTES), help="Weights and KV dtype (default bfloat16).")
    p.add_argument("--quantization", choices=capacity.QUANTIZATIONS,
                   help="Weight quantization (default none): int8 / fp8 store each layer's linear weights in one "
                        "byte plus a scale per output channel; the KV cache stays in --dtype. fp8 needs compute "
                        "capability 8.9+ (L4, L40S, H100-80GB, H200).")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction,
                   help="Quantize the lm_head too (with --quantization): 1 GiB less at Persimmon-8B's 262k vocab.")
    p.add_argument("--memory-fraction", type=float, help="Fraction of the device a replica may use (default 0.9).")
    p.add_argument("--kv-cache-gib", type=float, help="A fixed KV cache size instead of the memory fraction.")
    p.add_argument("--num-gpus-per-replica", type=float,
                   help="GPUs per replica; below 1 several replicas share a GPU and each gets that share.")
    p.add_argument("--prompt-tokens", type=int, help="Prompt length of a typical row (default: max_seq_len - "
                   "new tokens with --config, else 512).")
    p.add_argument("--new-tokens", type=int, help="Generated tokens per row (default: the job's "
                   "max_new_tokens, 8 for label, 1 for score, 0 for classify jobs; else 256).")
    p.add_argument("--max-num-seqs", type=int, help="Cap on rows in flight (default 256).")
    p.add_argument("--prefill-token-budget", type=int, default=4096, help="Tokens per prefill forward (default 4096).")
    p.add_argument("--kv-block-size", type=int, default=16, help="Tokens per KV block (default 16).")
    p.add_argument("--json", action="store_true", help="Print one JSON object (weights_bytes, kv_bytes_per_token, "
                   "kv_tokens, rows_in_flight, ...).")


def read_config(model: str, job=None) -> tuple[PersimmonConfig, str]:
    """(config, architecture) of a checkpoint from its config.json."""
    if model in PRESETS:
        return PersimmonConfig(), PRESETS[model]
    from .hub import config_file, hub_model

    hub = hub_model(model)
    if hub is not None:  # a hub id: its config.json only, never the weights
        with open(config_file(hub, model), encoding="utf-8") as f:
            cfg = PersimmonConfig.from_dict(json.load(f))
    elif "://" in model and not model.startswith("file://"):
        from pipeline.settings import PipelineConfig

        from .storage import read_bytes, resolve

        settings = (job or PipelineConfig(input="-", output="-", model=model)).with_env()
        cfg = PersimmonConfig.from_dict(json.loads(read_bytes(resolve(model, settings).join("config.json"))))
    else:
        path = model.removeprefix("file://")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {model!r}: no such directory (or use one of {sorted(PRESETS)})")
        cfg = PersimmonConfig.from_pretrained(path)
    return cfg, (cfg.architectures or ["PersimmonForCausalLM"])[0]


CHECKS = {  # flag: (test of its value, what it must be)
    "gpu_memory_gib": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "kv_cache_gib": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "memory_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "num_gpus_per_replica": (lambda v: 0 < v <= 1 or float(v).is_integer() and v >= 1,
                             "in (0, 1] or a whole number"),
    "prompt_tokens": (lambda v: v >= 1, ">= 1"),
    "new_tokens": (lambda v: v >= 0, ">= 0"),
    "max_num_seqs": (lambda v: 1 <= v <= MAX_NUM_SEQS, f"in [1, {MAX_NUM_SEQS}]"),  # the engine's bounds
    "prefill_token_budget": (lambda v: 1 <= v <= MAX_SEQ_LEN, f"in [1, {MAX_SEQ_LEN}]"),
    "kv_block_size": (lambda v: v >= 1, ">= 1"),
}


def _check_args(args) -> None:
    for name, (valid, need) in CHECKS.items():
        value = getattr(args, name)
        if value is not None and not valid(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {need}, got {value}")


def run(args) -> int:
    _check_args(args)
    job = None
    if args.config:
        from .settings import PipelineConfig

        job = PipelineConfig.from_yaml(args.config)
    model = args.model or (job.model if job else None)
    if not model:
        raise ValueError("give --model (or --config with a model)")
    cfg, arch = read_config(model, job)
    arch = args.architecture or arch
    head = HEADS.get(arch)
    if head is None:
        raise ValueError(f"{model}: architecture {arch} is not one this engine serves ({sorted(HEADS)})")
    pick = lambda flag, field, default: (flag if flag is not None else  # noqa: E731
                                         (getattr(job, field) if job is not None and getattr(job, field) is not None
                                          else default))
    dtype = pick(args.dtype, "dtype", "bfloat16")
    dtype = "bfloat16" if dtype == "auto" else dtype
    quantization = pick(args.quantization, "quantization", "none")
    quantize_lm_head = pick(args.quantize_lm_head, "quantize_lm_head", False)
    if quantize_lm_head and quantization == "none":
        raise ValueError("--quantize-lm-head needs --quantization int8 or fp8")
    if args.gpu:
        capacity.check_quantization(args.gpu, quantization)
    new = args.new_tokens if args.new_tokens is not None else (
        TASKS[job.task].capacity_new_tokens(job) if job is not None else 256)
    max_seq_len = pick(None, "max_seq_len", cfg.max_position_embeddings)
    prompt = args.prompt_tokens if args.prompt_tokens is not None else (
        max(1, max_seq_len - new) if job is not None else 512)
    gpus = pick(args.num_gpus_per_replica, "num_gpus_per_replica", 1.0)
    share = gpus if 0 < gpus < 1 else 1.0
    memory = args.gpu_memory_gib if args.gpu_memory_gib is not None else capacity.GPUS[args.gpu].memory_gib
    fraction = pick(args.memory_fraction, "memory_fraction", 0.9)
    result = capacity.plan(cfg, device_memory_gib=memory, dtype=dtype, memory_fraction=fraction,
                           kv_cache_gib=pick(args.kv_cache_gib, "kv_cache_gib", None),
                           prompt_tokens=prompt, new_tokens=new, max_batch_size=pick(args.max_num_seqs, "max_num_seqs", 256),
                           prefill_token_budget=args.prefill_token_budget, block_size=args.kv_block_size,
                           head=head, share=share, quantization=quantization, quantize_lm_head=quantize_lm_head)
    out = {"model": model, "architecture": arch, "dtype": dtype, "quantization": quantization,
           "quantize_lm_head": quantize_lm_head, "device_memory_gib": memory, "gpu": args.gpu,
           "memory_share": share, "prompt_tokens": prompt, "new_tokens": new, "max_seq_len": max_seq_len,
           **result.as_dict()}
    if prompt + new > max_seq_len:
        out["fits"], out["reason"] = False, f"prompt + new tokens ({prompt + new}) exceed max_seq_len={max_seq_len}"
    if args.json:
        print(json.dumps(out))
    else:
        gib = capacity.GIB
        weights = dtype if quantization == "none" else \
            f"{quantization} linears{' and lm_head' if quantize_lm_head else ''}, the rest {dtype}"
        print("\n".join([
            f"model           {model} ({arch}, {capacity.param_count(cfg, head) / 1e9:.2f}B parameters)",
            f"device          {memory:.2f} GiB" + (f" ({args.gpu})" if args.gpu else "")
            + f", share {share:g}, memory_fraction {fraction}",
            f"weights         {result.weights_bytes / gib:.2f} GiB ({weights})",
            f"activations     {result.activation_bytes / gib:.2f} GiB (headroom for the largest forward)",
            f"KV per token    {result.kv_bytes_per_token / 1024:.1f} KiB",
            f"KV cache        {result.kv_cache_bytes / gib:.2f} GiB = {result.kv_tokens} tokens"
            f" (blocks of {result.kv_block_size})",
            f"rows in flight  {result.rows_in_flight} rows of {prompt} + {new} tokens"
            f" (cap: max_num_seqs {result.max_batch_size})",
            f"fits            {'yes' if out['fits'] else 'NO: ' + out['reason']}",
        ]))
    return 0 if out["fits"] else 1
