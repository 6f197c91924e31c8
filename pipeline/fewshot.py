"""Few-shot examples: a JSONL file of solved rows rendered into a prefix every row starts with.

Rows are `{"prompt": ..., "label": ...}` for the label task (the label must be one of the
choices) or `{"prompt": ..., "completion": ...}` for generate. Each example goes through the
run's prompt template (chat wrapper included), then the choice separator (label) or a space
(generate) and its answer, then a blank line:

    Review: great film\\nSentiment: positive\\n\\nReview: dull\\nSentiment: negative\\n\\n<row's prompt>

With --chat-template that is persimmon-8b-chat's multi-turn format
(`human: ...\\n\\nadept: answer\\n\\n`). The driver reads the file once and ships the rows with
the config, so replicas on other nodes need no access to it; each replica computes the prefix's
KV cache once and keeps it (`Engine.pin_prefix`).
"""

from __future__ import annotations

import json

from .config import ConfigError, PipelineConfig

EXAMPLE_SEPARATOR = "\n\n"


def load_examples(config: PipelineConfig) -> PipelineConfig:
    """The config with `examples` read into a list of rows (a path or URI is read here, on the
    driver); every row checked. Raises ConfigError naming the file and line."""
    import dataclasses

    source = config.examples
    if source is None or isinstance(source, list):
        rows, where = source, "examples"
    else:
        from .storage import resolve

        loc = resolve(str(source), config)
        try:
            with loc.fs.open_input_file(loc.path) as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"examples: cannot read {loc.uri}: {e}") from None
        rows, where = [], loc.uri
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"examples: {where} line {n} is not JSON: {e}") from None
    if rows is None:
        return config
    answer = "label" if config.task == "label" else "completion"
    if not rows:
        raise ConfigError(f"examples: {where} has no rows")
    clean = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get(answer), str):
            raise ConfigError(f"examples: {where} row {n} needs string fields 'prompt' and '{answer}', got {row!r:.200}")
        if config.task == "label" and row["label"] not in config.choices:
            raise ConfigError(f"examples: {where} row {n} has label {row['label']!r}, not one of the choices "
                              f"{config.choices}")
        clean.append({"prompt": row["prompt"], answer: row[answer]})
    return dataclasses.replace(config, examples=clean)


def render_prefix(config: PipelineConfig) -> str:
    """The text every row's prompt is appended to ('' without examples)."""
    if not config.examples:
        return ""
    if isinstance(config.examples, str):
        raise ConfigError("examples must be loaded on the driver first (pipeline.fewshot.load_examples)")
    sep = config.choice_separator if config.task == "label" else " "
    answer = "label" if config.task == "label" else "completion"
    return "".join(config.template.format(prompt=ex["prompt"]) + sep + ex[answer] + EXAMPLE_SEPARATOR
                   for ex in config.examples)
