"""Persimmon in plain torch: config, model and heads, checkpoints, tokenizer, engine.

Names load on first use, so the modules that need no torch (`model.config`, `model.capacity`,
`model.sampling_params`, `model.scheduler`, `model.tokenizer`) import without it.
"""

import importlib

_HOMES = {
    "CheckpointError": "checkpoint", "load_pretrained": "checkpoint", "save_pretrained": "checkpoint",
    "PersimmonConfig": "config", "Engine": "engine", "SamplingParams": "sampling_params",
    "ChoiceScores": "outputs", "Classification": "outputs", "Completion": "outputs",
    "TextScore": "outputs",
    "PersimmonForCausalLM": "modeling", "PersimmonForSequenceClassification": "modeling",
    "PersimmonForTokenClassification": "modeling", "PersimmonModel": "modeling",
    "PersimmonTokenizer": "tokenizer", "chat_prompt": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
