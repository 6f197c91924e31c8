"""The tasks, one class each: declaration (CLI help, checkpoint class, settings, output columns),
config checks, how its rows run and what its report adds. Everything else reads `TASKS`: adding
a task is one class here.

A task's instance is its stage, one per Ray actor holding an `Engine`: input rows -> prompts ->
one engine call -> output columns. Bad input never raises: a row that cannot be processed (null,
non-string or blank prompt, undecodable bytes, an engine error) gets `error_kind` and `error`,
its id kept. Without Ray:

    stage = GenerateStage(PipelineConfig(task="generate", ...), engine=my_engine)
    out = stage({"id": [1, 2], "prompt": ["a", "b"]})        # -> pyarrow.Table

A batch may be a `pyarrow.Table`/`RecordBatch`, a dict of columns or a pandas DataFrame; the
result has a fixed schema per task, so every output file (all-error batches too) has the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .errors import ConfigError, RowError
from .priority import normal_priority
from .row_settings import RUN_SAMPLING, SAMPLING_COLUMNS, SettingError, row_overrides, sampling_params

if TYPE_CHECKING:
    from .settings import PipelineConfig

log = logging.getLogger(__name__)
CAUSAL, CLASSIFIER = "PersimmonForCausalLM", "PersimmonForSequenceClassification"
ERROR_COLUMNS = (("error_kind", pa.string()), ("error", pa.string()))
EXAMPLE_SEPARATOR = "\n\n"  # after each few-shot example


def failed(error: RowError) -> dict:
    return {"error_kind": error.kind, "error": error.message}


def engine_error(result) -> dict:
    """The result columns of an engine result's error (the engine says its kind)."""
    return failed(RowError(result.error_kind or "engine_error", result.error))


def memory_share(config: PipelineConfig, on_gpu: bool) -> float:
    """The part of its device this replica sizes its KV cache from: --num-gpus-per-replica on a GPU;
    on CPU its CPUs over the node's (Ray packs CPU replicas by CPUs)."""
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
    """This replica's engine: a remote model fetched to the node cache; CUDA when the actor was given a
    GPU (and torch sees one), else CPU; the config's resolved dtype (the one every output records)."""
    import torch

    from model import Engine

    from .storage import local_model_dir

    device = None if config.device == "auto" else config.device
    on_gpu = device == "cuda" or (device is None and config.num_gpus_per_replica > 0 and torch.cuda.is_available())
    device = device or ("cuda" if on_gpu else "cpu")  # a CPU replica never takes a GPU it was not given
    normal_priority()
    cpus = max(1, int(config.num_cpus_per_replica))
    if not on_gpu and torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)  # share cores with other replicas
    path = local_model_dir(config.model, config)
    return Engine.from_pretrained(path, max_batch_size=config.max_num_seqs, max_seq_len=config.max_seq_len,
                                  dtype=config.resolved_dtype, device=device, quantization=config.quantization,
                                  quantize_lm_head=config.quantize_lm_head, kv_cache_gib=config.kv_cache_gib,
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
    """Python values of a column; invalid UTF-8 strings as bytes, so only those rows fail, not the batch."""
    if not isinstance(column, (pa.Array, pa.ChunkedArray)):
        return _pylist(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        try:
            return column.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            column = column.cast(pa.large_binary())
    return column.to_pylist()


def _text(value, kind: str, where: str = "") -> tuple[str | None, RowError | None]:
    """(a column value as text, None); (None, None) for null or NaN; else (None, the row's `kind` error)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, RowError(kind, f"{where}not valid UTF-8 ({e.reason} at byte {e.start})")
    if value is None or (isinstance(value, float) and value != value):
        return None, None
    if not isinstance(value, str):
        return None, RowError(kind, f"{where}expected a string, got {type(value).__name__}")
    return value, None


def build_prompt(config: PipelineConfig, prefix: str, value) -> tuple[str | None, RowError | None]:
    """(the engine's text for a prompt value: few-shot prefix + template, None), or (None, the
    row's error). `persimmon-batch plan` measures prompts with this too."""
    text, error = _text(value, "invalid_prompt")
    if text is None:
        return None, error or RowError("invalid_prompt", "prompt is null")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (Python API input; Arrow strings have none)
        return None, RowError("invalid_prompt", f"lone surrogate U+{ord(text[e.start]):04X} at position {e.start}")
    if not text.strip():
        return None, RowError("empty_prompt", "prompt is empty or whitespace only")
    return prefix + config.template.format(prompt=text), None


def row_seed(base: int | None, row_id: Any) -> int | None:
    """A per-row seed from the base seed and the row id: stable across retries and batching."""
    if base is None:
        return None
    digest = hashlib.blake2b(f"{base}:{row_id!r}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class Stage:
    """A task: its declaration and checks (class attributes and classmethods, read on the driver), and
    as an instance its stage. Subclasses implement `_run(texts, ids, rows) -> list[dict]`, `rows`
    being what `_prepare` made of each row's own settings (generate: its SamplingParams).

    All torch work (model load, engine calls) runs on one thread the stage owns: Ray Data builds
    the class on the actor's main thread but calls it from a worker thread, and each thread running
    torch ops gets its own OpenMP team; with two teams on a CPU replica OpenMP counts more threads
    than cores and stops spinning between regions: ~25% slower, cores idle (measured on 2 cores)."""

    name: str = ""
    description: str = ""                 # the subcommand's help
    flag_group: str = ""                  # the heading of its own flags in --help
    architecture: str = CAUSAL            # the checkpoint class it runs on
    wrong_architecture_hint: str = ""
    columns: tuple[tuple[str, pa.DataType], ...] = ERROR_COLUMNS  # output columns it adds, in order
    settings: tuple[str, ...] = ()        # config fields that only this task (and others listing them) takes
    result_settings: tuple[str, ...] = ()  # config fields its rows' results depend on (besides the common ones)
    row_columns: tuple[str, ...] = ()     # input columns a row may set for itself (read by `_prepare`)
    generates = False                     # it generates tokens (the summary gives tokens/s)
    scores_text = False                   # it scores every token of the text (head on every position, rolling windows)
    example_answer = "completion"         # the answer field of its few-shot examples
    prompt_room = 1                       # positions a row needs past its prompt tokens: one new token

    # ---- the declaration, read on the driver ----------------------------------------------
    @classmethod
    def check(cls, config: PipelineConfig) -> None:
        """Raise ConfigError naming the field for a setting this task cannot work with; another task's
        setting changed from its default would change nothing here, so it is refused, not ignored."""
        others: dict[tuple, list[str]] = {}  # the tasks that take them: those settings
        for name, f in type(config).__pydantic_fields__.items():
            if name in TASK_SETTINGS and name not in cls.settings and \
                    getattr(config, name) != f.get_default(call_default_factory=True):
                others.setdefault(tuple(t.name for t in TASKS.values() if name in t.settings), []).append(name)
        if others:
            one = sum(map(len, others.values())) == 1
            raise ConfigError("; ".join(f"{', '.join(names)}: appl{'ies' if len(names) == 1 else 'y'} to the "
                                        f"{' and '.join(takers)} task{'s' * (len(takers) > 1)} only"
                                        for takers, names in others.items())
                              + f", not {cls.name}: remove {'it' if one else 'them'} from the config (or leave "
                              + ("it at its default)" if one else "them at their defaults)"))

    @classmethod
    def input_columns(cls, config: PipelineConfig) -> tuple[str, ...]:
        """Input columns `_prepare` reads besides the id, prompt and kept ones."""
        return cls.row_columns

    @classmethod
    def read_columns(cls, config: PipelineConfig) -> list[str]:
        """Every input column a run reads, each once: the id, prompt and kept ones, then `input_columns`."""
        return list(dict.fromkeys([config.id_column, config.prompt_column, *config.keep_columns,
                                   *cls.input_columns(config)]))

    @classmethod
    def input_warnings(cls, config: PipelineConfig, columns: dict[str, set[str]]) -> list[str]:
        """What the plan should warn about, given each good input file's column names (by masked URI)."""
        return []

    @classmethod
    def result_fields(cls, config: PipelineConfig) -> tuple[str, ...]:
        """The config fields its rows' results depend on, besides the common ones."""
        return cls.result_settings

    @classmethod
    def check_example(cls, config: PipelineConfig, row: dict, where: str) -> None:
        """Raise ConfigError for a few-shot example row this task cannot use."""

    @classmethod
    def render_prefix(cls, config: PipelineConfig) -> str:
        """The text every row's prompt is appended to: the few-shot examples ('' without)."""
        if not config.examples:
            return ""
        if isinstance(config.examples, str):
            raise ConfigError("examples must be loaded on the driver first (pipeline.attachments.load_examples)")
        sep = config.choice_separator if "choice_separator" in cls.settings else " "  # before the answer
        return "".join(config.template.format(prompt=ex["prompt"]) + sep + ex[cls.example_answer] + EXAMPLE_SEPARATOR
                       for ex in config.examples)

    @classmethod
    def prompt_limit(cls, config: PipelineConfig, max_positions: int) -> tuple[str, int, str]:
        """(the limit's name, its tokens, what the run does with a prompt over it), for `plan`."""
        return "max_seq_len", config.max_seq_len or max_positions, "prompt_too_long"

    @classmethod
    def prompt_tokens(cls, config: PipelineConfig, encode, text: str, limit: int) -> tuple[int, bool]:
        """(a text's prompt tokens, BOS first; whether the engine refuses it as too long)."""
        n = len(encode(text, add_bos=True))
        return n, n + cls.prompt_room > limit

    @classmethod
    def capacity_new_tokens(cls, config: PipelineConfig) -> int:
        """Tokens a row generates, for `persimmon-batch capacity --config JOB.yaml` (classify: none)."""
        return 0

    @classmethod
    def report(cls, config: PipelineConfig, committed: dict, plan) -> dict:
        """What this task adds to the run report, from the committed units' statistics."""
        return {}

    # ---- the stage ------------------------------------------------------------------------
    def __init__(self, config: PipelineConfig, engine=None):
        self.config = config.validate(run=False)  # a stage reads no files: where they are is the run's
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persimmon-engine")
        t0 = time.perf_counter()
        self.engine = engine if engine is not None else self._on_torch_thread(load_engine, config)
        self.prefix = self.render_prefix(self.config)  # few-shot examples: every row starts with them
        if self.prefix and hasattr(self.engine, "pin_prefix"):
            self._on_torch_thread(self.engine.pin_prefix, self.prefix)  # computed once, kept
        self.load_seconds = time.perf_counter() - t0
        self.engine_seconds = 0.0  # inside engine calls, summed (the run report's time breakdown)

    def _on_torch_thread(self, fn, *args):
        return self._torch_thread.submit(fn, *args).result()

    def engine_stats(self) -> dict | None:
        """The engine's sizing and counters, or None for an engine without them (test doubles)."""
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else None

    def __call__(self, batch, row_errors: dict[int, RowError] | None = None) -> pa.Table:
        """Results for every row of `batch`, in order; rows in `row_errors` ({index: error}) get that
        error without being run (duplicate or null ids found by the plan, unreadable lines)."""
        cfg = self.config
        raw = batch if isinstance(batch, dict) else as_table(batch)  # a dict's prompts are checked unconverted
        names = list(raw.keys()) if isinstance(raw, dict) else raw.column_names
        for col in (cfg.id_column, cfg.prompt_column, *cfg.keep_columns):
            if col not in names:
                raise KeyError(f"batch has no column {col!r} (columns: {names})")
        kept = as_table({k: raw[k] for k in (cfg.id_column, *cfg.keep_columns)})
        prompts = [build_prompt(cfg, self.prefix, v) for v in column_values(raw[cfg.prompt_column])]
        ids = kept[cfg.id_column].to_pylist()
        own = {c: column_values(raw[c]) for c in self.input_columns(cfg) if c in names}
        prepared = self._prepare(own, ids)
        for i, (_, err) in enumerate(prepared):
            if err is not None and prompts[i][1] is None:
                prompts[i] = (None, err)
        for i, err in (row_errors or {}).items():
            prompts[i] = (None, err)
        results: list[dict] = [{} if err is None else failed(err) for _, err in prompts]
        ok = [i for i, (text, _) in enumerate(prompts) if text is not None]
        if ok:
            texts = [prompts[i][0] for i in ok]
            for i, res in zip(ok, self._safe_run(texts, [ids[i] for i in ok], [prepared[i][0] for i in ok])):
                results[i] = res
        arrays = {c: kept[c] for c in kept.column_names}
        arrays.update((col, pa.array([r.get(col) for r in results], type=kind)) for col, kind in self.columns)
        return pa.table(arrays)

    def tally(self, totals: dict, out: pa.Table) -> None:
        """Add what this task's report counts in a batch of results to a unit's `totals`."""

    def _prepare(self, own: dict[str, list], ids: list) -> list[tuple[Any, RowError | None]]:
        """Per row, from its `input_columns` values (`own`): (what `_run` needs beyond its text, or an
        error that keeps it from running)."""
        return [(None, None)] * len(ids)

    def _safe_run(self, texts: list[str], ids: list, rows: list) -> list[dict]:
        """One engine call for the batch; if it raises, row by row so a poisoned row fails only itself."""
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
                return [failed(RowError("engine_error", f"{type(e).__name__}: {e}"))]
            log.warning("engine call on %d rows raised %r; retrying rows one by one", len(texts), e)
            return [self._safe_run([t], [i], [r])[0] for t, i, r in zip(texts, ids, rows)]


# a token's log-probability (model/outputs.py TokenLogprob): a prompt token, or an alternative
TOKEN_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64())])
# a generated token: its own log-probability and its top alternatives
SAMPLED_LOGPROB = pa.struct([*TOKEN_LOGPROB, ("top", pa.list_(TOKEN_LOGPROB))])


def token_logprobs(tokens, top: bool) -> list[dict] | None:
    """A Completion's `logprobs` (with `top` alternatives) or `prompt_logprobs`, as the output columns hold them."""
    if tokens is None:
        return None

    def one(t):
        return {"token_id": t.token_id, "token": t.token, "logprob": t.logprob}

    return [{**one(t), "top": [one(a) for a in t.top]} if top else one(t) for t in tokens]


class GenerateStage(Stage):
    """Prompt -> completion, finish_reason, token counts, log-probabilities when asked, error."""

    name, flag_group = "generate", "generation"
    description = "Complete every prompt with a causal Persimmon checkpoint."
    columns = (("completion", pa.string()), ("finish_reason", pa.string()), ("num_prompt_tokens", pa.int32()),
               ("num_generated_tokens", pa.int32()), ("parsed", pa.string()),
               ("logprobs", pa.list_(SAMPLED_LOGPROB)), ("prompt_logprobs", pa.list_(TOKEN_LOGPROB)), *ERROR_COLUMNS)
    settings = result_settings = (*RUN_SAMPLING, "choices", "examples")
    row_columns = SAMPLING_COLUMNS
    generates = True

    @classmethod
    def prompt_limit(cls, config, max_positions):
        name, tokens, over = super().prompt_limit(config, max_positions)
        return name, tokens, "cut to fit (--truncate left)" if config.truncate == "left" else over

    @classmethod
    def capacity_new_tokens(cls, config):
        return config.max_new_tokens

    def _prepare(self, own, ids):
        """Each row's SamplingParams: the run's settings overridden by its own columns; a value the engine
        would refuse is the row's error."""
        from .openai_batch import request_error

        cfg = self.config
        out = []
        for row_id, (settings_of_row, err) in zip(ids, row_overrides(own, len(ids))):
            if err is not None:
                out.append((None, err))
                continue
            settings = cfg.sampling(seed=row_seed(cfg.seed, row_id))
            if "json_schema" in settings_of_row:  # a row's schema replaces the run's constraint, whichever
                settings.update(regex=None, choice=None)
            settings.update(settings_of_row)
            try:
                out.append((sampling_params(**settings), None))
            except SettingError as e:  # an OpenAI batch's error is said in the request's terms
                message = request_error(str(e)) if cfg.input_format == "openai-batch" else str(e)
                out.append((None, RowError("invalid_sampling", message)))
        return out

    def _run(self, texts, ids, rows):
        out = []
        for c, p in zip(self.engine.generate(texts, rows), rows):
            if c.error is not None:
                out.append({"finish_reason": "error", **engine_error(c),
                            "num_prompt_tokens": c.num_prompt_tokens or None})
                continue
            row = {"completion": c.text, "finish_reason": c.finish_reason, "num_prompt_tokens": c.num_prompt_tokens,
                   "num_generated_tokens": c.num_generated_tokens, "logprobs": token_logprobs(c.logprobs, top=True),
                   "prompt_logprobs": token_logprobs(c.prompt_logprobs, top=False)}
            if p.json_schema is not None and c.finish_reason == "stop":
                try:
                    row["parsed"] = json.dumps(json.loads(c.text), ensure_ascii=False)
                except ValueError as e:  # the grammar guarantees JSON; report rather than crash if not
                    row.update(failed(RowError("invalid_json", str(e))))
            out.append(row)
        return out


class ClassifyStage(Stage):
    """Text -> label, score, probs (a sequence-classification checkpoint)."""

    name = flag_group = "classify"
    description = "Classify every text with a PersimmonForSequenceClassification checkpoint."
    architecture = CLASSIFIER
    wrong_architecture_hint = " (use `label` for zero-shot labeling with a causal LM)"
    columns = (("label", pa.string()), ("score", pa.float64()), ("probs", pa.list_(pa.float64())), *ERROR_COLUMNS)
    prompt_room = 0  # it generates nothing

    @classmethod
    def prompt_limit(cls, config, max_positions):
        return "max_position_embeddings", max_positions, "prompt_too_long"

    def _run(self, texts, ids, rows):
        return [engine_error(c) if c.error is not None else
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
    """softmax(scores), or calibrated softmax(scores) / p_cf renormalised, as softmax(scores - log p_cf):
    a content-free probability too small for a float neither divides by zero nor loses the ratio."""
    if log_p_cf is None:
        return softmax(scores)
    return softmax([s - c for s, c in zip(scores, log_p_cf)])


class LabelStage(Stage):
    """Labeling with a causal LM: each choice scored as the prompt's continuation; label = the most
    probable (calibrated with --calibrate), margin = its probability minus the runner-up's."""

    name, flag_group = "label", "labeling"
    description = ("Zero-shot labeling with a causal checkpoint: pick the --choices option with the "
                   "highest log-likelihood after the (templated) prompt.")
    columns = (("label", pa.string()), ("scores", pa.list_(pa.float64())), ("probs", pa.list_(pa.float64())),
               ("margin", pa.float64()), *ERROR_COLUMNS)
    settings = ("choices", "choice_separator", "choice_score", "calibrate", "content_free_inputs", "low_margin",
                "examples")
    result_settings = ("choices", "choice_separator", "choice_score", "calibrate", "examples")
    example_answer = "label"

    @classmethod
    def check(cls, config):
        super().check(config)
        if len(config.choices) < 2:
            raise ConfigError("choices: label needs at least two choices, e.g. --choices positive,negative")
        if config.calibrate and not any(isinstance(x, str) and config.template.format(prompt=x).strip()
                                        for x in config.content_free_inputs or []):
            raise ConfigError("content_free_inputs: --calibrate needs a content-free input that the template "
                              "turns into a non-empty prompt")

    @classmethod
    def result_fields(cls, config):
        return cls.result_settings + (("content_free_inputs",) if config.calibrate else ())

    @classmethod
    def check_example(cls, config, row, where):
        if row["label"] not in config.choices:
            raise ConfigError(f"examples: {where} has label {row['label']!r}, not one of the choices {config.choices}")

    @classmethod
    def prompt_tokens(cls, config, encode, text, limit):
        """The prompt's tokens (trailing whitespace goes to the choices); too long when they and the
        longest choice's continuation exceed the limit."""
        stripped = text.rstrip()
        n = len(encode(stripped, add_bos=True))
        tail, sep = text[len(stripped):], config.choice_separator
        longest = max(len(encode(stripped + tail + sep + c, add_bos=True)) - n for c in config.choices)
        return n, n + longest > limit

    @classmethod
    def capacity_new_tokens(cls, config):
        return 8

    @classmethod
    def report(cls, config, committed, plan):
        """The label histogram over every committed output, and how many are close calls (counted again
        from the file's margins where it was written with another --low-margin)."""
        counts, low = Counter(), 0
        for name, st in committed.items():
            counts.update(st.extra.get("label_counts", {}))
            low += (st.extra.get("low_margin_rows", 0) if st.extra.get("low_margin") == config.low_margin
                    else sum(1 for m in _margins(plan.output.join(name)) if m is not None and m < config.low_margin))
        return {"labels": {"histogram": {c: counts.get(c, 0) for c in config.choices}, "low_margin_rows": low,
                           "low_margin": config.low_margin, "calibrated": config.calibrate,
                           "choice_score": config.choice_score}}

    def tally(self, totals, out):
        totals.setdefault("label_counts", Counter()).update(x for x in out["label"].to_pylist() if x is not None)
        low = sum(1 for m in out["margin"].to_pylist() if m is not None and m < self.config.low_margin)
        totals.update(low_margin_rows=totals.get("low_margin_rows", 0) + low, low_margin=self.config.low_margin)

    def __init__(self, config: PipelineConfig, engine=None):
        super().__init__(config, engine)
        self.log_p_cf = self._on_torch_thread(self._content_free_log_probs) if self.config.calibrate else None

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
        for column in zip(*dists):  # per choice: log of a mean of probabilities, without leaving log space
            m = max(column)
            out.append(m + math.log(sum(math.exp(x - m) for x in column) / len(column)))
        return out

    def _run(self, texts, ids, rows):
        out = []
        for c in self._score(texts):
            if c.error is not None:
                out.append(engine_error(c))
                continue
            probs = calibrated(c.scores, self.log_p_cf)
            order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
            out.append({"label": self.config.choices[order[0]], "scores": [float(x) for x in c.scores],
                        "probs": probs, "margin": probs[order[0]] - (probs[order[1]] if len(order) > 1 else 0.0)})
        return out


class ScoreStage(Stage):
    """Text -> log-likelihood under a causal LM: logprob (sum over the scored tokens), num_tokens,
    mean_logprob, perplexity = exp(-mean_logprob); with --score-after only the tokens after the
    prefix. What is scored, and rolling windows: `Engine.score` (model/scoring.py)."""

    name, flag_group = "score", "scoring"
    scores_text = True
    description = ("Score every text's log-likelihood and perplexity with a causal checkpoint (perplexity "
                   "filtering); --score-after scores only what follows a prefix.")
    columns = (("logprob", pa.float64()), ("num_tokens", pa.int64()), ("mean_logprob", pa.float64()),
               ("perplexity", pa.float64()), *ERROR_COLUMNS)
    settings = result_settings = ("score_after", "score_rolling", "score_stride")
    prompt_room = -1  # a text of n tokens (BOS first) reads n - 1 positions

    @classmethod
    def check(cls, config):
        super().check(config)
        if config.score_after in (config.id_column, config.prompt_column):
            raise ConfigError(f"score_after: {config.score_after!r} is the id or prompt column; name the column "
                              "holding each row's prefix, or give the prefix text")
        if config.score_stride is not None:
            if not config.score_rolling:
                raise ConfigError("score_stride: applies to rolling windows; drop it or --score-rolling")
            if config.max_seq_len is not None and config.score_stride > config.max_seq_len:
                raise ConfigError(f"score_stride: must be at most max_seq_len={config.max_seq_len} (a window's "
                                  f"length), got {config.score_stride}")

    @classmethod
    def input_columns(cls, config):
        return (config.score_after,) if config.score_after else ()

    @classmethod
    def input_warnings(cls, config, columns):
        """--score-after is a column where a file has it, else the prefix text: a column in only some
        files is most likely a mistake in the others."""
        name = config.score_after
        having = [uri for uri, names in columns.items() if name in names]
        if not name or not having or len(having) == len(columns):
            return []
        lacking = [uri for uri in columns if uri not in having]
        return [f"--score-after {name!r} is a column in {len(having)} of {len(columns)} input files; in the "
                f"other {len(lacking)} (e.g. {lacking[0]}) every text is scored after the literal "
                f"text {name!r}"]

    @classmethod
    def prompt_limit(cls, config, max_positions):
        name, tokens, over = super().prompt_limit(config, max_positions)
        return name, tokens, "scored in rolling windows" if config.score_rolling else over

    @classmethod
    def capacity_new_tokens(cls, config):
        return 1  # scoring rows generate nothing

    def __init__(self, config: PipelineConfig, engine=None):
        super().__init__(config, engine)
        limit = getattr(self.engine, "max_seq_len", None)
        if self.config.score_stride is not None and limit is not None and self.config.score_stride > limit:
            raise ConfigError(f"score_stride: must be at most the engine's max_seq_len={limit} (a window's length), "
                              f"got {self.config.score_stride}")

    def _prepare(self, own, ids):
        """Each row's prefix: its --score-after column's value where the batch has that column
        (null or blank: none), else the --score-after text itself (or none)."""
        name = self.config.score_after
        if name not in own:
            return [(name, None)] * len(ids)
        return [_text(v, "invalid_prefix", f"score_after column {name!r}: ") for v in own[name]]

    def _run(self, texts, ids, rows):
        cfg = self.config
        return [engine_error(r) if r.error is not None else
                {"logprob": r.logprob, "num_tokens": r.num_tokens, "mean_logprob": r.mean_logprob,
                 "perplexity": r.perplexity}
                for r in self.engine.score(texts, score_after=rows, rolling=cfg.score_rolling, stride=cfg.score_stride)]


def _margins(loc) -> list:
    """The `margin` column of a committed label output, Parquet or JSONL."""
    if loc.path.endswith(".jsonl"):
        with loc.fs.open_input_stream(loc.path) as f:
            lines = f.read().split(b"\n")  # not splitlines(): U+2028 and friends are text inside JSON strings
            return [json.loads(line).get("margin") for line in lines if line.strip()]
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_table(f, columns=["margin"])["margin"].to_pylist()


TASKS: dict[str, type[Stage]] = {t.name: t for t in (GenerateStage, ClassifyStage, LabelStage, ScoreStage)}
TASK_NAMES = tuple(TASKS)
# config fields some task owns: the CLI shows each only on the subcommands of the tasks that list it
TASK_SETTINGS = frozenset(s for t in TASKS.values() for s in t.settings)


def output_schema(config: PipelineConfig, input_schema: pa.Schema) -> pa.Schema:
    """The schema every output file of this run has: id, kept columns, task columns."""
    return pa.schema([*(input_schema.field(c) for c in (config.id_column, *config.keep_columns)),
                      *(pa.field(c, kind) for c, kind in TASKS[config.task].columns)])
