"""Persimmon in plain torch: config, model and heads, checkpoints, tokenizer, engine."""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import PersimmonConfig
from .modeling import (
    KVCache,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)

__all__ = [
    "CheckpointError", "KVCache", "PersimmonConfig", "PersimmonForCausalLM",
    "PersimmonForSequenceClassification", "PersimmonForTokenClassification", "PersimmonModel",
    "load_pretrained", "save_pretrained",
]
