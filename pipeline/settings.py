"""One config for CLI flags, YAML files and Python: `PipelineConfig`, a pydantic dataclass whose
fields (type, constraints, help text) the CLI builds its flags from, so flags, YAML keys and
keyword arguments are the same names with the same checks. Types are strict (a quoted "false" is
not a boolean); an unknown key is refused with the closest known one; every refusal is a
`ConfigError` naming the field. The sampling settings are inherited from SamplingSettings
(model/sampling_params.py), declared there once for the run, its rows and the engine. `validate()`
checks settings that depend on each other and on the task.
Credentials are `SecretStr`: never printed, logged or written to the run report (`public_dict()`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import string
from dataclasses import fields
from typing import Annotated, Literal, Optional, Union, get_args

from pydantic import BeforeValidator, SecretStr, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from model.sampling_params import STRICT, SamplingSettings, one_line_errors, refusal, setting
from model.scheduler import MAX_NUM_SEQS, MAX_SEQ_LEN  # the engine's bounds: refused here, not in every replica

from .errors import ConfigError
from .formats import INPUT_FORMATS, OUTPUT_FORMATS
from .row_settings import RUN_SAMPLING, SettingError, sampling_params
from .stages import TASK_NAMES, TASKS

# set by the driver, never by a user: a report's config pasted back must not pin another commit, directory, identity
DRIVER_FIELDS = ("model_identity", "model_commit", "model_dir")
# a run's files and how they are committed, resumed and watched: a processor (handed a Dataset) takes none
RUN_FIELDS = ("input", "output", "input_format", "output_format", "rows_per_unit", "resume", "overwrite",
              "check_duplicate_ids", "on_bad_input", "batch_timeout_s")
INPUT_FORMAT_NAMES = ("auto", *INPUT_FORMATS)  # each format is one class in pipeline/formats.py
OUTPUT_FORMAT_NAMES = ("auto", *OUTPUT_FORMATS)
# user:secret@ after a scheme; the secret may hold "/" or "@" (AWS keys have "/"): all up to the URL's last "@"
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s@/]*:[^\s]*@")
ENV_S3_ENDPOINT = ("PERSIMMON_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def mask_uri(text: str) -> str:
    """`text` with the user-info of every URL in it (scheme://user:secret@) replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return list(value) if isinstance(value, (list, tuple)) else value  # not a list: pydantic names the field


# a list given as one string (a flag, a YAML value) is comma-separated
CommaSeparated = Annotated[list[str], BeforeValidator(_as_list)]
NO_FLAG = {"cli": False}  # set in YAML or Python, or by the driver


def _unknown_keys(names: list[str], known: set[str]) -> ConfigError:
    hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, known, 1)) else u for u in names]
    return ConfigError(f"unknown config keys: {', '.join(hints)}")


def _config_error(cls, e: ValidationError) -> ConfigError:
    """The first problem pydantic found, as one line naming the field."""
    err = e.errors()[0]
    name, value, why = str(err["loc"][0]) if err["loc"] else "config", err["input"], refusal(e)
    if err["type"] == "unexpected_keyword_argument":
        return _unknown_keys([name], {f.name for f in fields(cls)})
    if len(err["loc"]) > 1 and isinstance(err["loc"][1], int):  # an item of a list of strings
        return ConfigError(f"{name}: every item must be a string, got {type(value).__name__} {value!r:.60} "
                           "(quote it in YAML: yes / no / numbers are not strings there)")
    if err["type"].endswith("_type") and isinstance(value, str):
        why += " (quoted in YAML?)"
    return ConfigError(why)


@one_line_errors(_config_error)
@dataclass(config=STRICT, kw_only=True, repr=False)
class PipelineConfig(SamplingSettings):
    # ---- what to run ----------------------------------------------------------------------
    task: Literal[TASK_NAMES] = setting("generate", "generate: complete each prompt; classify: sequence-classification "
                "checkpoint gives label/score/probs; label: zero-shot labeling with a causal LM by scoring --choices; "
                "score: each text's log-likelihood and perplexity.", json_schema_extra=NO_FLAG)
    input: Union[str, list[str], None] = setting(None, "Input files (Parquet, JSONL or CSV): a local path, file://, "
                "s3:// (or gs://, abfs:// with their fsspec package) directory, glob (*.jsonl) or comma-separated "
                "list of files.")
    output: Optional[str] = setting(None, "Output directory URI. One output file per input file (or per "
                "--rows-per-unit slice) plus _run_report.json.")
    input_format: Literal[INPUT_FORMAT_NAMES] = setting("auto", "Input format: auto (by extension: .parquet; .jsonl / "
                ".json / .ndjson, also .gz / .zst; .csv), parquet, jsonl, csv, or openai-batch (OpenAI Batch API "
                "request lines: custom_id, url, body; generate only).")
    output_format: Literal[OUTPUT_FORMAT_NAMES] = setting("auto", "Output format: parquet, jsonl (one JSON object per "
                "row; statistics in _stats/) or openai-batch (OpenAI Batch API output lines). auto = openai-batch for "
                "openai-batch input, else parquet.")
    model: Optional[str] = setting(None, "Persimmon checkpoint in HF layout (config.json, *.safetensors, "
                "tokenizer.model): a local directory, an object-store URI (downloaded once per node into "
                "--model-cache-dir) or a Hugging Face hub id: owner/name[@revision] when no such local path exists, "
                "or hf://owner/name[@revision] (fetched once per node into its HF cache; needs the `hub` extra).")
    # ---- columns ----------------------------------------------------------------------------
    id_column: str = setting("id", "Input column with a unique row id, copied to the output.")
    prompt_column: str = setting("prompt", "Input column with the prompt (or text to classify).")
    keep_columns: CommaSeparated = setting([], "Extra input columns copied unchanged to the output (comma-separated).")
    prompt_template: str = setting("{prompt}", "Python format string applied to each prompt; must contain {prompt}. "
                "For `label`, e.g. 'Review: {prompt}\\nSentiment:' (on the command line \\n is a newline).")
    chat_template: bool = setting(False, "Wrap prompts (after --prompt-template) as 'human: {prompt}\\n\\nadept:' for "
                "Persimmon-8B-chat.")
    choices: CommaSeparated = setting([], "label task: the candidate labels (comma-separated). Each row gets the "
                "choice with the highest log-likelihood after the prompt (calibrated with --calibrate). generate: the "
                "completion is constrained to be one of them.")
    choice_separator: str = setting(" ", "label task: text between the prompt and each choice; a choice's tokens are "
                "those the text prompt + separator + choice adds after the prompt's own tokens (as "
                "lm-evaluation-harness).")
    choice_score: Literal["sum", "mean"] = setting("sum", "label task: 'sum' = total log-likelihood of a choice's "
                "tokens; 'mean' = per token, so multi-token labels are not penalised for their length.")
    calibrate: bool = setting(False, "label task: contextual calibration (Zhao et al. 2021): score the template filled "
                "with each --content-free-inputs once, average their probabilities over the choices into p_cf, and "
                "report probs proportional to softmax(scores) / p_cf (the label follows them).")
    content_free_inputs: list[str] = setting(["N/A", "", "[MASK]"], "label task, --calibrate: inputs that carry no "
                "content, each put through the prompt template (comma-separated; an empty item is the empty string).")
    low_margin: float = setting(0.1, "label task: rows whose top-1 minus top-2 probability is below this are counted "
                "in the run report (where to review).", ge=0, le=1)
    examples: Union[str, list[dict], None] = setting(None, "Few-shot examples: a JSONL file (local or object store) of "
                "{prompt, label} rows (label task) or {prompt, completion} rows (generate), each rendered through the "
                "prompt template, then the choice separator (label) or a space (generate), its answer and a blank "
                "line; the result prefixes every row, computed once per replica.")
    # ---- scoring ---------------------------------------------------------------------------
    score_after: Optional[str] = setting(None, "score task (TEXT_OR_COLUMN): score each text as the continuation of a "
                "prefix: an input column holding each row's prefix (where a file has it), else the prefix text itself "
                "for every row. The model reads prefix + text; only the tokens the text adds are scored: log p(text | "
                "prefix). No separator is added; rows sharing a prefix share its KV blocks; a null or blank prefix "
                "scores the row unconditionally (on the command line \\n is a newline).")
    score_rolling: bool = setting(True, "score task: texts longer than --max-seq-len are scored in rolling windows (as "
                "lm-evaluation-harness's loglikelihood_rolling: every token once, each with at least max_seq_len - "
                "--score-stride tokens of context); --no-score-rolling makes such a row a prompt_too_long error.")
    score_stride: Optional[int] = setting(None, "score task, rolling windows: the tokens each window after the first "
                "scores (the rest is their context). Default: half of --max-seq-len; --max-seq-len = no overlap "
                "(lm-evaluation-harness's default).", ge=1)
    # ---- generation: the sampling settings are SamplingSettings' (model/sampling_params.py) --
    max_seq_len: Optional[int] = setting(None, "Cap on prompt + generated tokens per row (default: the model's "
                "max_position_embeddings, 16384 for Persimmon-8B). A cap only: --kv-cache-gib / --memory-fraction "
                "size KV memory.", ge=2, le=MAX_SEQ_LEN)
    # ---- replicas and resources ------------------------------------------------------------
    replicas: str = setting("1", "Model replicas (Ray actors): N for a fixed pool, or MIN,MAX to autoscale between "
                "MIN and MAX.")
    num_gpus_per_replica: float = setting(0.0, "GPUs per replica; fractional values pack several replicas on one GPU "
                "(e.g. 0.5). 0 = CPU.", ge=0, allow_inf_nan=False)
    num_cpus_per_replica: float = setting(1.0, "CPUs reserved per replica.", ge=0, allow_inf_nan=False)
    batch_size: int = setting(256, "Rows per engine call: a replica hands this many input rows to its engine at once "
                "(the unit of progress and of --batch-timeout-s). No KV memory by itself: the engine runs up to "
                "--max-num-seqs of them at a time, as many as its KV cache holds.", ge=1)
    max_num_seqs: int = setting(256, "Most rows in flight in one replica's engine (its max_batch_size). A cap, not a "
                "reservation: the KV cache decides how many actually run at once (rows of short prompts fit many "
                "more).", ge=1, le=MAX_NUM_SEQS)
    kv_cache_gib: Optional[float] = setting(None, "KV cache per replica, in GiB. Unset: --memory-fraction of the "
                "device memory free after the weights load (a replica with --num-gpus-per-replica < 1, or a CPU "
                "replica, counts only its share), less activation headroom. See `persimmon-batch capacity`.",
                gt=0, allow_inf_nan=False)
    memory_fraction: float = setting(0.9, "Fraction of the device's memory a replica may use for weights, KV cache and "
                "activations when --kv-cache-gib is unset.", gt=0, le=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "Weights dtype: auto (bfloat16 for GPU "
                "replicas, i.e. --num-gpus-per-replica > 0, float32 for CPU ones), float32, bfloat16 or float16.")
    quantization: Literal["none", "int8", "fp8"] = setting("none", "Weight quantization, applied layer by layer as the "
                "model loads: none; int8 (weight-only, per-channel scales, through torchao; CPU and CUDA); fp8 "
                "(float8 e4m3, per-channel scales; CUDA compute capability 8.9+, e.g. L4, L40S, H100). Embedding and "
                "lm_head stay in --dtype unless --quantize-lm-head.")
    quantize_lm_head: bool = setting(False, "Quantize the lm_head too (with --quantization int8/fp8): 1 byte per "
                "weight instead of 2 (1 GiB saved at Persimmon-8B's 262k vocab in bf16), at some cost in logit "
                "accuracy.")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto (CUDA when the replica has a GPU, else CPU), cpu or "
                "cuda.")
    rows_per_unit: int = setting(0, "Split input files into units of about this many rows (Parquet: at row-group "
                "boundaries). A unit is committed, retried and resumed as a whole, into its own output file; 0 = one "
                "unit per file.", ge=0)
    replica_start_timeout_s: int = setting(900, "Wait this long for the minimum number of replicas to be up (placed, "
                "model loaded) before any work is sent, then fail with a clear error instead of hanging. Leave room "
                "for the autoscaler to add GPU nodes. 0 = wait forever.", ge=0)
    max_unit_retries: int = setting(3, "Times a unit is retried after its replica dies (OOM, segfault, lost node, "
                "killed as stuck) before it is reported failed.", ge=0)
    batch_timeout_s: float = setting(900.0, "A replica that finishes no batch (--batch-size rows) for this long is "
                "reported stuck and restarted, and its unit retried (up to --max-unit-retries, then reported failed). "
                "0 = never.", ge=0)
    io_retries: int = setting(3, "Storage retries, with exponential backoff (0.5 s, 1 s, 2 s, ...): each failed "
                "storage call (list, read, write, commit) is retried this many times (on top of the S3 client's 3 "
                "quick attempts), and a unit whose input read or output write fails mid-stream is redone this many "
                "times. Errors that persist name the URI.", ge=0)
    # ---- resume and bad input -------------------------------------------------------------
    resume: bool = setting(True, "Skip units whose output file is already committed (safe to rerun after a crash). "
                "--no-resume with existing output is an error unless --overwrite.")
    overwrite: bool = setting(False, "Delete committed outputs of this run's units and recompute them.")
    check_duplicate_ids: bool = setting(True, "Read the id column of every input before the run: a row whose id "
                "appeared earlier (in input order) and a row with a null id get an error (error_kind duplicate_id, "
                "invalid_id) instead of a result, counted in the run report. Driver memory follows the files and "
                "flagged rows, not the row count; --no-check-duplicate-ids skips the check.")
    on_bad_input: Literal["error", "skip"] = setting("error", "An unreadable input file, one missing a column, or an "
                "empty one: 'error' stops before any model work; 'skip' leaves it out and lists it in the run report.")
    # ---- storage ---------------------------------------------------------------------------
    s3_endpoint: Optional[str] = setting(None, "S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO (env "
                "PERSIMMON_S3_ENDPOINT or AWS_ENDPOINT_URL). Unset = AWS.")
    s3_region: Optional[str] = setting(None, "S3 region (env AWS_REGION / AWS_DEFAULT_REGION).")
    s3_access_key_id: Optional[SecretStr] = setting(None, "S3 access key; read from AWS_ACCESS_KEY_ID when unset. "
                "Unset everywhere = each node's default chain (instance role).", json_schema_extra=NO_FLAG)
    s3_secret_access_key: Optional[SecretStr] = setting(None, "S3 secret key (env AWS_SECRET_ACCESS_KEY).",
                json_schema_extra=NO_FLAG)
    s3_session_token: Optional[SecretStr] = setting(None, "S3 session token (env AWS_SESSION_TOKEN).",
                json_schema_extra=NO_FLAG)
    model_cache_dir: str = setting("~/.cache/persimmon-batch/models", "Per-node local cache for models read from "
                "object storage.")
    # ---- Ray -------------------------------------------------------------------------------
    ray_address: Optional[str] = setting(None, "Ray cluster to join (default: RAY_ADDRESS, i.e. the cluster a `ray job "
                "submit` job runs on; else start a local Ray).")
    num_cpus: Optional[int] = setting(None, "Local Ray only: logical CPUs to start it with (default: max(8, 2 x "
                "cores), leaving Ray Data headroom on small machines).", ge=1)
    progress: bool = setting(True, "Print a line per finished unit and a live progress line (rows, rows/s, tokens/s, "
                "ETA, replicas busy, errors); every 30 s when stderr is not a terminal.")
    verbose: bool = setting(False, "Also show Ray's own INFO logs and Ray Data's progress bars (hidden by default).")
    model_identity: Optional[str] = setting(None, "Set by the driver: a hash of the model's config, tokenizer and "
                "weight headers, recorded with every output (a changed model is not resumed).",
                json_schema_extra=NO_FLAG)
    model_commit: Optional[str] = setting(None, "Set by the driver for a Hugging Face hub model: the commit its "
                "revision resolved to, so every replica loads the snapshot the driver checked.",
                json_schema_extra=NO_FLAG)
    model_dir: Optional[str] = setting(None, "Set by the driver for a local model: its absolute path, so every replica "
                "loads the directory the driver checked, whatever its working directory.", json_schema_extra=NO_FLAG)

    # ---- values as flags and YAML give them ----------------------------------------------
    @field_validator("content_free_inputs", mode="before")
    @classmethod
    def _content_free(cls, value):  # comma-separated; empty items are kept
        return [x.strip() for x in value.split(",")] if isinstance(value, str) else value

    @field_validator("input", mode="before")
    @classmethod
    def _inputs(cls, value):  # a secret may hold ",": refused whole by validate
        if isinstance(value, str) and "," in value and "*" not in value and not _USERINFO.search(value):
            return _as_list(value)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value):  # comma-separated; a stop string may be a space
        return [p for p in value.split(",") if p] if isinstance(value, str) else value

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value):  # 4, [2, 8], "2,8"
        return ",".join(str(r) for r in value) if isinstance(value, (list, tuple)) else str(value)

    def __post_init__(self):
        if self.output_format == "auto":
            self.output_format = "openai-batch" if self.input_format == "openai-batch" else "parquet"
        if self.input_format == "openai-batch" and "url" not in self.keep_columns:
            self.keep_columns = [*self.keep_columns, "url"]  # the answer's shape follows the request's endpoint

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) actors; equal for a fixed pool."""
        try:
            parts = [int(p) for p in str(self.replicas).split(",")]
        except ValueError:
            raise ConfigError(f"replicas: expected N or MIN,MAX, got {self.replicas!r}") from None
        lo, hi = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 2 else (0, -1)
        if not 1 <= lo <= hi:
            raise ConfigError(f"replicas: expected N or MIN,MAX with 1 <= MIN <= MAX, got {self.replicas!r}")
        return lo, hi

    @property
    def resolved_dtype(self) -> str:
        """The dtype replicas run in (auto: bfloat16 on GPU replicas, float32 on CPU ones), from the
        config alone, so it is known (and recorded) before any replica starts."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.num_gpus_per_replica > 0 or self.device == "cuda" else "float32"

    @property
    def template(self) -> str:
        """The full prompt template: --prompt-template, then the chat wrapper if asked."""
        from model.tokenizer import chat_prompt

        return chat_prompt(self.prompt_template) if self.chat_template else self.prompt_template

    def validate(self, run: bool = True) -> "PipelineConfig":
        """Raise ConfigError naming the field for anything that cannot work; else self. `run=False`: a
        processor's or a stage's settings, which read and write no files (input and output may be unset)."""
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")

        for name in ("input", "output", "model", "s3_endpoint", "ray_address", "examples", "json_schema",
                     "model_cache_dir"):
            value = getattr(self, name)
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(item, str) and _USERINFO.search(item):
                    bad(name, f"{mask_uri(item)} carries credentials in the URL; give them through the "
                        "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the node's role instead")
        for name in ("input", "output", "model") if run else ("model",):
            if not getattr(self, name):
                bad(name, "is required")
        if not self.id_column or not self.prompt_column:
            bad("id_column", "id and prompt columns must be named")
        if self.id_column == self.prompt_column:
            bad("prompt_column", "must differ from id_column")
        if self.id_column in self.keep_columns or len(set(self.keep_columns)) != len(self.keep_columns):
            bad("keep_columns", f"must be distinct and not repeat the id column, got {self.keep_columns}")
        reserved = set(output_columns(self.task))
        for col in [self.id_column, *self.keep_columns]:
            if col in reserved:
                bad("keep_columns", f"{col!r} clashes with an output column of {self.task}")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
        except ValueError as e:
            bad("prompt_template", f"is not a valid format string: {e}")
        if names != {"prompt"}:
            bad("prompt_template", f"must contain {{prompt}} and no other field, got fields {sorted(names)}")
        try:  # a format spec or conversion that a text prompt cannot take ({prompt:d}, {prompt!z})
            self.template.format(prompt="text")
        except (ValueError, TypeError) as e:
            bad("prompt_template", f"{self.prompt_template!r} cannot be filled with a text prompt ({e}); "
                "write {prompt} without a format spec")
        TASKS[self.task].check(self)
        if len(set(self.choices)) != len(self.choices) or "" in self.choices:
            bad("choices", f"must be distinct and not empty, got {self.choices}")
        if self.choices and TASKS[self.task].generates and (self.regex is not None or self.json_schema is not None):
            bad("choices", "constrain generation, as --regex and --json-schema do: give one of the three")
        try:  # the sampling settings: checked by the engine's own rules, as each row's are
            sampling_params(**self.sampling())
        except SettingError as e:
            raise ConfigError(str(e)) from None
        if self.num_gpus_per_replica > 1 and self.num_gpus_per_replica != int(self.num_gpus_per_replica):
            bad("num_gpus_per_replica", "above 1 it must be a whole number")
        if self.quantize_lm_head and self.quantization == "none":
            bad("quantize_lm_head", "needs --quantization int8 or fp8")
        on_cpu = self.device == "cpu" or (self.device == "auto" and not self.num_gpus_per_replica)
        if self.quantization == "fp8" and on_cpu:
            bad("quantization", "fp8 weights need a CUDA GPU of compute capability 8.9+ (L4, L40S, H100): "
                "give replicas a GPU (--num-gpus-per-replica) or use --quantization int8 on CPU")
        if "openai-batch" in (self.input_format, self.output_format):
            if not TASKS[self.task].generates:
                bad("input_format", "openai-batch files hold completion requests: task generate only")
            if self.input_format != "openai-batch":
                bad("output_format", "openai-batch output answers openai-batch input (--input-format openai-batch)")
            if self.prompt_template != "{prompt}" or self.chat_template or self.examples is not None:
                bad("prompt_template", "with openai-batch input each request's messages make the prompt; "
                    "--prompt-template, --chat-template and --examples do not apply")
        self.replica_range  # noqa: B018  (raises on a bad value)
        return self

    def sampling(self, seed: int | None = None) -> dict:
        """The run's sampling settings as `SamplingParams` takes them, with a row's `seed`: what a row
        gets unless its own columns say otherwise. --choices constrain what a generating task writes."""
        choice = list(self.choices) if self.choices and TASKS[self.task].generates else None
        return {**{name: getattr(self, name) for name in RUN_SAMPLING}, "stop": list(self.stop), "seed": seed,
                "choice": choice}

    # ---- environment, serialisation ------------------------------------------------------
    def with_env(self) -> "PipelineConfig":
        """A copy with unset S3 settings filled from the driver's environment, which replicas on other
        nodes do not see. Credentials unset everywhere leave each node its default chain (instance profile)."""
        env = os.environ
        updates = {}
        if self.s3_endpoint is None:
            updates["s3_endpoint"] = next((env[k] for k in ENV_S3_ENDPOINT if env.get(k)), None)
        if self.s3_region is None:
            updates["s3_region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        for name, var in (("s3_access_key_id", "AWS_ACCESS_KEY_ID"),
                          ("s3_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                          ("s3_session_token", "AWS_SESSION_TOKEN")):
            if getattr(self, name) is None and env.get(var):
                updates[name] = env[var]
        return dataclasses.replace(self, **updates)

    def public_dict(self) -> dict:
        """Every field except secrets: what the run report and logs show."""
        out = {}
        for f in fields(self):
            if f.name in SECRET_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, str):  # credentials inside a URL (scheme://user:pass@host)
                value = mask_uri(value)
            elif isinstance(value, (list, tuple)):
                value = [mask_uri(v) if isinstance(v, str) else v for v in value]
            out[f.name] = value
        return out

    def __repr__(self) -> str:  # never show secrets
        items = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"PipelineConfig({items})"

    @classmethod
    def from_dict(cls, raw: dict, **overrides) -> "PipelineConfig":
        def keys(d):
            out, spelled = {}, {}
            for k, v in (d or {}).items():
                if not isinstance(k, str):  # YAML `1:`, `null:`, `on:` (a bool in YAML 1.1)
                    raise ConfigError(f"config keys are setting names, got {type(k).__name__} {k!r} "
                                      "(quote it in YAML?)")
                name = k.replace("-", "_")
                if name in spelled:  # `max-new-tokens:` and `max_new_tokens:` in one file: not silently the last
                    raise ConfigError(f"{name}: given twice, as {spelled[name]} and {k}; keep one")
                out[name], spelled[name] = v, k
            return out

        raw = {**keys(raw), **keys({k: v for k, v in overrides.items() if v is not None})}
        given = [k for k in DRIVER_FIELDS if raw.get(k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: set by the driver for each run, not an option; remove it")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise _unknown_keys(unknown, known)
        return cls(**raw)

    @classmethod
    def for_processor(cls, task: str, **settings) -> "PipelineConfig":
        """A processor's config (`pipeline.build_processor`): the same fields less RUN_FIELDS (refused)."""
        given = [k for k in RUN_FIELDS if settings.get(k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: a processor runs on the Dataset it is given and returns one; "
                              "files in and out are settings of a run (pipeline.run, persimmon-batch)")
        return cls.from_dict({**settings, "task": task})

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "PipelineConfig":
        return cls.from_dict(read_yaml(path), **overrides)


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """safe_load, but a key given twice in a mapping is an error (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first.start_mark.line + 1})",
                        key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Loader


SECRET_FIELDS = frozenset(name for name, f in PipelineConfig.__pydantic_fields__.items()
                          if SecretStr in get_args(f.annotation))


def read_yaml(path: str) -> dict:
    """A YAML config file's mapping; a syntax error is a one-line ConfigError naming file, line and column."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a YAML {type(raw).__name__}")
    return raw


def output_columns(task: str) -> tuple[str, ...]:
    """The columns a task adds to its output rows (besides the id and kept columns)."""
    return tuple(name for name, _ in TASKS[task].columns)
