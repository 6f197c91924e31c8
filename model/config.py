"""Persimmon configuration: the fields of transformers' `PersimmonConfig`, same names, same defaults.

Reads both config.json styles found in the wild:
- transformers 4.x: top-level `rope_theta`, `partial_rotary_factor`, `rope_scaling`;
- transformers 5.x: a `rope_parameters` dict holding `rope_type`, `rope_theta`, `factor`,
  `partial_rotary_factor`.
Writes the 4.x style (what the released checkpoints use), which both generations read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.json"
ACTIVATIONS = ("relu2",)  # squared ReLU, the only activation Persimmon ships with
ROPE_TYPES = ("default", "linear", "dynamic")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


@dataclass
class PersimmonConfig:
    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 25000.0
    rope_scaling: dict | None = None  # {"rope_type"|"type": "linear"|"dynamic", "factor": float}
    qk_layernorm: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    partial_rotary_factor: float = 0.5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # classification heads
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    # bookkeeping carried through save/load
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    # keys we do not use but keep so a round trip loses nothing (e.g. rms_norm_eps on the hub)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = ({v: k for k, v in self.id2label.items()} if self.label2id is None
                         else {str(k): int(v) for k, v in self.label2id.items()})
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def rope_factor(self) -> float:
        return float((self.rope_scaling or {}).get("factor", 1.0))

    def validate(self) -> None:
        def bad(name, msg):
            raise ValueError(f"PersimmonConfig.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(name, f"must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"{self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"unknown activation {self.hidden_act!r}; supported: {ACTIVATIONS}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            bad("partial_rotary_factor", f"gives rotary dim {self.rotary_dim} "
                f"(head_dim {self.head_dim}); it must be even and >= 2")
        if self.rope_type == "dynamic" and self.rotary_dim <= 2:
            bad("rope_scaling", "dynamic NTK scaling needs a rotary dim > 2")
        for name in ("rope_theta", "layer_norm_eps"):
            if not getattr(self, name) > 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.rope_scaling:
            if self.rope_type not in ROPE_TYPES:
                bad("rope_scaling", f"unknown rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
            if self.rope_type in ("linear", "dynamic"):
                factor = self.rope_scaling.get("factor")
                if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1.0:
                    bad("rope_scaling", f"'factor' must be a number > 1 for {self.rope_type} "
                        f"scaling, got {factor!r}")
        if self.problem_type not in PROBLEM_TYPES:
            bad("problem_type", f"unknown problem type {self.problem_type!r}; supported: {PROBLEM_TYPES}")
        ids = [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)]
        for name, value in ids + [("eos_token_id", value) for value in self.eos_ids()]:
            if value is not None and not 0 <= value < self.vocab_size:
                bad(name, f"{value} is outside the vocabulary [0, {self.vocab_size})")

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "PersimmonConfig":
        """A Persimmon-shaped model small enough for tests, CI and the demo (about 0.3M params)."""
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=512)
        base.update(overrides)
        return cls(**base)

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "PersimmonConfig":
        raw = dict(raw)
        model_type = raw.pop("model_type", "persimmon")
        if model_type != "persimmon":
            raise ValueError(f"config.json model_type is {model_type!r}, expected 'persimmon'")
        rope_params = raw.pop("rope_parameters", None)
        if rope_params:  # transformers 5.x style
            rope_params = dict(rope_params)
            raw.setdefault("rope_theta", rope_params.pop("rope_theta", 25000.0))
            if "partial_rotary_factor" in rope_params:
                raw.setdefault("partial_rotary_factor", rope_params.pop("partial_rotary_factor"))
            rope_type = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if rope_type != "default" and raw.get("rope_scaling") is None:
                raw["rope_scaling"] = {"rope_type": rope_type, **rope_params}
        if raw.get("rope_scaling") is not None:
            scaling = dict(raw["rope_scaling"])
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            if scaling.get("rope_type") == "default":
                scaling = None
            raw["rope_scaling"] = scaling
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out = {**self.extra, **out, "model_type": "persimmon"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if out["architectures"] is None:
            out["architectures"] = ["PersimmonForCausalLM"]
        if out["torch_dtype"] is None:
            out.pop("torch_dtype")
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PersimmonConfig":
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {file!r}")
        with open(file, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{file} must hold a JSON object")
        return cls.from_dict(raw)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        Path(path, CONFIG_NAME).write_text(text, encoding="utf-8")
