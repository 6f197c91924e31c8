"""Stage classes: one callable per task, built once per Ray actor, holding one `Engine`.

A stage only converts columns: input rows -> prompts -> one engine call -> output columns.
It never raises for bad input: a row that cannot be processed (null, non-string, blank
prompt, undecodable bytes, an engine error) comes back with `error` set and its id kept, and
its neighbours are unaffected. Call a stage on a hand-built batch without Ray:

    stage = GenerateStage(PipelineConfig(task="generate", ...), engine=my_engine)
    out = stage({"id": [1, 2], "prompt": ["a", "b"]})        # -> pyarrow.Table

Batches may be a `pyarrow.Table`/`RecordBatch`, a dict of columns (lists or numpy arrays) or
a pandas DataFrame; the result is always a `pyarrow.Table` with a fixed schema per task, so
files written from different batches (including all-error ones) have identical schemas.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from .config import PipelineConfig
from .priority import normal_priority
from .tasks import TASKS
from .attachments import render_prefix
from .row_settings import SAMPLING_COLUMNS, row_overrides

log = logging.getLogger(__name__)



def error_kind(message: str | None) -> str | None:
    """The kind of an error message, for counting: its text before the first ':'."""
    if message is None:
        return None
    head = message.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[a-z][a-z0-9_]{0,39}", head) else "other"


def engine_error(result) -> str:
    """An engine result's per-row error as 'kind: detail' (the engine says the kind)."""
    return f"{result.error_kind or 'engine_error'}: {result.error}"


def memory_share(config: PipelineConfig, on_gpu: bool) -> float:
    """The part of its device this replica owns, so replicas sharing a device each size their
    KV cache from their share: --num-gpus-per-replica on a GPU (0.5 = half), and on CPU its
    CPUs over the node's (Ray places CPU replicas by CPUs, so that many can share the node)."""
    if on_gpu:
        g = config.num_gpus_per_replica
        return g if 0 < g < 1 else 1.0
    node_cpus = os.cpu_count() or 1
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            node_cpus = next((n["Resources"].get("CPU", node_cpus) for n in ray.nodes() if n["NodeID"] == node),
                             node_cpus)
    except Exception:  # noqa: BLE001 - outside Ray, or an old GCS: the machine's CPUs
        pass
    return min(1.0, max(1.0, config.num_cpus_per_replica) / max(1.0, node_cpus))


def load_engine(config: PipelineConfig):
    """Engine.from_pretrained for this replica: model fetched to the node cache if remote,
    device CUDA when this actor was given a GPU (and torch sees one), else CPU; dtype as the
    config resolves it; KV cache from --kv-cache-gib or this replica's share of the device."""
    import torch

    from model import Engine

    from .storage import local_model_dir

    device = None if config.device == "auto" else config.device
    on_gpu = device == "cuda" or (device is None and config.num_gpus_per_replica > 0 and torch.cuda.is_available())
    device = device or ("cuda" if on_gpu else "cpu")  # a CPU replica never takes a GPU it was not given
    normal_priority()
    dtype = config.resolved_dtype  # decided from the config, recorded with every output
    if not on_gpu and torch.get_num_threads() > max(1, int(config.num_cpus_per_replica)):
        torch.set_num_threads(max(1, int(config.num_cpus_per_replica)))  # share cores with other replicas
    path = local_model_dir(config.model, config)
    return Engine.from_pretrained(path, max_batch_size=config.max_num_seqs, max_seq_len=config.max_seq_len,
                                  dtype=dtype, device=device, kv_cache_gib=config.kv_cache_gib,
                                  memory_fraction=config.memory_fraction,
                                  memory_share=memory_share(config, on_gpu))


def as_table(batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    if isinstance(batch, dict):
        return pa.table({k: v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(_pylist(v))
                         for k, v in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)  # pandas DataFrame


def _pylist(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def column_values(column) -> list:
    """Python values of a column. A string column holding invalid UTF-8 is read as bytes, so
    `check_prompt` fails only the rows that do not decode, not the whole batch."""
    if not isinstance(column, (pa.Array, pa.ChunkedArray)):
        return _pylist(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return column.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            column = column.cast(pa.large_binary())
    return column.to_pylist()


def check_prompt(value) -> tuple[str | None, str | None]:
    """(text, None) for a usable prompt, else (None, error message)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"invalid_prompt: not valid UTF-8 ({e.reason} at byte {e.start})"
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None, "invalid_prompt: null"
    if not isinstance(value, str):
        return None, f"invalid_prompt: expected a string, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (Python API input; Arrow strings have none)
        return None, f"invalid_prompt: lone surrogate U+{ord(value[e.start]):04X} at position {e.start}"
    if not value.strip():
        return None, "empty_prompt: prompt is empty or whitespace only"
    return value, None


def build_prompt(config: PipelineConfig, prefix: str, value) -> tuple[str | None, str | None]:
    """(the text the engine gets for a row's prompt value, None), or (None, the row's error): the
    value checked (`check_prompt`), then the few-shot prefix and the prompt template (chat
    wrapper included). `persimmon-batch plan` measures prompts with this too."""
    text, error = check_prompt(value)
    return (None, error) if text is None else (prefix + config.template.format(prompt=text), None)


def row_seed(base: int | None, row_id: Any) -> int | None:
    """A per-row seed from the base seed and the row id: stable across retries and batching."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{row_id!r}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class _Stage:
    """Shared column plumbing. Subclasses implement `_run(texts, ids, rows) -> list[dict]`, where
    `rows` holds what `_prepare` made of each row's own settings (generate: its SamplingParams).

    All torch work (loading the model, every engine call) runs on one thread the stage owns.
    Ray Data builds the class on the actor's main thread but calls it from a worker thread;
    each thread that runs torch ops gets its own OpenMP team, and with two teams on a CPU
    replica OpenMP counts more threads than cores and stops spinning between parallel
    regions: the replica then ran ~25% slower with cores idle (measured on 2 cores)."""

    task: str = ""
    row_columns: tuple[str, ...] = ()  # input columns a row may set for itself (read by `_prepare`)

    def __init__(self, config: PipelineConfig, engine=None):
        self.config = config.validate()
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persimmon-engine")
        t0 = time.perf_counter()
        self.engine = engine if engine is not None else self._on_torch_thread(load_engine, config)
        self.prefix = render_prefix(self.config)  # few-shot examples: every row starts with them
        if self.prefix and hasattr(self.engine, "pin_prefix"):
            self._on_torch_thread(self.engine.pin_prefix, self.prefix)  # computed once, kept
        self.load_seconds = time.perf_counter() - t0
        self.engine_seconds = 0.0  # inside engine calls, summed (the run report's time breakdown)
        self.columns = TASKS[self.task].columns

    def _on_torch_thread(self, fn, *args):
        return self._torch_thread.submit(fn, *args).result()

    def engine_stats(self) -> dict | None:
        """The engine's sizing and counters (KV capacity and peak, rows in flight, preemptions),
        or None for an engine without them (test doubles)."""
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else None

    def __call__(self, batch, row_errors: dict[int, str] | None = None) -> pa.Table:
        """Results for every row of `batch`, in order. `row_errors` ({row index: error}) marks
        rows that get that error without being run (duplicate or null ids found by the plan)."""
        cfg = self.config
        names = list(batch.keys()) if isinstance(batch, dict) else as_table(batch).column_names
        for col in (cfg.id_column, cfg.prompt_column, *cfg.keep_columns):
            if col not in names:
                raise KeyError(f"batch has no column {col!r} (columns: {names})")
        if isinstance(batch, dict):  # prompts may be of mixed Python types: check them unconverted
            prompts = [build_prompt(cfg, self.prefix, v) for v in _pylist(batch[cfg.prompt_column])]
            table = as_table({k: batch[k] for k in (cfg.id_column, *cfg.keep_columns)})
        else:
            table = as_table(batch)
            prompts = [build_prompt(cfg, self.prefix, v) for v in column_values(table[cfg.prompt_column])]
        ids = table[cfg.id_column].to_pylist()
        own = {c: column_values(batch[c] if isinstance(batch, dict) else table[c])
               for c in self.row_columns if c in names}
        prepared = self._prepare(own, ids)
        for i, (_, err) in enumerate(prepared):
            if err is not None and prompts[i][1] is None:
                prompts[i] = (None, err)
        for i, err in (row_errors or {}).items():
            prompts[i] = (None, err)
        results: list[dict] = [{"error": err} for _, err in prompts]
        ok = [i for i, (text, _) in enumerate(prompts) if text is not None]
        if ok:
            texts = [prompts[i][0] for i in ok]
            for i, res in zip(ok, self._safe_run(texts, [ids[i] for i in ok], [prepared[i][0] for i in ok])):
                results[i] = res
        arrays = {cfg.id_column: table[cfg.id_column]}
        for col in cfg.keep_columns:
            arrays[col] = table[col]
        for col, kind in self.columns:
            arrays[col] = pa.array([r.get(col) for r in results], type=kind)
        return pa.table(arrays)

    def _prepare(self, own: dict[str, list], ids: list) -> list[tuple[Any, str | None]]:
        """Per row: (what `_run` needs beyond its text, or an error that keeps it from running),
        from the values of the batch's `row_columns` (`own`). Tasks without per-row settings
        need nothing."""
        return [(None, None)] * len(ids)

    def _safe_run(self, texts: list[str], ids: list, rows: list) -> list[dict]:
        """One engine call for the batch; if it raises, retry row by row so one poisoned row
        only fails itself."""
        try:
            t0 = time.perf_counter()
            try:
                out = self._on_torch_thread(self._run, texts, ids, rows)
            finally:
                self.engine_seconds += time.perf_counter() - t0
            if len(out) != len(texts):
                raise RuntimeError(f"engine returned {len(out)} results for {len(texts)} rows")
            return out
        except Exception as e:  # noqa: BLE001 - isolate below; never fail the batch
            if len(texts) == 1:
                return [{"error": f"engine_error: {type(e).__name__}: {e}"}]
            log.warning("engine call on %d rows raised %r; retrying rows one by one", len(texts), e)
            return [self._safe_run([t], [i], [r])[0] for t, i, r in zip(texts, ids, rows)]


class GenerateStage(_Stage):
    """Prompt -> completion, finish_reason, token counts, error."""

    task = "generate"
    row_columns = SAMPLING_COLUMNS

    def _prepare(self, own, ids):
        """Each row's SamplingParams: the run's settings, overridden by the row's own columns
        (pipeline/row_settings.py); a value the engine would refuse is the row's error."""
        from model import SamplingParams

        cfg = self.config
        out = []
        for row_id, (settings_of_row, err) in zip(ids, row_overrides(own, len(ids))):
            if err is not None:
                out.append((None, err))
                continue
            settings = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop=list(cfg.stop), seed=row_seed(cfg.seed, row_id),
                            truncate=cfg.truncate, json_schema=cfg.json_schema, regex=cfg.regex,
                            choice=list(cfg.choices) or None)
            if "json_schema" in settings_of_row:  # a row's schema replaces the run's constraint, whichever
                settings.update(regex=None, choice=None)
            settings.update(settings_of_row)
            try:
                out.append((SamplingParams(**settings), None))
            except ValueError as e:
                out.append((None, self._setting_error(str(e).replace("SamplingParams.", ""))))
        return out

    def _setting_error(self, message: str) -> str:
        if self.config.input_format == "openai-batch":  # say it in the request's terms
            from .openai_batch import request_error

            message = request_error(message)
        return "invalid_sampling: " + message

    def _run(self, texts, ids, rows):
        out = []
        for c, p in zip(self.engine.generate(texts, rows), rows):
            if c.error is not None:
                out.append({"finish_reason": "error", "error": engine_error(c),
                            "num_prompt_tokens": c.num_prompt_tokens or None})
                continue
            row = {"completion": c.text, "finish_reason": c.finish_reason, "num_prompt_tokens": c.num_prompt_tokens,
                   "num_generated_tokens": c.num_generated_tokens}
            if p.json_schema is not None and c.finish_reason == "stop":
                try:
                    row["parsed"] = json.dumps(json.loads(c.text), ensure_ascii=False)
                except ValueError as e:  # the grammar guarantees JSON; report rather than crash if not
                    row["error"] = f"invalid_json: {e}"
            out.append(row)
        return out


class ClassifyStage(_Stage):
    """Text -> label, score, probs (a sequence-classification checkpoint)."""

    task = "classify"

    def _run(self, texts, ids, rows):
        return [{"error": engine_error(c)} if c.error is not None else
                {"label": c.label, "score": float(c.score), "probs": [float(p) for p in c.probs]}
                for c in self.engine.classify(texts)]


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    total = sum(e)
    return [x / total for x in e]


def log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def calibrated(scores: list[float], log_p_cf: list[float] | None) -> list[float]:
    """softmax(scores), or with contextual calibration softmax(scores) / p_cf renormalised,
    computed in log space as softmax(scores - log p_cf): a content-free probability too small
    for a float neither divides by zero nor loses the ratio."""
    if log_p_cf is None:
        return softmax(scores)
    return softmax([s - c for s, c in zip(scores, log_p_cf)])


class LabelStage(_Stage):
    """Zero-shot (or few-shot) labeling with a causal LM: each choice scored as the prompt's
    continuation; label = the most probable choice (calibrated with --calibrate), margin = its
    probability minus the runner-up's."""

    task = "label"

    def __init__(self, config: PipelineConfig, engine=None):
        super().__init__(config, engine)
        self.log_p_cf = self._on_torch_thread(self._content_free_log_probs) if self.config.calibrate else None

    @property
    def p_cf(self) -> list[float] | None:
        return None if self.log_p_cf is None else [math.exp(x) for x in self.log_p_cf]

    def _score(self, texts):
        cfg = self.config
        return self.engine.score_choices(texts, list(cfg.choices), normalize=cfg.choice_score,
                                         separator=cfg.choice_separator)

    def _content_free_log_probs(self) -> list[float]:
        """log p_cf: log of the mean over content-free inputs of softmax(choice scores)."""
        cfg = self.config
        texts = [self.prefix + cfg.template.format(prompt=x) for x in cfg.content_free_inputs]
        texts = [t for t in texts if t.strip()]
        dists = []
        for text, res in zip(texts, self._score(texts)):
            if res.error is not None:
                raise RuntimeError(f"calibration: content-free prompt {text!r} failed: {res.error}")
            dists.append(log_softmax(res.scores))
        if not dists:
            raise RuntimeError("calibration: every content-free input renders to an empty prompt")
        out = []
        for k in range(len(cfg.choices)):  # log of a mean of probabilities, without leaving log space
            column = [d[k] for d in dists]
            m = max(column)
            out.append(m + math.log(sum(math.exp(x - m) for x in column) / len(column)))
        return out

    def _run(self, texts, ids, rows):
        out = []
        for c in self._score(texts):
            if c.error is not None:
                out.append({"error": engine_error(c)})
                continue
            probs = calibrated(c.scores, self.log_p_cf)
            order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
            out.append({"label": self.config.choices[order[0]], "scores": [float(x) for x in c.scores],
                        "probs": probs, "margin": probs[order[0]] - (probs[order[1]] if len(order) > 1 else 0.0)})
        return out


STAGES = {name: task.stage_class() for name, task in TASKS.items()}


def output_schema(config: PipelineConfig, input_schema: pa.Schema) -> pa.Schema:
    """The schema every output file of this run has: id, kept columns, task columns."""
    fields = [input_schema.field(config.id_column)]
    fields += [input_schema.field(c) for c in config.keep_columns]
    fields += [pa.field(c, kind) for c, kind in TASKS[config.task].columns]
    return pa.schema(fields)
