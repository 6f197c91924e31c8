"""Tests for model/tokenizer.py and model/tiny_tokenizer.py (CPU only, no network).

Reference for every id: the raw ``sentencepiece.SentencePieceProcessor`` on the same file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sentencepiece as spm
import torch
from hf_compat import batch_decode, batch_encode

from model.tiny_tokenizer import tiny_corpus, train_tiny_tokenizer
from model.tokenizer import ENDOFTEXT, PersimmonTokenizer, chat_prompt

TINY_MODEL_VOCAB = 512  # vocab_size of the tiny model preset; the tokenizer must fit inside it

# Text that a tokenizer gets wrong if it normalises, strips, or mishandles bytes.
ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström façade",  # accents (precomposed)
    "cafe\u0301 vs caf\u00e9",  # combining accent vs precomposed: must stay distinct
    "日本語のテキストと中文文本",  # CJK
    "emoji: 🙂 👍🏽 👨‍👩‍👧 🇫🇷",  # skin tone, ZWJ family, flag
    "مرحبا بالعالم",  # Arabic (RTL)
    "שלום עולם",  # Hebrew (RTL)
    "mixed \u202eRTL override\u202c and العربية in English",
    "two  spaces,   three,    four",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "NUL \x00 inside and \x00\x00 twice",
    "control \x01\x07\x1b[0m\x7f chars",
    "byte-fallback only: Ω ж ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \ufeff",
    "digits 0123456789 and 3.14159",
    "def f(x):\n    return x ** 2  # code\n",
    "human: hi\n\nadept: hello",
    "<unk> <s> </s> <0x41> look like special pieces but are text",
    "x" * 300,
]
# Also checked for ids, but not round-trippable by design: U+2581 is sentencepiece's own space
# symbol, and the literal special-token text encodes to the special id (as in raw sentencepiece).
ENCODE_ONLY_TEXTS = ["\u2581 lower one eighth block", f"a{ENDOFTEXT}b", ENDOFTEXT]
ALL_TEXTS = ROUND_TRIP_TEXTS + ENCODE_ONLY_TEXTS


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tiny_tokenizer(out)
    return str(out)


@pytest.fixture(scope="session")
def sp(tiny_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_dir, "tokenizer.model"))


@pytest.fixture(scope="session")
def tok(tiny_dir) -> PersimmonTokenizer:
    return PersimmonTokenizer.from_pretrained(tiny_dir)


def _read_bytes(*parts) -> bytes:
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def _train_variant(path, **trainer_kwargs) -> str:
    """A tiny sentencepiece model with other special-piece settings than the tiny tokenizer."""
    writer = io.BytesIO()
    kwargs = dict(model_type="unigram", vocab_size=300, byte_fallback=True, character_coverage=0.99)
    kwargs.update(trainer_kwargs)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=writer, minloglevel=2, **kwargs
    )
    path = os.path.join(path, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(writer.getvalue())
    return path


# ------------------------------------------------------------------ the tiny tokenizer itself


def test_tiny_tokenizer_shape(sp):
    assert sp.get_piece_size() == 320 <= TINY_MODEL_VOCAB
    assert sp.id_to_piece(0) == "<unk>" and sp.unk_id() == 0
    assert sp.piece_to_id(ENDOFTEXT) != sp.unk_id()
    assert sp.bos_id() == sp.eos_id() == sp.pad_id() == -1
    byte_pieces = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    assert len(byte_pieces) == 256 and sp.piece_to_id("<0x00>") in byte_pieces
    assert 0 not in sp.encode("ꙮ 日本 \x00")  # byte fallback: never <unk>


def test_tiny_tokenizer_deterministic_fast_and_concurrent(tmp_path, tiny_dir):
    start = time.perf_counter()
    train_tiny_tokenizer(tmp_path / "once")
    assert time.perf_counter() - start < 3.0
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(train_tiny_tokenizer, [tmp_path / f"t{i}" for i in range(4)]))
    reference = _read_bytes(tiny_dir, "tokenizer.model")
    for path in [str(tmp_path / "once" / "tokenizer.model"), *paths]:
        assert _read_bytes(path) == reference
    assert not [n for n in os.listdir(tmp_path / "t0") if n.startswith(".tmp")]
    config = json.loads(_read_bytes(tmp_path / "t0" / "tokenizer_config.json"))
    assert config["add_bos_token"] is True and config["bos_token"] == config["pad_token"] == ENDOFTEXT


def test_tiny_tokenizer_rejects_bad_vocab_size(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tiny_tokenizer(tmp_path, vocab_size=100)


# ------------------------------------------------------------------ special ids


def test_special_ids_come_from_pieces(tok, sp):
    endoftext = sp.piece_to_id(ENDOFTEXT)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == endoftext
    assert tok.bos_token == tok.eos_token == tok.pad_token == ENDOFTEXT
    assert tok.unk_token_id == 0 and tok.unk_token == "<unk>"
    assert tok.vocab_size == len(tok) == 320
    assert tok.token_to_id(ENDOFTEXT) == endoftext
    assert tok.id_to_token(endoftext) == ENDOFTEXT
    assert tok.token_to_id("no such piece") is None
    assert tok.id_to_token(sp.piece_to_id("<0x0A>")) == "<0x0A>"
    with pytest.raises(IndexError):
        tok.id_to_token(320)


def test_endoftext_found_wherever_it_is(tmp_path):
    # Two other user pieces come first, so |ENDOFTEXT| is not id 1: the id must be looked up.
    path = _train_variant(
        tmp_path, unk_id=0, bos_id=-1, eos_id=-1, user_defined_symbols=["<a>", "<b>", ENDOFTEXT]
    )
    tok = PersimmonTokenizer(path)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 3
    assert tok.encode("hi")[0] == 3


def test_defaults_without_endoftext_use_sentencepiece_ids(tmp_path):
    path = _train_variant(tmp_path)  # sentencepiece defaults: <unk>=0, <s>=1, </s>=2, no pad
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = PersimmonTokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert tok.pad_token_id == tok.eos_token_id  # documented: pad falls back to EOS
    explicit = PersimmonTokenizer(path, bos_token="</s>", eos_token="<s>", pad_token="<unk>")
    assert (explicit.bos_token_id, explicit.eos_token_id, explicit.pad_token_id) == (2, 1, 0)
    with pytest.raises(ValueError, match="not a piece"):
        PersimmonTokenizer(path, bos_token="|NOPE|")


def test_control_special_piece_decodes_by_name(tmp_path):
    path = _train_variant(tmp_path, unk_id=0, bos_id=-1, eos_id=-1, control_symbols=[ENDOFTEXT])
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = PersimmonTokenizer(path)
    eot = sp.piece_to_id(ENDOFTEXT)
    assert sp.is_control(eot) and tok.eos_token_id == eot
    ids = tok.encode("hello world") + [eot]
    assert sp.decode(ids) == "hello world"  # sentencepiece hides control pieces...
    assert tok.decode(ids) == "hello world"
    # ...we write them by name.
    assert tok.decode(ids, skip_special_tokens=False) == f"{ENDOFTEXT}hello world{ENDOFTEXT}"


# ------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_encode_matches_raw_sentencepiece(tok, sp, text):
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.encode(text) == [tok.bos_token_id] + sp.encode(text)
    assert tok.encode(text, add_bos=True) == tok.encode(text)


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])


def test_add_bos_token_false_is_the_default_for_encode(tiny_dir, sp):
    tok = PersimmonTokenizer(os.path.join(tiny_dir, "tokenizer.model"), add_bos_token=False)
    assert tok.encode("hi there") == sp.encode("hi there")
    assert tok.encode("hi there", add_bos=True) == [tok.bos_token_id] + sp.encode("hi there")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode(text, add_bos=False), dtype=torch.long)) == text


def test_decode_is_sentencepiece_decode_without_specials(tok, sp):
    eot = tok.eos_token_id
    body = sp.encode("héllo 日本 🙂 world")
    ids = [eot] + body + [eot, eot]
    assert tok.decode(ids) == sp.decode(body) == "héllo 日本 🙂 world"
    # User-defined special piece: sentencepiece writes it by name when not skipped.
    assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids)
    assert tok.decode(ids, skip_special_tokens=False).count(ENDOFTEXT) == 3
    # A cut through a multi-byte character: same replacement character as sentencepiece.
    partial = sp.encode("日")[:-1]
    assert tok.decode(partial) == sp.decode(partial) != ""
    assert tok.decode([]) == ""


def test_decode_out_of_range_and_bad_ids(tok, sp):
    hello = sp.encode("hello")
    assert tok.decode(hello + [TINY_MODEL_VOCAB - 1]) == sp.decode(hello + [sp.unk_id()])
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-100])
    with pytest.raises(TypeError):
        tok.decode([[1, 2], [3]])


def test_batch_decode(tok):
    texts = ["short", "a somewhat longer text 🙂"]
    for side in ("left", "right"):
        batch = batch_encode(tok, texts, padding_side=side)
        assert batch_decode(tok, batch["input_ids"]) == texts
        assert batch_decode(tok, batch["input_ids"].tolist()) == texts


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled 🙂") == tok.encode("pickled 🙂")
    assert (clone.bos_token_id, clone.pad_token_id, clone.add_bos_token) == (
        tok.bos_token_id,
        tok.pad_token_id,
        tok.add_bos_token,
    )


# ------------------------------------------------------------------ batches: padding and truncation

BATCH = ["hi", "the cat reads a long letter", "", "日本 🙂"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_exact(tok, side):
    rows = [tok.encode(t) for t in BATCH]
    width = max(map(len, rows))
    out = batch_encode(tok, BATCH, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(BATCH), width)
    pad = tok.pad_token_id
    for row, got_ids, got_mask in zip(rows, ids.tolist(), mask.tolist(), strict=True):
        n_pad = width - len(row)
        if side == "left":
            assert got_ids == [pad] * n_pad + row
            assert got_mask == [0] * n_pad + [1] * len(row)
        else:
            assert got_ids == row + [pad] * n_pad
            assert got_mask == [1] * len(row) + [0] * n_pad
    assert mask.sum(1).tolist() == [len(r) for r in rows]


def test_batch_encode_lists_equal_tensors(tok):
    as_lists = batch_encode(tok, BATCH, padding_side="right", return_tensors=None, add_bos=False)
    as_tensors = batch_encode(tok, BATCH, padding_side="right", add_bos=False)
    assert as_lists["input_ids"] == as_tensors["input_ids"].tolist()
    assert as_lists["attention_mask"] == as_tensors["attention_mask"].tolist()
    assert as_lists["input_ids"][0][: len(tok.encode("hi", add_bos=False))] == tok.encode("hi", add_bos=False)


def test_single_string_and_empty_batch(tok):
    single = batch_encode(tok, "hello")
    assert single["input_ids"].tolist() == [tok.encode("hello")]
    empty = batch_encode(tok, [])
    assert empty["input_ids"].shape == empty["attention_mask"].shape == (0, 0)


def test_truncation_left_and_right_keep_bos(tok):
    text = "the cat reads a long letter every morning."
    body = tok.encode(text, add_bos=False)
    bos = tok.bos_token_id
    assert len(body) > 6
    left = batch_encode(tok, [text, "hi"], max_length=6, truncation="left", padding_side="right")
    right = batch_encode(tok, [text, "hi"], max_length=6, truncation="right", padding_side="right")
    assert left["input_ids"][0].tolist() == [bos] + body[-5:]
    assert right["input_ids"][0].tolist() == [bos] + body[:5]
    assert batch_encode(tok, text, max_length=6, truncation=True)["input_ids"][0].tolist() == [bos] + body[:5]
    short = tok.encode("hi")
    assert left["input_ids"][1].tolist() == short + [tok.pad_token_id] * (6 - len(short))
    assert left["input_ids"].shape == (2, 6)
    no_bos = batch_encode(tok, text, max_length=4, truncation="left", add_bos=False)
    assert no_bos["input_ids"][0].tolist() == body[-4:]
    # A row already within max_length is untouched.
    assert batch_encode(tok, "hi", max_length=50, truncation="left")["input_ids"][0].tolist() == short


def test_pad_to_max_length(tok):
    out = batch_encode(tok, ["hi"], max_length=8, padding="max_length", padding_side="left")
    row = tok.encode("hi")
    assert out["input_ids"][0].tolist() == [tok.pad_token_id] * (8 - len(row)) + row
    assert out["attention_mask"][0].tolist() == [0] * (8 - len(row)) + [1] * len(row)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding_side="middle"), "padding_side"),
        (dict(truncation="both", max_length=4), "truncation"),
        (dict(truncation="left"), "max_length"),
        (dict(padding="max_length"), "max_length"),
        (dict(padding="do_not_pad"), "padding"),
        (dict(return_tensors="np"), "return_tensors"),
        (dict(max_length=0, truncation="left"), "max_length"),
        (dict(max_length=3), "truncation"),  # too long without truncation
    ],
)
def test_batch_encode_bad_options(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        batch_encode(tok, ["the cat reads a long letter", "hi"], **kwargs)


# ------------------------------------------------------------------ chat template


def test_chat_prompt_exact():
    assert chat_prompt("What is 2+2?") == "human: What is 2+2?\n\nadept:"
    assert (
        chat_prompt("And 3+3?", [("What is 2+2?", "4")])
        == "human: What is 2+2?\n\nadept: 4\n\nhuman: And 3+3?\n\nadept:"
    )
    assert (
        chat_prompt("c", [("a", "A"), ("b", "B")])
        == "human: a\n\nadept: A\n\nhuman: b\n\nadept: B\n\nhuman: c\n\nadept:"
    )


def test_apply_chat_template(tok):
    assert tok.apply_chat_template("hi") == "human: hi\n\nadept:"
    history = [("hi", "hello")]
    assert tok.apply_chat_template("more", history=history) == chat_prompt("more", history)


# ------------------------------------------------------------------ files: errors, load, save


def test_missing_files_raise_with_path(tmp_path):
    missing_file = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        PersimmonTokenizer(missing_file)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        PersimmonTokenizer.from_pretrained(tmp_path / "does_not_exist")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        PersimmonTokenizer.from_pretrained(tmp_path / "empty_dir")


def test_from_pretrained_accepts_model_file_and_adept_name(tiny_dir, tmp_path, tok):
    direct = PersimmonTokenizer.from_pretrained(os.path.join(tiny_dir, "tokenizer.model"))
    assert direct.encode("hello") == tok.encode("hello")
    adept = tmp_path / "adept"
    adept.mkdir()
    (adept / "adept_vocab.model").write_bytes(_read_bytes(tiny_dir, "tokenizer.model"))
    assert PersimmonTokenizer.from_pretrained(adept).encode("hello") == tok.encode("hello")


def test_hub_style_config_files(tiny_dir, tmp_path, sp):
    """The released files: add_bos_token, bos "|ENDOFTEXT|" (maybe as a dict), eos/pad null."""
    (tmp_path / "tokenizer.model").write_bytes(_read_bytes(tiny_dir, "tokenizer.model"))
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": ENDOFTEXT, "lstrip": False},
        "eos_token": None,
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = PersimmonTokenizer.from_pretrained(tmp_path)
    endoftext = sp.piece_to_id(ENDOFTEXT)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == endoftext
    assert tok.add_bos_token is False and tok.encode("hi") == sp.encode("hi")
    # special_tokens_map fills keys the config leaves null.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<unk>"}}))
    assert PersimmonTokenizer.from_pretrained(tmp_path).pad_token_id == 0
    # Keyword overrides win over both files.
    assert PersimmonTokenizer.from_pretrained(tmp_path, add_bos_token=True).encode("hi")[0] == endoftext
    config["bos_token"] = "|NOT A PIECE|"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="NOT A PIECE"):
        PersimmonTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_save_pretrained_round_trip(tiny_dir, tmp_path, add_bos_token):
    original = PersimmonTokenizer(
        os.path.join(tiny_dir, "tokenizer.model"), pad_token="<unk>", add_bos_token=add_bos_token
    )
    paths = original.save_pretrained(tmp_path / "saved")
    assert sorted(os.path.basename(p) for p in paths) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert _read_bytes(paths[0]) == _read_bytes(tiny_dir, "tokenizer.model")
    loaded = PersimmonTokenizer.from_pretrained(tmp_path / "saved")
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size", "add_bos_token")
    for attr in attrs:
        assert getattr(loaded, attr) == getattr(original, attr), attr
    assert loaded.pad_token_id == 0
    for text in ALL_TEXTS:
        assert loaded.encode(text) == original.encode(text)
    config = json.loads(_read_bytes(tmp_path / "saved" / "tokenizer_config.json"))
    assert config["add_bos_token"] is add_bos_token and config["bos_token"] == ENDOFTEXT


# ------------------------------------------------------------------ transformers, if it can read the files


def _load_transformers_tokenizer(directory):
    """transformers' tokenizer for the files we saved. A failure to load them fails the test:
    files transformers cannot read would be a bug in what we save, not a reason to skip."""
    transformers = pytest.importorskip("transformers", reason="transformers (the test oracle) is not installed")
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def test_matches_transformers_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    hf = _load_transformers_tokenizer(str(tmp_path))
    assert hf.bos_token_id == tok.bos_token_id and hf.pad_token_id == tok.pad_token_id
    # transformers first splits literal special-token text ("|ENDOFTEXT|", "<unk>") out of the
    # input, then adds a dummy "▁" to what follows; raw sentencepiece (and we) do not.
    texts = [t for t in ALL_TEXTS if not any(s in t for s in hf.all_special_tokens)]
    assert len(texts) >= len(ALL_TEXTS) - 4
    for text in texts:
        assert hf(text)["input_ids"] == tok.encode(text), repr(text)
        without_bos = hf(text, add_special_tokens=False)["input_ids"]
        assert without_bos == tok.encode(text, add_bos=False), repr(text)
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text)
