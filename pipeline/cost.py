"""`persimmon-batch plan --gpu L4,L40S,...`: the planned run's cost per GPU type, a roofline
estimate, not a measurement (README: What will a run cost?). The work is the plan's rows and
prompt tokens (sampled, scaled; refused rows free, cut prompts at the limit, a score job's
windows with the tokens they reread) plus the task's per row (`capacity_new_tokens`); decode is
scaled by the GPU's benchmark when there is one (`--calibration`, bench/results/*.json).
"""

from __future__ import annotations

import difflib
import glob
import logging
import math
import os

from model import capacity, roofline
from model.roofline import EFFICIENCY, Work

from .stages import CAUSAL, TASKS

log = logging.getLogger(__name__)

LABEL = "estimate (roofline)"
# USD per GPU-hour, on-demand, AWS us-east-1, Linux: approximate list prices as of mid-2025 from
# the EC2 on-demand pricing page, for the smallest instance of each family with that GPU (which
# also buys its CPUs and RAM). Check them before budgeting; --price-per-hour overrides them.
PRICES = {
    "T4": 0.526,  # g4dn.xlarge
    "A10G": 1.006,  # g5.xlarge
    "L4": 0.805,  # g6.xlarge
    "L40S": 1.861,  # g6e.xlarge (cluster.yaml's g6e.2xlarge: ~2.24)
    "H100-80GB": 6.88,  # p5.48xlarge, ~55/h for 8 GPUs after AWS's June 2025 price cut (~98/h before)
}
PRICES_NOTE = "AWS on-demand us-east-1, approximate list prices of mid-2025 (pipeline/cost.py)"
BENCH_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def _known(name: str, what: str) -> str:
    """A GPU name of capacity.GPUS (any case), or ValueError with a did-you-mean."""
    by_case, key = {gpu.lower(): gpu for gpu in capacity.GPUS}, name.strip().lower()
    if key in by_case:
        return by_case[key]
    close = ([c for c in by_case if c.startswith(key)] if key else []) or \
        difflib.get_close_matches(key, list(by_case), n=2, cutoff=0.4)  # H100 -> H100-80GB first
    hint = f"did you mean {' or '.join(by_case[c] for c in close)}? " if close else ""
    raise ValueError(f"{what}: unknown GPU {name!r}; {hint}known: {', '.join(capacity.GPUS)}")


def parse_gpus(text: str) -> list[str]:
    """--gpu L4,L40S -> ["L4", "L40S"]."""
    names = [n for n in (part.strip() for part in text.split(",")) if n]
    if not names:
        raise ValueError(f"--gpu: no GPU named in {text!r}; e.g. --gpu L4,L40S,H100-80GB")
    return list(dict.fromkeys(_known(n, "--gpu") for n in names))


def parse_prices(text: str | None, gpus: list[str]) -> dict[str, float]:
    """--price-per-hour L4=0.80,H100-80GB=4.5 -> {"L4": 0.8, "H100-80GB": 4.5}, each a GPU of
    `gpus` with a finite price > 0."""
    prices: dict[str, float] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"--price-per-hour: {part!r} is not GPU=USD (e.g. L4=0.80)")
        gpu = _known(name, "--price-per-hour")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"--price-per-hour: {gpu}'s price {value!r} is not a number") from None
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"--price-per-hour: {gpu}'s price must be a number > 0 (USD per GPU-hour), got {value}")
        if gpu not in gpus:
            raise ValueError(f"--price-per-hour: {gpu} is not among --gpu {','.join(gpus)}")
        if gpu in prices:
            raise ValueError(f"--price-per-hour: {gpu} is priced twice ({prices[gpu]:g} and {value.strip()})")
        prices[gpu] = price
    return prices


def calibrations(paths: list[str] | None, results_dir: str = BENCH_RESULTS,
                 gpus: list[str] | None = None) -> dict[str, roofline.Calibration]:
    """{GPU: its Calibration}: from `paths` (errors raised, also for two files of one GPU or one of
    a GPU not in `gpus`), else every JSON under `results_dir` (one that is not a GPU benchmark
    skipped with a warning; of two for one GPU, the later name wins)."""
    found: dict[str, roofline.Calibration] = {}
    for path in paths or []:
        cal = roofline.read_calibration(path)
        if cal.gpu in found:
            raise ValueError(f"--calibration: {found[cal.gpu].source} and {path} are both for {cal.gpu}; give one")
        if gpus is not None and cal.gpu not in gpus:
            raise ValueError(f"--calibration: {path} measured {cal.device} ({cal.gpu}), which is not among "
                             f"--gpu {','.join(gpus)}")
        found[cal.gpu] = cal
    if paths:
        return found
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            cal = roofline.read_calibration(path)
        except ValueError as e:
            log.warning("not used for calibration: %s", e)
            continue
        found[cal.gpu] = cal
    return found


def _work(config, prompts: dict, rows_to_run: int) -> tuple[Work, dict]:
    """The job's Work (rows in flight left at 1) and how its numbers were found."""
    task = TASKS[config.task]
    read = prompts["rows_read"] if prompts else 0
    over, over_tokens = (prompts["rows_over_limit_read"], prompts["tokens_over_limit_read"]) if read else (0, 0)
    measured_tokens = prompts["tokens_measured"] if read else 0
    refused = read and prompts["limit"]["over"] == "prompt_too_long"
    score = task.scores_text
    limit = prompts["limit"]["tokens"] if read else 0
    if refused:  # the engine refuses those rows: they cost nothing
        measured_tokens -= over_tokens
    scored_positions = measured_tokens  # score: every token is scored once, however many windows read it
    if over and not refused and score:  # rolling windows of `limit` tokens: each after the first reads
        # `limit` tokens to score `stride` new ones (model/scoring.py, rolling_windows)
        stride = config.score_stride or max(1, limit // 2)
        measured_tokens += round((over_tokens - over * limit) * (limit / stride - 1))
    elif over and not refused:  # cut to fit: about the limit's tokens each
        measured_tokens += over * limit - over_tokens
        scored_positions = measured_tokens
    engine_rows = read - prompts["rows_not_run"] - (over if refused else 0) if read else 0
    rows = round(rows_to_run * engine_rows / read) if read else 0
    prompt_tokens = round(measured_tokens * rows_to_run / read) if read else 0
    causal = task.architecture == CAUSAL
    per_row = task.capacity_new_tokens(config) if causal and not score else 0  # score decodes and adds nothing
    new, scored = (per_row, 0) if task.generates else (0, per_row)
    # score, and prompt log-probabilities, run the head on every prompt position (all but the last
    # predict a token; the last is the row's own head position, as in every task)
    head = (round(scored_positions * rows_to_run / read) - rows if read else 0) \
        if score or (task.generates and config.prompt_logprobs) else 0
    return Work(rows=rows, prompt_tokens=prompt_tokens, new_tokens=new, scored_tokens=scored * rows,
                head_tokens=max(0, head)), {
        "rows_to_run": rows_to_run, "rows": rows, "prompt_tokens": prompt_tokens,
        "mean_prompt_tokens": round(prompt_tokens / rows, 2) if rows else None,
        "measured": "all rows" if prompts and prompts["exact"] else f"a sample of {read} rows, scaled",
        "new_tokens_per_row": new, "scored_tokens_per_row": scored,
        "output_tokens": max(0, head) if score else rows * (new or scored),
    }


def estimate(config, model_config, head: str, prompts: dict | None, rows_to_run: int, gpus: list[str],
             prices: dict[str, float] | None = None, calibrated: dict | None = None,
             efficiency: float = EFFICIENCY) -> dict:
    """Per GPU: KV need and capacity, roofline prefill and decode time, GPU-hours and cost; the dict
    `plan --json` prints under "estimate"."""
    prices, calibrated = prices or {}, calibrated or {}
    work, job = _work(config, prompts, rows_to_run)
    dtype = "bfloat16" if config.dtype == "auto" else config.dtype  # as GPU replicas resolve auto
    gpus_per_replica = max(1.0, config.num_gpus_per_replica)
    share = config.num_gpus_per_replica if 0 < config.num_gpus_per_replica < 1 else 1.0
    configured = min(config.max_num_seqs, config.batch_size)
    mean_prompt = max(1, round(work.prompt_tokens / work.rows)) if work.rows else 1
    row_new = work.new_tokens or (work.scored_tokens // work.rows if work.rows else 0)
    out = {"label": LABEL, "dtype": dtype, "quantization": config.quantization,
           "quantize_lm_head": config.quantize_lm_head, "efficiency": efficiency, "prices": PRICES_NOTE,
           **job, "rows_in_flight_configured": configured, "gpus": []}
    for gpu in gpus:
        spec = capacity.GPUS[gpu]
        row = {"gpu": gpu, "memory_gib": spec.memory_gib, "bandwidth_gbs": spec.bandwidth_gbs,
               "peak_tflops": spec.fp32_tflops if dtype == "float32" else spec.tensor_tflops,
               "price_per_hour": prices.get(gpu, PRICES.get(gpu)),
               "price_from": "--price-per-hour" if gpu in prices else "default" if gpu in PRICES else None}
        out["gpus"].append(row)
        try:
            capacity.check_quantization(gpu, config.quantization)
            spec.peak_flops(dtype)
        except ValueError as e:
            row.update(fits=False, reason=f"cannot run this job: {e}")
            continue
        cap = capacity.plan(model_config, device_memory_gib=row["memory_gib"], dtype=dtype,
                            memory_fraction=config.memory_fraction, kv_cache_gib=config.kv_cache_gib,
                            prompt_tokens=mean_prompt, new_tokens=row_new, max_batch_size=configured, head=head,
                            share=share, quantization=config.quantization, quantize_lm_head=config.quantize_lm_head)
        row.update(fits=cap.fits, reason=cap.reason and f"does not fit: {cap.reason}", weights_bytes=cap.weights_bytes,
                   kv_tokens_needed=configured * cap.tokens_per_row if head == "causal" else 0,
                   kv_tokens_capacity=cap.kv_tokens, rows_in_flight_capacity=cap.rows_in_flight,
                   rows_in_flight=max(1, min(cap.rows_in_flight, work.rows)))
        if not cap.fits:
            continue
        work.rows_in_flight = row["rows_in_flight"]
        line = roofline.roofline(model_config, spec, work, dtype=dtype, head=head, quantization=config.quantization,
                                 quantize_lm_head=config.quantize_lm_head, efficiency=efficiency)
        decode_s, cal = line.decode_s, calibrated.get(gpu)
        if cal is not None and line.decode_steps:
            factor, bench_rows = cal.factor(work.rows_in_flight)
            decode_s = line.decode_s / factor
            row["calibration"] = {"source": cal.source, "device": cal.device, "dtype": cal.dtype,
                                  "factor": factor, "bench_rows": bench_rows}
            if config.quantization != "none":
                row["calibration"]["note"] = f"measured with {cal.dtype} weights, not {config.quantization}"
        elif cal is not None:
            row["calibration"] = {"source": cal.source, "unused": "the task decodes nothing; the benchmark "
                                                                   "measured decode steps only"}
        hours = (line.prefill_s + decode_s) / 3600
        row.update(roofline=line.as_dict(), prefill_hours=line.prefill_s / 3600, decode_hours=decode_s / 3600,
                   hours=hours, gpu_hours=hours * gpus_per_replica,
                   cost_usd=hours * gpus_per_replica * row["price_per_hour"] if row["price_per_hour"] else None)
    return out


def estimate_lines(est: dict) -> list[str]:
    """The estimate as `plan` prints it."""
    task_tokens = (f"up to {est['new_tokens_per_row']} new tokens/row, decoded" if est["new_tokens_per_row"] else
                   f"{est['scored_tokens_per_row']} scored tokens/row, no decoding" if est["scored_tokens_per_row"]
                   else f"{est['output_tokens']:,} prompt tokens scored, no decoding" if est["output_tokens"]
                   else "no new tokens")
    quant = f", {est['quantization']} weights" + (" and lm_head" if est["quantize_lm_head"] else "") \
        if est["quantization"] != "none" else ""
    lines = [f"{est['label']}: {est['rows']:,} rows to the engine, {est['prompt_tokens']:,} prompt tokens "
             f"({est['measured']}; mean {est['mean_prompt_tokens']}), {task_tokens}; {est['dtype']}{quant}, "
             f"{est['rows_in_flight_configured']} rows in flight configured",
             f"  {'GPU':<10} {'KV tokens need/have':>21} {'rows':>5} {'prefill':>9} {'decode':>9} "
             f"{'GPU-hours':>9} {'$/GPU-h':>8} {'cost':>9}"]
    notes = []
    for g in est["gpus"]:
        if not g["fits"]:
            lines.append(f"  {g['gpu']:<10} {g['reason']}")
            continue
        price = f"{g['price_per_hour']:.3f}" if g["price_per_hour"] else "-"
        cost = ("no price" if g["cost_usd"] is None else f"${g['cost_usd']:,.2f}" if g["cost_usd"] >= 0.01
                else "<$0.01")
        kv = f"{g['kv_tokens_needed']:,}/{g['kv_tokens_capacity']:,}"
        mark = "*" if "factor" in g.get("calibration", {}) else " "
        decode = _duration(g["decode_hours"]) if g["roofline"]["decode_steps"] else "-"
        lines.append(f"  {g['gpu']:<10} {kv:>21} {g['rows_in_flight']:>5} {_duration(g['prefill_hours']):>9} "
                     f"{decode:>8}{mark} {g['gpu_hours']:>9.4g} {price:>8} {cost:>9}")
        cal = g.get("calibration")
        if cal and "factor" in cal:
            notes.append(f"  * {g['gpu']} decode calibrated by {cal['source']}: measured {cal['device']} "
                         f"({cal['dtype']} weights) at {cal['bench_rows']} rows ran at {cal['factor']:.2f} x roofline"
                         + (f" ({cal['note']})" if "note" in cal else ""))
        elif cal:
            notes.append(f"  {g['gpu']}: {cal['source']} not used: {cal['unused']}")
        if g["cost_usd"] is None:
            notes.append(f"  {g['gpu']}: no default price; give --price-per-hour {g['gpu']}=USD")
    lines += notes
    lines.append(f"  roofline: prefill at {est['efficiency']:.0%} of peak dense FLOP/s; a decode step the longer of "
                 f"(weights + KV read) / bandwidth and FLOPs / ({est['efficiency']:.0%} of peak); datasheets in "
                 f"model/capacity.py; prices {est['prices']}; --json has every number")
    return lines


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min" if seconds < 3600 else f"{hours:.2f} h"
