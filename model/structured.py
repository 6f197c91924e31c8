"""Structured generation: a row's tokens constrained to a JSON schema, a regex or a list of
choices, with llguidance: a small Rust library with no Python dependencies (xgrammar needs
transformers and triton; outlines-core precompiles a regex index over the whole 262k vocabulary),
JSON schema, regex and Lark behind one matcher API, and a mask computation that releases the GIL,
so the next step's masks are filled on a helper thread while the model runs the forward.

Each constrained row holds an `LLMatcher`. Per step the sampling rows' masks fill an int32 bitmask
(a bit per token), the sampler sets disallowed logits to -inf, each sampled token is fed back to
its matcher. A complete grammar allows only EOS; a row whose grammar cannot continue stops
("stop"), so a "stop" row always matches; one cut off by max_new_tokens ends "length", possibly
mid-structure.
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .sampling_params import SamplingParams
from .scheduler import Sequence


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a core dependency; this only happens in a broken install
        raise RuntimeError("structured generation needs the llguidance package (pip install llguidance)") from e
    return llguidance


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for ('▁' is a space, <0xNN> one byte); special, unknown and
    control ids are b"\\xff" + their name, as llguidance expects; ids past the tokenizer: b"" (never allowed)."""
    sp = tokenizer._sp
    special = set(tokenizer.special_token_ids)
    out = []
    for i in range(vocab_size):
        if i >= sp.get_piece_size():
            out.append(b"")
            continue
        piece = sp.id_to_piece(i)
        if i in special or sp.is_control(i) or sp.is_unknown(i):
            out.append(b"\xff" + piece.encode("utf-8"))
        elif sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS, special ids, a tokenize function."""

    def __init__(self, tokens: list[bytes], eos_token_id: int, bos_token_id, special_token_ids: list[int], tokenize):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, eos_token_id, bos_token_id
        self.special_token_ids, self._tokenize = special_token_ids, tokenize

    def __call__(self, text) -> list[int]:
        return self._tokenize(text)


def grammar_of(params) -> str | None:
    """The llguidance grammar of a row's SamplingParams (None when unconstrained)."""
    ll = _llguidance()
    if params.json_schema is not None:
        schema = params.json_schema if isinstance(params.json_schema, str) else json.dumps(params.json_schema)
        # compact JSON ("," and ":" without free whitespace) unless the schema's x-guidance says otherwise
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if params.regex is not None:
        return ll.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        return ll.grammar_from("choice", list(params.choice))
    return None


def check_grammar(json_schema=None, regex=None, choice=None) -> str:
    """'' if llguidance compiles the constraint and some text matches it, else why not (no model
    tokenizer needed). A regex matching nothing (`[^\\s\\S]`) compiles, but its rows could not end."""
    try:
        grammar = grammar_of(SamplingParams(json_schema=json_schema, regex=regex, choice=choice))
    except ValueError as e:
        return str(e)
    ll = _llguidance()
    error = ll.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        return error
    matcher = ll.LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    mask = torch.zeros(((256 + 1 + 31) // 32,), dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
    return f"no text matches it ({error_text(matcher)})" if matcher.is_error() else ""


def error_text(matcher) -> str:
    """A matcher's error in one line (llguidance appends its whole parser state)."""
    lines = (matcher.get_error() or "").strip().splitlines()
    return lines[0] if lines else matcher.stop_reason()


@functools.cache
def _byte_tokenizer():
    """The 256 bytes and an EOS: enough for llguidance to tell whether a constraint admits any text."""
    ll = _llguidance()
    vocabulary = _Vocabulary([bytes([b]) for b in range(256)] + [b"\xff<eos>"], 256, None, [256],
                             lambda text: list(text.encode("utf-8") if isinstance(text, str) else text))
    return ll.LLTokenizer(ll.TokenizerWrapper(vocabulary), n_vocab=257)


class Grammars:
    """Per engine: the llguidance tokenizer (~1 s to build for 262k tokens), compiled grammars and
    the helper thread that fills masks while the forward runs; a row's matcher is `seq.grammar`."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        ll = _llguidance()
        self.vocab_size = vocab_size
        # text a grammar forces is tokenized mid-sequence (a dummy-prefix space would force a stray " ")
        vocabulary = _Vocabulary(token_bytes(tokenizer, vocab_size), eos_id, tokenizer.bos_token_id,
                                 sorted(tokenizer.special_token_ids), tokenizer.encode_fragment)
        self.lltok = ll.LLTokenizer(ll.TokenizerWrapper(vocabulary), n_vocab=vocab_size)
        self._grammars: dict[str, tuple[str, str]] = {}  # constraint -> (error or '', grammar)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persimmon-grammar")
        self._lock = threading.Lock()

    def _grammar(self, params: SamplingParams) -> str:
        """A constraint's compiled, validated grammar, cached (a large schema costs tens of ms)."""
        key = json.dumps([params.json_schema, params.regex, params.choice], sort_keys=True)
        with self._lock:
            found = self._grammars.get(key)
        if found is None:
            ll = _llguidance()
            grammar = grammar_of(params)
            error = ll.LLMatcher.validate_grammar(grammar, self.lltok)
            found = ("", grammar) if not error or error.startswith("WARNING") else (error, grammar)
            with self._lock:
                if len(self._grammars) > 256:
                    self._grammars.clear()
                self._grammars[key] = found
        error, grammar = found
        if error:
            raise ValueError(f"invalid grammar: {error}")
        return grammar

    def start(self, seq: Sequence) -> None:
        """Give a row its fresh matcher; ValueError naming what is wrong with the grammar."""
        m = _llguidance().LLMatcher(self.lltok, self._grammar(seq.params), log_level=0)
        if m.is_error():
            raise ValueError(f"invalid grammar: {error_text(m)}")
        seq.grammar = m

    def masks_async(self, seqs: list[Sequence]) -> Future | None:  # of the structured rows of seqs, in order
        matchers = [s.grammar for s in seqs if s.grammar is not None]
        return self._pool.submit(self._fill, matchers) if matchers else None

    def _fill(self, matchers: list) -> torch.Tensor:
        bitmask = torch.zeros((len(matchers), (self.vocab_size + 31) // 32), dtype=torch.int32)
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)  # drops the GIL
        return bitmask

    @staticmethod
    def apply(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor):
        """(logits [R, V] with the tokens the grammars disallow at -inf, the rows to end with an
        error). A row whose grammar allows nothing (an error state: a "stop" there would not
        match) samples unmasked and is ended."""
        rows = [r for r, s in enumerate(seqs) if s.grammar is not None]
        logits = logits.to(torch.float32, copy=True)  # the caller's raw logits stay raw (log-probabilities)
        index = torch.tensor(rows, device=logits.device)
        masked = apply_masks(logits[index], bitmask)
        dead = []
        for k, r in enumerate(rows):
            s = seqs[r]
            if bitmask[k].count_nonzero() == 0 or s.grammar.is_error():
                s.error_kind = "grammar_error"
                s.error = f"no text can continue the constraint here ({error_text(s.grammar)})"
                masked[k] = logits[r]
                dead.append(s)
        logits[index] = masked
        return logits, dead

    @staticmethod
    def advance(seqs: list[Sequence], dead: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Feed each structured row (but the `dead`) its newest token; returns the rows it ends:
        (row, "error") when it breaks the grammar, (row, "stop") when it completes it."""
        ended = []
        for s in seqs:
            m, token = s.grammar, s.output[-1]
            if m is None or s in dead or token in s.stop_ids and m.is_accepting():
                continue  # EOS after a complete structure: the scheduler stopped the row
            if not m.consume_token(token):
                s.error_kind, s.error = "grammar_error", error_text(m)
                ended.append((s, "error"))
            elif m.is_stopped():
                ended.append((s, "stop"))
        return ended


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with every token whose bit is 0 in bitmask [R, ceil(V/32)] set to -inf."""
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)
    return logits.masked_fill(bits[:, :logits.shape[-1]] == 0, float("-inf"))
