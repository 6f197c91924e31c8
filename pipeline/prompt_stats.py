"""Prompt lengths for `persimmon-batch plan` (README: Check first): each prompt built by the
stage's own code and tokenized as the engine does, the rows over the task's limit, and the rows
the run would not send to the engine apart. A seeded uniform sample (same input, same numbers),
or every row with `sample_rows=0`; nearest-rank percentiles; the measured tokens feed `plan --gpu`.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .settings import PipelineConfig
from .formats import INPUT_FORMATS
from .stages import TASKS, build_prompt, column_values
from .modelcheck import TOKENIZER_FILES
from .storage import local_copy, model_location, resolve

SAMPLE_ROWS = 2000
READ_ROWS = 1 << 16  # rows per read of a unit's prompts


def load_tokenizer(config: PipelineConfig):
    """(the tokenizer, max_position_embeddings) of the checkpoint the replicas load."""
    from model import PersimmonConfig, PersimmonTokenizer

    with local_copy(model_location(config.model, config), (*TOKENIZER_FILES, "config.json")) as path:
        return PersimmonTokenizer.from_pretrained(path), PersimmonConfig.from_pretrained(path).max_position_embeddings


def prompt_stats(config: PipelineConfig, plan, sample_rows: int = SAMPLE_ROWS, threads: int = 8,
                 seed: int = 0) -> dict:
    """Token statistics of the prompts of the plan's units (see the module doc)."""
    t0 = time.perf_counter()
    units = plan.units
    total = sum(u.num_rows for u in units)
    exact = sample_rows <= 0 or sample_rows >= total
    picks = {k: None for k in range(len(units))} if exact else _sample(units, sample_rows, seed)
    tokenizer, max_positions = load_tokenizer(config)
    task = TASKS[config.task]
    limit_name, limit, action = task.prompt_limit(config, max_positions)

    def measure(text: str) -> tuple[int, bool]:  # (prompt tokens as the engine counts them, too long?)
        return task.prompt_tokens(config, tokenizer.encode, text, limit)

    prefix = task.render_prefix(config)
    lengths, over, read, not_run = Counter(), Counter(), 0, 0
    with ThreadPoolExecutor(max(1, min(threads, len(picks)))) as pool:
        for unit_lengths, unit_over, unit_read, unit_not_run in pool.map(
                lambda k: _measure_unit(config, units[k], picks[k], prefix, measure), picks):
            lengths.update(unit_lengths)
            over.update(unit_over)
            read, not_run = read + unit_read, not_run + unit_not_run
    over_rows, measured = sum(over.values()), sum(n * rows for n, rows in lengths.items())
    return {
        "rows": total, "rows_read": read, "exact": exact, "rows_not_run": not_run,
        "tokens": percentiles(lengths),
        "tokens_measured": measured,  # all measured rows' prompts together
        "mean_tokens": round(measured / sum(lengths.values()), 2) if lengths else None,
        "limit": {"name": limit_name, "tokens": limit, "over": action},
        "rows_over_limit": over_rows if exact else round(over_rows * total / read) if read else 0,
        "rows_over_limit_read": over_rows,
        "tokens_over_limit_read": sum(n * rows for n, rows in over.items()),  # their prompts' tokens
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _sample(units: list, size: int, seed: int) -> dict[int, np.ndarray]:
    """`size` rows drawn uniformly from all units' rows: {unit index: its rows, sorted}."""
    sizes = np.array([u.num_rows for u in units], np.int64)
    chosen = np.sort(np.random.default_rng(seed).choice(int(sizes.sum()), size=size, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.searchsorted(starts, chosen, side="right") - 1
    bounds = np.searchsorted(owner, np.arange(len(units) + 1))  # owner is sorted
    return {k: chosen[bounds[k]:bounds[k + 1]] - starts[k] for k in range(len(units)) if bounds[k + 1] > bounds[k]}


def _measure_unit(config: PipelineConfig, unit, rows: np.ndarray | None, prefix: str,
                  measure) -> tuple[Counter, Counter, int, int]:
    """(token counts, those over the limit, rows read, rows not run) of a unit's sorted `rows`
    (None: all), reading only its prompts."""
    planned = {int(row) for row, _ in unit.row_errors}
    lengths, over, read, not_run = Counter(), Counter(), 0, 0
    start = 0
    reading = dataclasses.replace(config, batch_size=READ_ROWS)
    for batch, read_errors in INPUT_FORMATS[unit.input_format].batches(
            resolve(unit.input_uri, config), unit.split, reading, [config.prompt_column]):
        n, prompts = batch.num_rows, batch[config.prompt_column]
        if rows is None:
            here = np.arange(n)
        else:  # only the picked rows become Python values
            here = rows[np.searchsorted(rows, start):np.searchsorted(rows, start + n)] - start
            prompts = prompts.take(here)
        for i, value in zip(here.tolist(), column_values(prompts)):
            read += 1
            text, _ = build_prompt(config, prefix, value)
            if text is None or start + i in planned or i in read_errors:
                not_run += 1
                continue
            tokens, too_long = measure(text)
            lengths[tokens] += 1
            if too_long:
                over[tokens] += 1
        start += n
    return lengths, over, read, not_run


def percentiles(lengths: Counter) -> dict | None:
    """Nearest-rank p50 / p90 / p99 and the max of a {token count: rows} histogram."""
    if not lengths:
        return None
    values = np.array(sorted(lengths), np.int64)
    cumulative = np.cumsum([lengths[v] for v in values])
    n = int(cumulative[-1])

    def rank(p: float) -> int:
        return int(values[np.searchsorted(cumulative, max(1, int(np.ceil(p * n))))])

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": int(values[-1])}


def prompt_lines(stats: dict) -> list[str]:
    """The plan summary's lines about prompt lengths."""
    read = f"{stats['rows_read']:,}"
    where = (f"all {read} rows" if stats["exact"] else
             f"a sample of {read} of {stats['rows']:,} rows; --sample-rows 0 for all")
    t, limit = stats["tokens"], stats["limit"]
    if t is None:
        return [f"prompts: no row to measure ({where})"]
    over = stats["rows_over_limit"]
    over_text = (f"{over:,} row(s)" if stats["exact"] else
                 f"~{over:,} row(s) ({stats['rows_over_limit_read']} in the sample)")
    return [f"prompts: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']} tokens ({where}"
            + (f"; {stats['rows_not_run']} not run: id or prompt errors" if stats["rows_not_run"] else "") + ")",
            f"prompts over {limit['name']} {limit['tokens']}: {over_text}"
            + (f", {limit['over']}" if over else "")]
