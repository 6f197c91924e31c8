"""Memory arithmetic: what the weights take, what a token of KV cache costs, how big a replica's
KV pool is and how many rows it holds at once. From the config alone (no weights read), so
`persimmon-batch capacity` and the model runner size a job with the same numbers.

For Persimmon-8B in bf16: 9,397,175,296 parameters = 17.5 GiB of weights, and one token of KV
cache costs 36 layers x (K + V) x 4096 x 2 bytes = 576 KiB.

The KV budget of a replica (what `ModelRunner` allocates when `kv_cache_gib` is not given):

    kv = min(fraction x free_after_load, fraction x total x share - weights) - activation headroom

`free_after_load` is the device memory free once this replica's weights are in (CPU:
MemAvailable), `total` the device's memory (CPU: MemTotal or the cgroup limit), `share` the part
of the device this replica owns (0.5 for two replicas on one GPU; on a CPU node, its CPUs / the
node's), the headroom the activations of the largest forward. Two replicas each get their share.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .scheduler import RESERVED_BLOCKS

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context + cuBLAS workspaces, not in the weights (estimate)
GATHER_TOKENS = 32768  # most keys one attention call gathers at once (bounds its scratch memory)
# rows of [rows, vocab] temporaries handled at once after the head; they bound that scratch memory
SAMPLE_ROWS = 32  # the sampler's top-k / top-p filtering (model/sampling.py)
LOGPROB_ROWS = 64  # log_softmax for token and prompt log-probabilities, scores (model/logprobs.py)



@dataclass(frozen=True)
class Gpu:
    """One GPU type: what `capacity --gpu`, the fp8 check and the roofline (model/roofline.py) know of it."""
    memory_gib: float  # total memory as the driver reports it
    capability: tuple[int, int]  # CUDA compute capability (NVIDIA's CUDA GPUs list)
    bandwidth_gbs: float  # memory bandwidth, GB/s (1e9 bytes)
    tensor_tflops: float  # dense (no sparsity) fp16 / bf16 tensor-core peak, TFLOP/s
    fp32_tflops: float  # fp32 peak without tensor cores
    bf16: bool = True  # bf16 tensor cores (Turing has fp16 only)

    def peak_flops(self, dtype: str) -> float:
        name = str(dtype).removeprefix("torch.")
        if name == "float32":
            return self.fp32_tflops * 1e12
        if name == "bfloat16" and not self.bf16:
            raise ValueError("no bf16 tensor cores (fp16 only): use --dtype float16")
        return self.tensor_tflops * 1e12


# Bandwidth and peaks from NVIDIA datasheets (SXM parts where there are two; sparsity figures
# halved to dense). T4 (Turing): fp16 only. The A10G of AWS g5 has no NVIDIA sheet: the A10's
# figures, so its peak may be lower. A100 40GB / 80GB differ in bandwidth only.
GPUS = {
    "T4": Gpu(14.58, (7, 5), 320, 65, 8.1, bf16=False),
    "A10G": Gpu(22.49, (8, 6), 600, 125, 31.2),
    "L4": Gpu(22.49, (8, 9), 300, 121, 30.3),
    "L40S": Gpu(44.99, (8, 9), 864, 362, 91.6),
    "A100-40GB": Gpu(39.49, (8, 0), 1555, 312, 19.5),
    "A100-80GB": Gpu(79.15, (8, 0), 2039, 312, 19.5),
    "H100-80GB": Gpu(79.11, (9, 0), 3350, 989, 67),
    "H200": Gpu(139.8, (9, 0), 4800, 989, 67),
}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with fp8 tensor cores
# AWS instance families -> their GPU (cluster.yaml names instance types)
AWS_INSTANCE_GPUS = {"g4dn": "T4", "g5": "A10G", "g6": "L4", "g6e": "L40S", "p4d": "A100-40GB",
                     "p4de": "A100-80GB", "p5": "H100-80GB", "p5e": "H200", "p5en": "H200"}


def check_quantization(gpu: str, quantization: str) -> None:
    """Raise ValueError when GPU (a GPUS name) cannot run `quantization` (fp8: 8.9+)."""
    if quantization != "fp8":
        return
    have = GPUS[gpu].capability
    if have < FP8_MIN_CAPABILITY:
        able = ", ".join(name for name, g in GPUS.items() if g.capability >= FP8_MIN_CAPABILITY)
        raise ValueError(f"fp8 weights need a GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))}+ "
                         f"({able}); {gpu} has {'.'.join(map(str, have))}: use --quantization int8 there")


def dtype_bytes(dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def param_count(config, head: str = "causal") -> int:
    """Exact parameter count with head "causal", "sequence_classification" or "none" (bare model)."""
    C, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    D = config.head_dim
    layer = (2 * C  # input_layernorm
             + C * 3 * C + 3 * C  # query_key_value
             + (4 * D if config.qk_layernorm else 0)  # q_layernorm, k_layernorm
             + C * C + C  # dense
             + 2 * C  # post_attention_layernorm
             + C * I + I + I * C + C)  # mlp
    total = V * C + L * layer + 2 * C  # embeddings, layers, final_layernorm
    if head == "causal":
        total += 0 if config.tie_word_embeddings else V * C
    elif head == "sequence_classification":
        total += C * config.num_labels
    elif head != "none":
        raise ValueError(f"unknown head {head!r}")
    return total


QUANTIZATIONS = ("none", "int8", "fp8")
# bytes of one per-output-channel scale: int8 keeps its scales in the model dtype (torchao computes
# them in fp32 and casts before the multiply; model/quantization.py stores the cast values), fp8 in float32
SCALE_BYTES = {"int8": None, "fp8": 4}


def quantized_linears(config, head: str = "causal", quantize_lm_head: bool = False) -> list[tuple[int, int]]:
    """(out_features, in_features) of every linear weight `--quantization` turns into 8 bits
    (model/quantization.py): each layer's four, and an untied lm_head with `quantize_lm_head`."""
    C, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    shapes = [(3 * C, C), (C, C), (I, C), (C, I)] * L
    if quantize_lm_head and head == "causal" and not config.tie_word_embeddings:
        shapes.append((config.vocab_size, C))
    return shapes


def weights_bytes(config, dtype, head: str = "causal", quantization: str = "none",
                  quantize_lm_head: bool = False) -> int:
    """Bytes of the weights as loaded: every parameter in `dtype`, but `quantized_linears` in one
    byte plus a scale per row. Persimmon-8B, bf16: 17.5 GiB; int8: 10.8 GiB (9.8 with the lm_head)."""
    it = dtype_bytes(dtype)
    total = param_count(config, head) * it
    if quantization == "none":
        return total
    if quantization not in SCALE_BYTES:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    scale = SCALE_BYTES[quantization] or it
    for out_features, in_features in quantized_linears(config, head, quantize_lm_head):
        total -= out_features * in_features * (it - 1) - out_features * scale
    return total


def kv_bytes_per_token(config, dtype) -> int:
    """K and V of every layer for one token: 2 x layers x hidden x itemsize."""
    return 2 * config.num_hidden_layers * config.hidden_size * dtype_bytes(dtype)


def pool_tokens(kv_bytes: int, per_token: int, block_size: int = 16) -> int:
    """Tokens a KV pool of `kv_bytes` holds for rows: whole blocks, less the null and scratch blocks."""
    return max(0, kv_bytes // (per_token * block_size) - RESERVED_BLOCKS) * block_size


def activation_bytes(config, dtype, max_tokens: int, max_rows: int, head: str = "causal") -> int:
    """Scratch memory of the largest forward the runner runs: `max_tokens` tokens in one
    forward (the prefill token budget plus one decode token per row) and, for a causal LM, the
    262k-vocab head on up to `max_rows` rows with the sampler's fp32 copies and one attention
    call's gathered keys and values. An upper estimate: every term counted as live at once."""
    it, C, I, V = dtype_bytes(dtype), config.hidden_size, config.intermediate_size, config.vocab_size
    per_token = it * (9 * C + I)  # residual, norms, qkv (3C), rotated q/k, attention out; MLP (I)
    if head != "causal":
        return max_tokens * per_token
    # head output and its fp32 copy for every row; then, one after the other, the sampler's sort,
    # softmax and float64 cumsum for SAMPLE_ROWS rows at a time (values 4 + indices 8 + probs 4 +
    # cdf 8 + masks, ~40 B each), and log-probabilities for LOGPROB_ROWS rows at a time (prompt
    # positions included, however few rows: the head in the model dtype, its fp32 copy and
    # log_softmax, it + 8 B each)
    logits = max_rows * V * (it + 4) + max(min(max_rows, SAMPLE_ROWS) * V * 40, LOGPROB_ROWS * V * (it + 8))
    gather = GATHER_TOKENS * 2 * C * it  # one layer's gathered K and V (paged attention on GPU)
    return max_tokens * per_token + logits + gather


def kv_budget_bytes(*, total: int, free_after_load: int, weights: int, headroom: int,
                    memory_fraction: float = 0.9, share: float = 1.0) -> int:
    """Bytes of KV pool for one replica (module docstring); <= 0 when nothing is left."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if not 0 < share <= 1:
        raise ValueError(f"memory share must be in (0, 1], got {share}")
    own = memory_fraction * total * share - weights
    return int(min(memory_fraction * free_after_load, own) - headroom)


def cpu_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory (MemTotal / MemAvailable), capped by a cgroup limit."""
    info = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", total)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text(encoding="ascii").strip()
            if raw == "max" or int(raw) >= total:
                break
            limit, usage = int(raw), int(Path(usage_file).read_text(encoding="ascii"))
            total, available = limit, min(available, max(0, limit - usage))
            break
        except (OSError, ValueError):
            continue
    return total, available


@dataclass
class Capacity:
    """What fits on one device; `as_dict()` is `capacity --json`."""
    weights_bytes: int
    kv_bytes_per_token: int
    activation_bytes: int
    kv_cache_bytes: int
    kv_tokens: int
    kv_block_size: int
    tokens_per_row: int  # prompt + new tokens, rounded up to whole blocks
    rows_in_flight: int  # rows of that length the pool holds at once (capped by max_batch_size)
    max_batch_size: int
    fits: bool  # weights fit, and one row of the profile fits in the KV pool
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def plan(config, *, device_memory_gib: float, dtype="bfloat16", memory_fraction: float = 0.9,
         kv_cache_gib: float | None = None, prompt_tokens: int = 512, new_tokens: int = 256,
         max_batch_size: int = 256, prefill_token_budget: int = 4096, block_size: int = 16,
         head: str = "causal", share: float = 1.0, quantization: str = "none",
         quantize_lm_head: bool = False) -> Capacity:
    """The numbers `ModelRunner` would arrive at on a device of `device_memory_gib` (CUDA context
    included) for rows of `prompt_tokens + new_tokens` tokens."""
    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens),
                        ("max_batch_size", max_batch_size), ("block_size", block_size)):
        if not isinstance(value, int) or value < (0 if name == "new_tokens" else 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not device_memory_gib > 0:
        raise ValueError(f"device memory must be > 0 GiB, got {device_memory_gib}")
    total = int(device_memory_gib * GIB)
    weights = weights_bytes(config, dtype, head, quantization, quantize_lm_head)
    causal = head == "causal"
    per_token = kv_bytes_per_token(config, dtype) if causal else 0
    headroom = activation_bytes(config, dtype, prefill_token_budget + max_batch_size, max_batch_size, head)
    allowed = memory_fraction * total * share  # what this replica may use of the device
    kv = 0
    if causal and kv_cache_gib is not None:
        kv = int(kv_cache_gib * GIB)
        allowed = total * share  # an explicit size overrides the fraction; it must still fit
    elif causal:
        kv = kv_budget_bytes(total=total, free_after_load=total - weights - CUDA_CONTEXT_BYTES,
                             weights=weights, headroom=headroom, memory_fraction=memory_fraction, share=share)
    # the engine's pool: whole blocks, two of them reserved (the null and scratch blocks)
    kv_tokens = pool_tokens(kv, per_token, block_size) if causal else 0
    row = math.ceil((prompt_tokens + new_tokens) / block_size) * block_size
    rows = min(max_batch_size, kv_tokens // row) if causal else max_batch_size
    reason = ""
    if weights + headroom + CUDA_CONTEXT_BYTES + max(kv, 0) * (kv_cache_gib is not None) > allowed:
        reason = (f"weights ({weights / GIB:.1f} GiB), activations ({headroom / GIB:.1f} GiB)"
                  + (f" and kv_cache_gib={kv_cache_gib}" if kv_cache_gib is not None and causal else "")
                  + f" do not fit in {allowed / GIB:.1f} GiB of the device")
    elif causal and rows < 1:
        reason = (f"one row of {prompt_tokens} + {new_tokens} tokens needs {row * per_token / GIB:.2f} GiB "
                  f"of KV cache; the pool has {max(kv, 0) / GIB:.2f} GiB ({kv_tokens} tokens)")
    return Capacity(weights_bytes=weights, kv_bytes_per_token=per_token, activation_bytes=headroom,
                    kv_cache_bytes=max(kv, 0), kv_tokens=kv_tokens, kv_block_size=block_size,
                    tokens_per_row=row, rows_in_flight=max(rows, 0), max_batch_size=max_batch_size,
                    fits=not reason, reason=reason)
