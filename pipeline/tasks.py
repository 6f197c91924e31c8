"""The tasks, one declaration each: what the CLI says about it, the checkpoint it needs, the
settings that belong to it, what its results depend on, its output columns and its stage.

Everything else reads these: the CLI (subcommands, which flags each shows), the config checks,
the driver's model check, the resume check (outputs written under other result settings are not
reused) and the output schema. Adding a task is one `Task` here and one stage class in
pipeline/stages.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pyarrow as pa

CAUSAL, CLASSIFIER = "PersimmonForCausalLM", "PersimmonForSequenceClassification"


@dataclass(frozen=True)
class Task:
    name: str
    description: str                      # the subcommand's help
    architecture: str                     # the checkpoint class it runs on
    columns: tuple[tuple[str, pa.DataType], ...]  # output columns it adds, in order ("error_kind", "error" last)
    settings: tuple[str, ...]             # config fields that only this task (and others listing them) takes
    result_settings: tuple[str, ...]      # config fields its rows' results depend on (besides the common ones)
    stage: str                            # "module:Class" of its stage, imported when needed
    wrong_architecture_hint: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def column_type(self, name: str) -> pa.DataType:
        return dict(self.columns)[name]

    def stage_class(self):
        module, cls = self.stage.split(":")
        return getattr(importlib.import_module(module), cls)


_GENERATION = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "truncate", "json_schema", "regex")
_ERROR = (("error_kind", pa.string()), ("error", pa.string()))

TASKS: dict[str, Task] = {t.name: t for t in (
    Task(
        name="generate",
        description="Complete every prompt with a causal Persimmon checkpoint.",
        architecture=CAUSAL,
        columns=(("completion", pa.string()), ("finish_reason", pa.string()), ("num_prompt_tokens", pa.int32()),
                 ("num_generated_tokens", pa.int32()), ("parsed", pa.string()), *_ERROR),
        settings=(*_GENERATION, "choices", "examples"),
        result_settings=(*_GENERATION, "choices", "examples"),
        stage="pipeline.stages:GenerateStage",
    ),
    Task(
        name="classify",
        description="Classify every text with a PersimmonForSequenceClassification checkpoint.",
        architecture=CLASSIFIER,
        columns=(("label", pa.string()), ("score", pa.float64()), ("probs", pa.list_(pa.float64())), *_ERROR),
        settings=(),
        result_settings=(),
        stage="pipeline.stages:ClassifyStage",
        wrong_architecture_hint=" (use `label` for zero-shot labeling with a causal LM)",
    ),
    Task(
        name="label",
        description="Zero-shot labeling with a causal checkpoint: pick the --choices option with the "
                    "highest log-likelihood after the (templated) prompt.",
        architecture=CAUSAL,
        columns=(("label", pa.string()), ("scores", pa.list_(pa.float64())), ("probs", pa.list_(pa.float64())),
                 ("margin", pa.float64()), *_ERROR),
        settings=("choices", "choice_separator", "choice_score", "calibrate", "content_free_inputs", "low_margin",
                  "examples"),
        result_settings=("choices", "choice_separator", "choice_score", "calibrate", "examples"),
        stage="pipeline.stages:LabelStage",
    ),
)}
TASK_NAMES = tuple(TASKS)
# config fields some task owns: the CLI shows each only on the subcommands of the tasks that list it
TASK_SETTINGS = frozenset(s for t in TASKS.values() for s in t.settings)
