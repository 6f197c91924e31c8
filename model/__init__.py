"""Persimmon in plain torch: config, model and heads, checkpoints, tokenizer, engine."""

from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import PersimmonConfig
from .engine import Engine
from .modeling import (
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)
from .outputs import ChoiceScores, Classification, Completion
from .sampling_params import SamplingParams
from .tokenizer import PersimmonTokenizer, chat_prompt

__all__ = [
    "CheckpointError", "ChoiceScores", "Classification", "Completion", "Engine",
    "PersimmonConfig", "PersimmonForCausalLM", "PersimmonForSequenceClassification",
    "PersimmonForTokenClassification", "PersimmonModel", "PersimmonTokenizer", "SamplingParams",
    "chat_prompt", "load_pretrained", "save_pretrained",
]
