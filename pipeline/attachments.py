"""Files a config points at, read and checked once on the driver and shipped inside the config
(replicas need no access to them): few-shot examples and a JSON schema.

Few-shot examples (README "Labels you can trust"): JSONL rows `{"prompt", "label"}` (label; one of
the choices) or `{"prompt", "completion"}` (generate), rendered into the prefix every row starts
with (`Stage.render_prefix`), whose KV each replica computes once (`Engine.pin_prefix`).
The JSON schema is compiled here, so one llguidance cannot use fails before any model work.
"""

from __future__ import annotations

import dataclasses
import json

from .errors import ConfigError
from .settings import PipelineConfig
from .stages import TASKS
from .storage import model_location, resolve


def load_attachments(config: PipelineConfig) -> PipelineConfig:
    """The config with its examples and JSON schema files read in, and a --regex or generate
    --choices constraint checked."""
    config = load_json_schema(load_examples(config))
    if TASKS[config.task].generates and (config.regex is not None or config.choices):  # choices constrain generation
        from model.structured import check_grammar

        field, spec = ("regex", {"regex": config.regex}) if config.regex is not None else \
            ("choices", {"choice": list(config.choices)})
        problem = check_grammar(**spec)
        if problem:
            raise ConfigError(f"{field}: {problem}")
    return config


def _read_text(config: PipelineConfig, field: str, source) -> tuple[str, str]:
    loc = resolve(str(source), config)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            return f.read().decode("utf-8-sig"), loc.uri  # a BOM is not part of the JSON
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{field}: cannot read {loc.uri}: {e}") from None


def load_json_schema(config: PipelineConfig) -> PipelineConfig:
    """The config with `json_schema` as a dict, checked by llguidance's compiler."""
    schema, where = config.json_schema, "json_schema"
    if schema is None:
        return config
    if isinstance(schema, str):
        text, where = _read_text(config, "json_schema", schema)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"json_schema: {where} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"json_schema: {where} must hold a JSON object (a schema), got {type(schema).__name__}")
    from model.structured import check_grammar

    problem = check_grammar(json_schema=schema)
    if problem:
        raise ConfigError(f"json_schema: {where}: {problem}")
    return dataclasses.replace(config, json_schema=schema)


def load_examples(config: PipelineConfig) -> PipelineConfig:
    """The config with `examples` read into a list of rows, each checked; ConfigError names file and line."""
    rows, where = config.examples, "examples"
    if rows is None:
        return config
    if not isinstance(rows, list):
        text, where = _read_text(config, "examples", rows)
        rows = []
        for n, line in enumerate(text.split("\n"), 1):  # JSON strings may hold U+2028 and friends
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"examples: {where} line {n} is not JSON: {e}") from None
    task = TASKS[config.task]
    answer = task.example_answer
    if not rows:
        raise ConfigError(f"examples: {where} has no rows")
    clean = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get(answer), str):
            raise ConfigError(f"examples: {where} row {n} needs string fields 'prompt' and '{answer}', "
                              f"got {row!r:.200}")
        task.check_example(config, row, f"{where} row {n}")
        clean.append({"prompt": row["prompt"], answer: row[answer]})
    return dataclasses.replace(config, examples=clean)


def check_prefix_length(config: PipelineConfig) -> None:
    """Few-shot examples that leave no room for the rows: exit 2 on the driver (a remote model's replicas
    say so)."""
    prefix = TASKS[config.task].render_prefix(config)
    if not prefix:
        return
    loc = model_location(config.model, config)
    if not loc.is_local:
        return
    from model import PersimmonConfig, PersimmonTokenizer

    limit = config.max_seq_len or PersimmonConfig.from_pretrained(loc.path).max_position_embeddings
    n = len(PersimmonTokenizer.from_pretrained(loc.path).encode(prefix))
    if n >= limit:
        raise ConfigError(f"examples: the rendered few-shot prefix has {n} tokens; every row starts with it, so it "
                          f"must be shorter than max_seq_len={limit}: use fewer or shorter examples")
