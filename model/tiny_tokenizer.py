"""Train a tiny Persimmon-style sentencepiece tokenizer for tests, benchmarks and the demo.

A model of the released tokenizer's kind, trained in a fraction of a second: Unigram with byte
fallback (any UTF-8 text encodes without ``<unk>``), ``<unk>`` = 0, no ``<s>``/``</s>``/``<pad>``,
``|ENDOFTEXT|`` a user-defined piece (id 1) that ``PersimmonTokenizer`` uses for BOS, EOS and pad,
identity normalisation and a dummy ``▁`` prefix (so ``decode(encode(text)) == text``).
``vocab_size`` 320 by default: it must stay ``<=`` the tiny model's vocab (512); 256 ids are byte
pieces. The corpus comes from the word lists below; training is single-threaded on it, unshuffled,
so the same arguments give the same bytes; files are written atomically.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tempfile
import threading

import sentencepiece as spm

from model.tokenizer import ENDOFTEXT, PersimmonTokenizer

_TRAIN_LOCK = threading.Lock()  # sentencepiece's trainer keeps process-global state

_SUBJECTS = [
    "the model", "a small robot", "my neighbour", "the old teacher", "our team", "the cat",
    "every student", "the pilot", "a quiet river", "the new server", "this function", "the farmer",
]
_VERBS = [
    "reads", "writes", "builds", "watches", "carries", "answers", "explains", "follows",
    "cleans", "measures", "paints", "tests",
]
_OBJECTS = [
    "a long letter", "the garden", "three red apples", "the evening news", "a simple question",
    "the mountain road", "two paper boats", "the broken window", "a batch of tokens",
    "the kitchen table", "an open book", "the weather report",
]
_TAILS = [
    "before lunch.", "after the rain stopped.", "with great care.", "every morning.",
    "in the city.", "for the first time.", "without a word.", "near the station.",
    "on a cold day.", "at night.", "because it was late.", "while singing softly.",
]
_EXTRA = [  # capitals, digits, punctuation, code and chat-like text
    "Hello, world!",
    "human: What is the capital of France?\n\nadept: The capital of France is Paris.",
    "human: Write a haiku about autumn.\n\nadept: Leaves fall on the path.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n\tprint(i * 2)",
    "The year 2023 had 365 days; 2024 had 366.",
    "Persimmon is a language model with 8 billion parameters.",
    "Batch inference runs many prompts at once on one GPU.",
    "Is it raining? No, it is sunny and warm.",
    "Tokens, tokens, and more tokens: that is all a model sees.",
    "Please send the report by Friday, 5 p.m. at the latest.",
    "She said: \"It works!\" and smiled.",
    "x = [1, 2, 3]; y = {'a': 4}",
    "The quick brown fox jumps over the lazy dog.",
    "Ray Data splits the dataset into blocks and maps each batch.",
]


def tiny_corpus() -> list[str]:
    """432 templated sentences plus the hand-written lines."""
    lines = []
    for i, (s, v, o) in enumerate(itertools.product(_SUBJECTS, _VERBS, _OBJECTS)):
        if i % 4:  # keep a quarter of the 1728 combinations: varied, yet small and fast
            continue
        tail = _TAILS[(i // 4) % len(_TAILS)]
        sentence = f"{s} {v} {o} {tail}"
        lines.append(sentence[0].upper() + sentence[1:] if i % 8 == 0 else sentence)
    return lines + _EXTRA


def train_tiny_model_proto(vocab_size: int = 320) -> bytes:
    """The tiny Unigram model's serialised ``ModelProto``."""
    if not 260 <= vocab_size <= 4096:
        raise ValueError(f"vocab_size must be in [260, 4096] (256 byte pieces + specials), got {vocab_size}")
    writer = io.BytesIO()
    with _TRAIN_LOCK:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(tiny_corpus()),
            model_writer=writer,
            model_type="unigram",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.995,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            user_defined_symbols=[ENDOFTEXT],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            num_threads=1,
            shuffle_input_sentence=False,
            max_sentencepiece_length=16,
            minloglevel=2,  # quiet
        )
    return writer.getvalue()


def _write_atomic(path: str, data: bytes) -> None:  # a temporary file, then os.replace
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 320) -> str:
    """Train the tiny tokenizer (and its tokenizer_config.json) into ``out_dir``; returns its model path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "tokenizer.model")
    _write_atomic(model_path, train_tiny_model_proto(vocab_size))
    config = json.dumps(PersimmonTokenizer(model_path).tokenizer_config(), indent=2) + "\n"
    _write_atomic(os.path.join(out_dir, "tokenizer_config.json"), config.encode())
    return model_path
