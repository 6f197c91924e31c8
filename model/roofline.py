"""Roofline time of a batch job on a GPU, from the config and the GPU's datasheet alone: a lower
bound, not a measurement. `persimmon-batch plan --gpu` turns it into hours and dollars
(pipeline/cost.py); a GPU benchmark's measured decode steps can scale it (`Calibration`).

    prefill   2 x matmul params x tokens FLOPs / (peak dense FLOP/s x EFFICIENCY); the head runs
              on each row's last position (and on every scored choice token of a label job,
              every prompt position of a score job or of prompt log-probabilities)
    decode    steps = rows x new tokens / rows in flight; each step takes the longer of reading
              (weights + the rows' KV cache) / bandwidth and 2 x matmul params x rows FLOPs / (peak x EFFICIENCY)

"Matmul params" leave out the input embedding (a gathered row, not a matmul): a decode step
reads 15.5 GiB of Persimmon-8B's 17.5 GiB in bf16, ~5 ms on an H100. The KV read per step is
each row's average context (prompt + half its new tokens). Not counted: attention's own FLOPs
(~2% at 500 tokens of context), sampling, the scheduler, Ray Data's CPU side, replica start-up.

Quantized weights are costed as this engine runs them on a GPU, not as a fused kernel would:
`QuantizedLinear` dequantizes each 64 MiB weight slice (larger than L2) into the activation dtype
in device memory, then multiplies, so a quantized weight moves 1 byte read + `it` written + `it`
read back (5 bytes in bf16 against 2), at the 16-bit peak: on a GPU int8 buys KV room, not bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from .capacity import GPUS, Gpu, dtype_bytes, kv_bytes_per_token, param_count, quantized_linears, weights_bytes
from .config import PersimmonConfig
from .sampling_params import is_int, is_number

EFFICIENCY = 0.5  # share of the peak FLOP/s matmuls reach (assumed; a calibration replaces it for decode)


def matmul_params(config, head: str = "causal") -> tuple[int, int]:
    """(body, head): the parameters every token multiplies through (the layers and final norm,
    non-matmul ones counted as if), and the head's (lm_head, or a classifier's score)."""
    embedding = config.vocab_size * config.hidden_size
    head_params = embedding if head == "causal" else config.hidden_size * config.num_labels
    return param_count(config, "none") - embedding, head_params


def step_weights_bytes(config, dtype, head: str = "causal", quantization: str = "none",
                       quantize_lm_head: bool = False, with_head: bool = True) -> int:
    """Bytes of weight traffic in one decode step: every weight but the input embedding read once
    (a tied lm_head reads that matrix whole), plus each quantized weight's dequantized copy
    written and read back; without the head (`with_head` False) as a layers-only benchmark."""
    it = dtype_bytes(dtype)
    embedding = config.vocab_size * config.hidden_size * it  # gathered, never read whole; never quantized
    if with_head:
        read = weights_bytes(config, dtype, head, quantization, quantize_lm_head)
        read -= 0 if config.tie_word_embeddings else embedding
    else:
        read = weights_bytes(config, dtype, "none", quantization) - embedding
    if quantization == "none":
        return read
    shapes = quantized_linears(config, head if with_head else "none", quantize_lm_head)
    return read + 2 * it * sum(out_features * in_features for out_features, in_features in shapes)


@dataclass
class Step:
    """One decode step: what it reads and computes, and the time the longer of the two takes."""
    bytes: int
    flops: int
    seconds: float
    bound: str  # "memory" or "compute"


def decode_step(config, spec: Gpu, *, rows: int, context: float, dtype="bfloat16", quantization: str = "none",
                quantize_lm_head: bool = False, efficiency: float = EFFICIENCY, with_head: bool = True) -> Step:
    """A decode step of `rows` rows with `context` tokens of KV each (see the module doc)."""
    body, head_params = matmul_params(config)
    read = (step_weights_bytes(config, dtype, "causal", quantization, quantize_lm_head, with_head)
            + int(rows * context) * kv_bytes_per_token(config, dtype))
    flops = 2 * (body + (head_params if with_head else 0)) * rows
    memory_s, compute_s = read / (spec.bandwidth_gbs * 1e9), flops / (spec.peak_flops(dtype) * efficiency)
    return Step(read, flops, max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute")


@dataclass
class Work:
    """What a job asks of the replicas, in tokens."""
    rows: int
    prompt_tokens: int  # all rows' prompts together
    new_tokens: int = 0  # generated per row by decode steps (0: the task decodes nothing)
    scored_tokens: int = 0  # computed after the prompts without decoding (label: the choices), with the head on each
    rows_in_flight: int = 1  # decode batch
    head_tokens: int = 0  # prompt positions besides each row's last that the head runs on (score, prompt logprobs)


@dataclass
class Roofline:
    prefill_flops: int
    prefill_s: float
    decode_steps: int
    decode_step: Step | None
    decode_s: float
    efficiency: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def as_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def roofline(config, spec: Gpu, work: Work, *, dtype="bfloat16", head: str = "causal", quantization: str = "none",
             quantize_lm_head: bool = False, efficiency: float = EFFICIENCY) -> Roofline:
    """The job's time on one GPU of `spec` (see the module doc)."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    body, head_params = matmul_params(config, head)
    flops = 2 * body * (work.prompt_tokens + work.scored_tokens) + 2 * head_params * (work.rows + work.scored_tokens + work.head_tokens)
    prefill_s = flops / (spec.peak_flops(dtype) * efficiency)
    if not work.new_tokens or not work.rows:
        return Roofline(flops, prefill_s, 0, None, 0.0, efficiency)
    rows = max(1, min(work.rows_in_flight, work.rows))
    steps = math.ceil(work.rows * work.new_tokens / rows)
    context = work.prompt_tokens / work.rows + work.new_tokens / 2
    step = decode_step(config, spec, rows=rows, context=context, dtype=dtype, quantization=quantization,
                       quantize_lm_head=quantize_lm_head, efficiency=efficiency)
    return Roofline(flops, prefill_s, steps, step, steps * step.seconds, efficiency)


# ---- calibration by a GPU benchmark --------------------------------------------------------
# torch.cuda.get_device_name() -> our GPU names (first match wins)
DEVICE_NAMES = (("H200", "H200"), ("H100 80GB HBM3", "H100-80GB"), ("H100-SXM", "H100-80GB"), ("L40S", "L40S"),
                ("L4", "L4"), ("A10G", "A10G"), ("A100-SXM4-80GB", "A100-80GB"), ("A100-SXM4-40GB", "A100-40GB"),
                ("T4", "T4"))


def gpu_of_device(name: str) -> str | None:
    """Our GPU name for a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100-80GB"), else None."""
    return next((gpu for pattern, gpu in DEVICE_NAMES if pattern in name), None)


@dataclass
class Calibration:
    """Decode steps bench/gpu_bench.py measured on one GPU (gpu_bench.json: a Persimmon-width
    model of a few layers; `decode_step_ms` times the layers for `batch` rows of ~prompt_len[1]
    tokens), beside their roofline."""
    source: str
    gpu: str
    device: str
    dtype: str
    points: list  # [(rows, measured seconds, roofline seconds)]

    def factor(self, rows_in_flight: int) -> tuple[float, int]:
        """(roofline / measured step time, its rows) at the measured batch nearest `rows_in_flight` (by ratio)."""
        rows, measured, modelled = min(self.points, key=lambda p: abs(math.log(p[0] / max(rows_in_flight, 1))))
        return modelled / measured, rows


def read_calibration(path: str) -> Calibration:
    """A gpu_bench.json as a Calibration; ValueError naming the file for one that cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            bench = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"calibration {path}: cannot read it as JSON ({e})") from None
    if not isinstance(bench, dict):
        raise ValueError(f"calibration {path}: not a bench/gpu_bench.py result (a JSON {type(bench).__name__}, "
                         "not an object)")
    missing = [k for k in ("device", "dtype", "layers", "params_b", "prompt_len", "results") if k not in bench]
    if missing:
        raise ValueError(f"calibration {path}: not a bench/gpu_bench.py result (no {', '.join(missing)}; "
                         "files from before prompt_len was recorded need a rerun)")
    _check_bench(path, bench)
    gpu = gpu_of_device(bench["device"])
    if gpu is None:
        raise ValueError(f"calibration {path}: device {bench['device']!r} is none of {sorted(GPUS)}")
    config = PersimmonConfig(num_hidden_layers=bench["layers"])
    if round(param_count(config) / 1e9, 3) != bench["params_b"]:
        raise ValueError(f"calibration {path}: its model ({bench['params_b']}B parameters) is not Persimmon-8B's "
                         f"widths with {bench['layers']} layers (a --tiny run?)")
    context = bench["prompt_len"][1]
    points = []
    for result in bench["results"]:
        if result.get("decode_step_ms"):
            step = decode_step(config, GPUS[gpu], rows=result["batch"], context=context, dtype=bench["dtype"],
                               with_head=False)
            points.append((result["batch"], result["decode_step_ms"] / 1e3, step.seconds))
    if not points:
        raise ValueError(f"calibration {path}: no result with decode_step_ms")
    return Calibration(path, gpu, bench["device"], bench["dtype"], points)


def _check_bench(path: str, bench: dict) -> None:
    """ValueError naming the file and the field for a gpu_bench.json field of the wrong kind (a
    hand-edited or truncated file), before any arithmetic runs on it."""
    def positive_int(v) -> bool:
        return is_int(v) and v > 0

    def check(field: str, value, valid, want: str) -> None:
        if not valid(value):
            raise ValueError(f"calibration {path}: {field} must be {want}, got {value!r:.60}")

    for field, valid, want in (
            ("device", lambda v: isinstance(v, str), "a CUDA device name"),
            ("dtype", lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
            ("layers", positive_int, "a positive integer"),
            ("params_b", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
            ("prompt_len", lambda v: isinstance(v, list) and len(v) == 2 and all(map(positive_int, v)),
             "[shortest, longest] prompt tokens"),
            ("results", lambda v: isinstance(v, list), "a list")):
        check(field, bench[field], valid, want)
    for k, result in enumerate(bench["results"]):
        check(f"results[{k}]", result, lambda v: isinstance(v, dict), "an object")
        if result.get("decode_step_ms"):  # else no decode step was timed at this batch
            check(f"results[{k}].batch", result.get("batch"), positive_int, "a positive integer (rows per decode step)")
            check(f"results[{k}].decode_step_ms", result["decode_step_ms"],
                  lambda v: is_number(v) and v > 0, "a number > 0")
