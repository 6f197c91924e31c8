"""Persimmon's tokenizer: an exact wrapper around its sentencepiece model (no transformers).

``tokenizer.model`` is a sentencepiece Unigram model with byte fallback (``<unk>`` = 0; in the
released files ``|ENDOFTEXT|`` = 71013 is BOS, EOS and pad). ``encode`` is ``sp.encode``, BOS
first when on (``add_bos_token``, true by default as in the hub's tokenizer_config); ``decode`` is
``sp.decode`` once BOS/EOS/pad are dropped, so byte-fallback pieces reassemble into UTF-8.

Special ids are looked up by piece name, never hard-coded; a name in ``tokenizer_config.json`` /
``special_tokens_map.json`` must be a piece. Unnamed, BOS and EOS are ``|ENDOFTEXT|`` if the
model has it, else sentencepiece's own (when >= 0); **the pad id defaults to the EOS id**
(Persimmon has no pad token), else sentencepiece's ``pad_id()``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

ENDOFTEXT = "|ENDOFTEXT|"
MODEL_FILE = "tokenizer.model"
ADEPT_MODEL_FILE = "adept_vocab.model"  # the original adept-inference checkpoints' name for it
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def chat_prompt(prompt: str, history: Iterable[tuple[str, str]] | None = None) -> str:
    """Build a persimmon-8b-chat prompt; ``history`` holds earlier ``(human, adept)`` turns, oldest first::

        chat_prompt("hi")                      == "human: hi\\n\\nadept:"
        chat_prompt("and?", [("hi", "hello")]) == "human: hi\\n\\nadept: hello\\n\\nhuman: and?\\n\\nadept:"
    """
    turns = [f"human: {human}\n\nadept: {answer}\n\n" for human, answer in history or ()]
    return "".join(turns) + f"human: {prompt}\n\nadept:"


def _token_content(token) -> str | None:
    """A special token as written by transformers: a string, ``{"content": ...}`` or null."""
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"cannot read special token {token!r}: expected a string or a dict with 'content'")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class PersimmonTokenizer:
    """Sentencepiece-backed tokenizer with Persimmon's special-token rules (module docstring).
    Special tokens are piece names (None: the defaults); ``add_bos_token`` is ``encode``'s default."""

    def __init__(self, model_file: str | os.PathLike, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, add_bos_token: bool = True):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
        self.model_file = model_file
        self._sp = sp = spm.SentencePieceProcessor(model_file=model_file)
        self._fragment_sp = None  # built on first use by encode_fragment
        endoftext = self.token_to_id(ENDOFTEXT)
        self.bos_token_id = self._special_id(bos_token, endoftext, sp.bos_id())
        self.eos_token_id = self._special_id(eos_token, endoftext, sp.eos_id())
        self.pad_token_id = self._special_id(pad_token, self.eos_token_id, sp.pad_id())
        self.unk_token_id = sp.unk_id()
        # BOS, EOS and pad ids: what decode(..., skip_special_tokens=True) drops
        self.special_token_ids = frozenset(i for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id)
                                           if i is not None)
        self.add_bos_token = bool(add_bos_token)

    def _special_id(self, token, default: int | None, sp_fallback: int) -> int | None:
        """Id of a named special piece; unnamed: ``default``, else sentencepiece's id if >= 0."""
        token = _token_content(token)
        if token is None:
            return default if default is not None else sp_fallback if sp_fallback >= 0 else None
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not a piece of {self.model_file}")
        return token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> PersimmonTokenizer:
        """Load from a checkpoint directory (``tokenizer.model`` or ``adept_vocab.model``) or a
        ``.model`` file. Special tokens come from ``tokenizer_config.json``, else
        ``special_tokens_map.json``; keyword ``overrides`` (``bos_token=...``) win over both."""
        path = os.fspath(path)
        if os.path.isfile(path):
            model_file, directory = path, os.path.dirname(path)
        elif os.path.isdir(path):
            directory = path
            found = [f for f in (MODEL_FILE, ADEPT_MODEL_FILE) if os.path.isfile(os.path.join(path, f))]
            if not found:
                raise FileNotFoundError(f"no {MODEL_FILE} in tokenizer directory {path}")
            model_file = os.path.join(path, found[0])
        else:
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        config = _read_json(os.path.join(directory, CONFIG_FILE))
        special = _read_json(os.path.join(directory, SPECIAL_TOKENS_FILE))
        kwargs = {key: config[key] if config.get(key) is not None else special.get(key)
                  for key in ("bos_token", "eos_token", "pad_token")}
        if config.get("add_bos_token") is not None:
            kwargs["add_bos_token"] = bool(config["add_bos_token"])
        return cls(model_file, **{**kwargs, **overrides})

    @property
    def vocab_size(self) -> int:  # pieces; may be fewer than the model's embedding rows
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)

    def token_text(self, token_id: int) -> str:
        """One token's own text, as log-probabilities name it: the piece with '▁' as a space; a
        byte piece that is not a whole UTF-8 character (half an emoji) as OpenAI writes it,
        ``"bytes:\\xe2"``; special, control and unknown pieces by name; "" past the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            return ""
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            value = int(piece[3:5], 16)
            return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
        if token_id in self.special_token_ids or self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return piece
        return piece.replace("\u2581", " ")

    def _token_name(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._sp.id_to_piece(token_id)

    bos_token = property(lambda self: self._token_name(self.bos_token_id))
    eos_token = property(lambda self: self._token_name(self.eos_token_id))
    pad_token = property(lambda self: self._token_name(self.pad_token_id))
    unk_token = property(lambda self: self._token_name(self.unk_token_id))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """``sp.encode(text)``, BOS first if ``add_bos`` (None: :attr:`add_bos_token`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        add_bos = self.add_bos_token if add_bos is None else add_bos
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + self._sp.encode(text)

    def encode_fragment(self, text: str) -> list[int]:
        """Token ids of ``text`` as tokenized in the middle of a sequence: no BOS, no dummy-prefix
        space, no whitespace clean-up, so they decode to exactly ``text`` (structured decoding
        turns forced text into tokens with it)."""
        if self._fragment_sp is None:
            # the ModelProto plus a second normalizer_spec (field 3) whose add_dummy_prefix (3) and
            # remove_extra_whitespaces (4) are false: a parser merges a repeated message field into
            # the first, so no protobuf package is needed (its generated code pins protobuf versions)
            spec = bytes([3 << 3, 0, 4 << 3, 0])
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(self._sp.serialized_model_proto() + bytes([3 << 3 | 2, len(spec)]) + spec)
            self._fragment_sp = sp
        return self._fragment_sp.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple or 1-D tensor): sentencepiece's decoding, without the
        BOS/EOS/pad ids (``skip_special_tokens``) or with them written by name (``"|ENDOFTEXT|"``)."""
        ids = list(ids.tolist() if hasattr(ids, "tolist") else ids)  # torch / numpy
        if not all(isinstance(i, int) for i in ids):
            raise TypeError("decode expects a flat sequence of ints")
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id in {ids}")
        # the model's embedding may be larger than the tokenizer (tiny preset: 512 vs 320): ids
        # past the vocabulary decode as <unk> instead of raising
        ids, special = [i if i < self.vocab_size else self.unk_token_id for i in ids], self.special_token_ids
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in special])
        # sentencepiece renders control pieces as "" and user-defined ones by name: join the
        # per-piece surfaces so that special control pieces are named too
        return "".join(p.piece if p.id in special and self._sp.is_control(p.id) else p.surface
                       for p in self._sp.decode_ids_as_proto(ids).pieces)

    def apply_chat_template(self, prompt: str, history: Iterable[tuple[str, str]] | None = None) -> str:
        return chat_prompt(prompt, history)

    def tokenizer_config(self) -> dict:
        """``tokenizer_config.json`` as :meth:`save_pretrained` writes it. No ``tokenizer_class``:
        transformers v5 maps ``LlamaTokenizer`` to a BPE tokenizer that gives wrong ids for this
        Unigram model; without a class it builds one from ``tokenizer.model`` that matches."""
        return {"add_bos_token": self.add_bos_token, "add_eos_token": False, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": self.unk_token,
                "clean_up_tokenization_spaces": False}

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """Write the model, tokenizer_config and special_tokens_map files."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        paths = tuple(os.path.join(directory, name) for name in (MODEL_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE))
        Path(paths[0]).write_bytes(self._sp.serialized_model_proto())
        config = self.tokenizer_config()
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if config[k] is not None}
        for path, data in zip(paths[1:], (config, special)):
            Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return paths

    def __repr__(self) -> str:
        return (f"PersimmonTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"pad={self.pad_token_id}, add_bos_token={self.add_bos_token}, model_file={self.model_file!r})")
