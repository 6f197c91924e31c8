"""A tiny random Persimmon checkpoint with a tiny trained tokenizer: no network, deterministic.

Tests, benchmarks and the demo use it in place of the 8B download. The directory has the same
layout as a converted or hub checkpoint (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, special_tokens_map.json), so everything that loads one loads the other.

    python -m model.tiny /tmp/tiny                                  # causal LM
    python -m model.tiny /tmp/tiny-cls --task sequence_classification --labels neg,pos
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from .checkpoint import resolve_dtype, save_pretrained
from .config import PersimmonConfig
from .modeling import PersimmonForCausalLM, PersimmonForSequenceClassification, PersimmonForTokenClassification
from .tiny_tokenizer import train_tiny_tokenizer
from .tokenizer import ENDOFTEXT, PersimmonTokenizer

TASKS = {
    "causal": PersimmonForCausalLM,
    "sequence_classification": PersimmonForSequenceClassification,
    "token_classification": PersimmonForTokenClassification,
}


def build_tiny_checkpoint(out_dir, task="causal", seed=0, num_labels=2, id2label=None, dtype="float32",
                          config_overrides=None) -> str:
    """Write a tiny random checkpoint for `task` into `out_dir` and return the directory.

    The config is `PersimmonConfig.tiny()` with the tokenizer's vocab and BOS = EOS = pad =
    `|ENDOFTEXT|`, updated by `config_overrides`; weights are transformers' init drawn with
    `seed` (same arguments, byte-identical files). Classification tasks take `num_labels`, or
    `id2label` ({0: "neg", 1: "pos"}) which sets both.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    out_dir = os.fspath(out_dir)
    with tempfile.TemporaryDirectory() as tmp:  # train, then write the canonical tokenizer files
        tokenizer = PersimmonTokenizer.from_pretrained(os.path.dirname(train_tiny_tokenizer(tmp)))
        tokenizer.save_pretrained(out_dir)
    eot = tokenizer.token_to_id(ENDOFTEXT)
    # the output layer matches the tokenizer, so every id the model emits decodes to a piece
    fields = dict(vocab_size=tokenizer.vocab_size, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                  architectures=[TASKS[task].__name__])
    if task != "causal":
        fields.update(num_labels=num_labels, id2label=id2label)
    config = PersimmonConfig.tiny(**{**fields, **(config_overrides or {})})
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"config vocab_size {config.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces")

    with torch.device("meta"):  # no default init: leaves the global RNG alone
        model = TASKS[task](config)
    model = model.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(seed))
    save_pretrained(model.to(resolve_dtype(dtype)).eval(), out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.tiny", description=build_tiny_checkpoint.__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--task", default="causal", choices=sorted(TASKS), help="model head (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    parser.add_argument("--num-labels", type=int, default=2, help="classification labels (default: %(default)s)")
    parser.add_argument("--labels", default=None, help="comma-separated label names, e.g. neg,pos (sets --num-labels)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: %(default)s)")
    a = parser.parse_args(argv)
    id2label = dict(enumerate(a.labels.split(","))) if a.labels else None
    path = build_tiny_checkpoint(a.out_dir, task=a.task, seed=a.seed, num_labels=a.num_labels,
                                 id2label=id2label, dtype=a.dtype)
    config = PersimmonConfig.from_pretrained(path)
    print(f"wrote {path}: {config.architectures[0]}, vocab {config.vocab_size}, "
          f"bos/eos/pad {config.bos_token_id}, {config.torch_dtype}")


if __name__ == "__main__":
    main()
