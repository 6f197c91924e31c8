"""What a JSON-schema constraint costs a generate run: tokens/s with and without it.

    python bench/structured_cost.py [--rows 32] [--new-tokens 96] [--vocab 8000] [--repeats 3]

Tokenizer: a sentencepiece Unigram model (byte fallback) with --vocab pieces, trained here on
text from the Python standard library's sources (deterministic), so the token-mask work sees a
realistic vocabulary (Persimmon's has 262144 pieces: masks cost more there).
Model: hidden 1024, 8 layers, 16 heads, random, fp32, vocab = the tokenizer's rounded up.
Workload: --rows prompts, --new-tokens each, sampled (temperature 1, seeded), eos ignored.
- free: no constraint;
- json: every row constrained to {"summary": string of >= 400 chars, "tags": [3 strings]};
  rows that finish early stop, so the ratio compares tokens/s, not wall time.
Runs alternate; tokens/s are medians; also the mean time to fill one step's masks (measured on
the helper thread, overlapping the forward) and the share of finished rows that validate.
"""

import argparse
import glob
import io
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kv_budget import cpu_flags  # noqa: E402

from model import Engine, PersimmonConfig, PersimmonForCausalLM, PersimmonTokenizer, SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "summary": {"type": "string", "minLength": 400},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 3, "maxItems": 3}},
    "required": ["summary", "tags"], "additionalProperties": False}


def train_tokenizer(out_dir: str, vocab: int) -> PersimmonTokenizer:
    import sentencepiece as spm

    lines = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:400]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            lines += [ln.rstrip("\n") for ln in f if ln.strip()][:400]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, model_type="unigram",
                                   vocab_size=vocab, byte_fallback=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                                   user_defined_symbols=["|ENDOFTEXT|"], normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, num_threads=os.cpu_count() or 1, minloglevel=2)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(writer.getvalue())
    return PersimmonTokenizer(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = train_tokenizer(tmp, args.vocab)
        train_s = time.perf_counter() - t0
    vocab = -(-tok.vocab_size // 64) * 64
    cfg = PersimmonConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=16, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    model = PersimmonForCausalLM(cfg).init_weights(torch.Generator().manual_seed(0)).eval()
    engine = Engine(model, tok, max_batch_size=64, max_seq_len=512)
    prompts = [f"Summarise item {i}: the quick brown fox number {i * 7} jumps." for i in range(args.rows)]
    free = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(args.rows)]
    structured = [SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=i, json_schema=SCHEMA)
                  for i in range(args.rows)]
    t0 = time.perf_counter()
    engine.generate(prompts[:1], structured[:1])  # warm-up: builds the llguidance tokenizer
    setup_s = time.perf_counter() - t0

    mask_times = []
    pool_fill = engine.grammars._fill

    def timed_fill(matchers):
        t = time.perf_counter()
        out = pool_fill(matchers)
        mask_times.append(time.perf_counter() - t)
        return out
    engine.grammars._fill = timed_fill

    runs = {"free": [], "json": []}
    valid = finished = 0
    for _ in range(args.repeats):
        for mode, params in (("free", free), ("json", structured)):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            dt = time.perf_counter() - t0
            runs[mode].append(sum(o.num_generated_tokens for o in outs) / dt)
            if mode == "json":
                for o in outs:
                    if o.finish_reason == "stop":
                        finished += 1
                        try:
                            doc = json.loads(o.text)
                            valid += isinstance(doc, dict) and len(doc["summary"]) >= 400 and len(doc["tags"]) == 3
                        except (ValueError, KeyError, TypeError):
                            pass
    result = {"bench": "structured_cost", "device": "cpu", "cpu": platform.processor() or platform.machine(),
              "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "vocab": vocab,
              "tokenizer_train_s": round(train_s, 1), "grammar_setup_s": round(setup_s, 2), "rows": args.rows,
              "new_tokens": args.new_tokens,
              "free_tokens_per_s": round(median(runs["free"]), 1), "json_tokens_per_s": round(median(runs["json"]), 1),
              "json_over_free": round(median(runs["json"]) / median(runs["free"]), 3),
              "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
              "mask_fill_ms_per_step": round(1000 * sum(mask_times) / max(1, len(mask_times)), 3),
              "finished_rows": finished, "finished_rows_valid": valid}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
