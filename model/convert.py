"""Convert an original adept-inference checkpoint to the HF layout this package loads.

Input: `iter_XXXXXXX/mp_rank_00/model_optim_rng.pt` (a dict with "model", a nested dict of
tensors, and "args", an argparse.Namespace) and the sentencepiece vocabulary `adept_vocab.model`.
Output: config.json + safetensors + tokenizer files that `model.load_pretrained` and transformers'
`PersimmonForCausalLM.from_pretrained` load. The pickle is read with `torch.load(weights_only=True)`,
allow-listing only argparse.Namespace and numpy's array/scalar types (the args and the RNG
state): no code from the file runs. Names map as in transformers' convert_persimmon_weights_to_hf.py;
the fused QKV layout is the same on both sides.

    persimmon-convert --checkpoint model_optim_rng.pt --tokenizer adept_vocab.model --output DIR
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile

import sentencepiece as spm
import torch

from .checkpoint import CheckpointError, load_pretrained, meta_model, mismatch_report, resolve_dtype, save_state_dict
from .config import PersimmonConfig
from .modeling import PersimmonForCausalLM
from .tokenizer import ENDOFTEXT, PersimmonTokenizer

# Adept (Megatron) name fragment -> transformers name fragment, applied in this order
RENAMES = (
    ("language_model.embedding.word_embeddings", "model.embed_tokens"),
    ("language_model.encoder", "model"),
    ("word_embeddings_for_head", "lm_head"),
    ("self_attention", "self_attn"),
)
DROPPED = ("rotary_emb.inv_freq", "_extra_state")  # recomputed from the config / not weights


def safe_globals() -> list:
    """What `torch.load(weights_only=True)` may build besides tensors: the Megatron args Namespace
    and numpy arrays/scalars (its `np_rng_state`), under numpy 1.x's `numpy.core.*` and numpy 2's
    `numpy._core.*` names. Data only; no callable that runs code."""
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    dtypes = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])]
    return [argparse.Namespace, np.ndarray, np.dtype, *dtypes, multiarray._reconstruct, multiarray.scalar,
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray.scalar, "numpy.core.multiarray.scalar")]


def load_adept_checkpoint(path) -> tuple[dict, argparse.Namespace | None]:
    """Read model_optim_rng.pt without running code from it: (nested "model" dict, "args")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    allowed = safe_globals()
    zipped = zipfile.is_zipfile(path)  # mmap needs the zip format (torch >= 1.6)
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in allowed}
        try:
            found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in names]
        except Exception:
            found = []
        raise ValueError(
            f"{path} holds Python objects other than tensors, argparse.Namespace and numpy arrays"
            f"{': ' + ', '.join(found) if found else ''}. They are not unpickled because that could "
            f"run code from the file; re-save the checkpoint with plain types only. "
            f"(torch: {str(e).strip().splitlines()[-1][:300]})"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an adept-inference checkpoint: no 'model' dict (found {keys})")
    return ckpt["model"], ckpt.get("args")


def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """{"a": {"b": t}} -> {"a.b": t} (keys may already contain dots), DROPPED names left out."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif name.endswith(DROPPED):
            continue
        elif torch.is_tensor(value):
            out[name] = value
        else:
            raise ValueError(f"model.{name} is a {type(value).__name__}, expected a tensor")
    return out


def rename(name: str) -> str:
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def config_from_args(args, state: dict[str, torch.Tensor], **extra) -> PersimmonConfig:
    """PersimmonConfig from the Megatron args, sizes the args lack taken from tensor shapes."""
    a = {k: v for k, v in vars(args).items() if v is not None} if args is not None else {}
    if a.get("tensor_model_parallel_size", 1) > 1 or a.get("pipeline_model_parallel_size", 1) > 1:
        raise ValueError("the checkpoint is split for model parallelism (tensor/pipeline size "
                         f"{a.get('tensor_model_parallel_size')}/{a.get('pipeline_model_parallel_size')}); "
                         "merge it to a single rank first")
    if "model.embed_tokens.weight" not in state:
        raise CheckpointError(f"no language_model.embedding.word_embeddings.weight; found {sorted(state)[:10]}")
    vocab, hidden = state["model.embed_tokens.weight"].shape
    qk_layernorm = "model.layers.0.self_attn.q_layernorm.weight" in state
    heads = a.get("num_attention_heads")
    if heads is None:
        if not qk_layernorm:
            raise ValueError("args lack num_attention_heads and the checkpoint has no q_layernorm "
                             "to infer head_dim from")
        heads = hidden // state["model.layers.0.self_attn.q_layernorm.weight"].shape[0]
    return PersimmonConfig(
        vocab_size=a.get("padded_vocab_size", vocab),
        hidden_size=a.get("hidden_size", hidden),
        intermediate_size=a.get("ffn_hidden_size", state["model.layers.0.mlp.dense_h_to_4h.weight"].shape[0]),
        num_hidden_layers=a.get("num_layers", len({k.split(".")[2] for k in state if k.startswith("model.layers.")})),
        num_attention_heads=heads,
        max_position_embeddings=a.get("max_position_embeddings", a.get("seq_length", 16384)),
        layer_norm_eps=a.get("layernorm_epsilon", 1e-5),
        rope_theta=float(a.get("rotary_emb_base", 25000.0)),
        partial_rotary_factor=a.get("rotary_pct", 0.5),
        qk_layernorm=a.get("qk_layernorm", qk_layernorm),
        tie_word_embeddings="lm_head.weight" not in state,
        architectures=["PersimmonForCausalLM"],
        **extra,
    )


def check_shapes(state: dict[str, torch.Tensor], config: PersimmonConfig) -> None:
    """Every tensor the model needs, nothing else, each of the right shape, before writing."""
    _, params, _ = meta_model(PersimmonForCausalLM, config)
    expected, got = ({k: tuple(v.shape) for k, v in d.items()} for d in (params, state))
    wrong = [f"{k}: checkpoint {got[k]} vs config {expected[k]}"
             for k in sorted(got.keys() & expected.keys()) if got[k] != expected[k]]
    report = mismatch_report([("missing", sorted(expected.keys() - got.keys())),
                              ("unexpected", sorted(got.keys() - expected.keys())), ("wrong shape", wrong)], limit=20)
    if report:
        raise CheckpointError("checkpoint does not match the config built from its args: " + report)


def make_tokenizer(path, bos_eos_id: int | None, endoftext_special: bool) -> PersimmonTokenizer:
    """The tokenizer with BOS = EOS = `bos_eos_id` if given, else `|ENDOFTEXT|` when
    `endoftext_special` and the vocabulary has it (released checkpoints: 71013), else
    sentencepiece's own. Special tokens are written by name, so config and tokenizer agree."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {os.fspath(path)!r} does not exist")
    sp = spm.SentencePieceProcessor(model_file=os.fspath(path))
    if bos_eos_id is not None:
        if not 0 <= bos_eos_id < sp.get_piece_size():
            raise ValueError(f"bos_eos_id {bos_eos_id} is outside the vocabulary [0, {sp.get_piece_size()})")
        bos = eos = bos_eos_id
    elif endoftext_special and sp.id_to_piece(sp.piece_to_id(ENDOFTEXT)) == ENDOFTEXT:
        bos = eos = sp.piece_to_id(ENDOFTEXT)
    else:
        bos, eos = sp.bos_id(), sp.eos_id()
        if bos < 0 or eos < 0:
            raise ValueError(f"no BOS/EOS: {ENDOFTEXT} is absent or not used, and the sentencepiece "
                             "model defines none of its own; pass bos_eos_id (--bos-eos-id)")
    return PersimmonTokenizer(path, bos_token=sp.id_to_piece(bos), eos_token=sp.id_to_piece(eos))


def convert_adept_checkpoint(checkpoint, tokenizer, output, dtype="bfloat16", bos_eos_id=None,
                             endoftext_special=True, max_shard_size="5GB", verify=True) -> PersimmonConfig:
    """Write `output` (config.json, safetensors, tokenizer files) from an adept checkpoint, BOS and
    EOS as `make_tokenizer` picks them; `verify` loads it back strictly. Returns the config."""
    output = os.fspath(output)
    if os.path.isdir(output) and os.listdir(output):
        raise FileExistsError(f"output directory {output!r} is not empty; choose a new one")
    dtype = resolve_dtype(dtype)
    tok = make_tokenizer(tokenizer, bos_eos_id, endoftext_special)
    tree, args = load_adept_checkpoint(checkpoint)
    state = {rename(name): tensor for name, tensor in flatten(tree).items()}
    config = config_from_args(args, state, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              torch_dtype=str(dtype).removeprefix("torch."))
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model only {config.vocab_size} embeddings")
    check_shapes(state, config)

    config.save_pretrained(output)
    save_state_dict({k: v.to(dtype) for k, v in state.items()}, output, max_shard_size=max_shard_size)
    tok.save_pretrained(output)
    if verify:
        load_pretrained(output, dtype=dtype)  # strict: raises CheckpointError on any mismatch
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="persimmon-convert",
        description="Convert an adept-inference Persimmon checkpoint (model_optim_rng.pt + adept_vocab.model) "
                    "into an HF-layout directory. The pickle is read with weights_only=True: besides tensors "
                    "only argparse.Namespace and numpy arrays are allowed, so no code from the file runs.",
        epilog="example: persimmon-convert --checkpoint iter_0001251/mp_rank_00/model_optim_rng.pt "
               "--tokenizer adept_vocab.model --output persimmon-8b-base")
    parser.add_argument("--checkpoint", required=True, metavar="PT", help="path of model_optim_rng.pt")
    parser.add_argument("--tokenizer", required=True, metavar="MODEL", help="path of the sentencepiece model (adept_vocab.model)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write; must be new or empty")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the written weights (default: %(default)s, as released)")
    special = parser.add_mutually_exclusive_group()
    special.add_argument("--bos-eos-id", type=int, default=None, metavar="ID",
                         help="use this token id as both BOS and EOS (released checkpoints: 71013)")
    special.add_argument("--endoftext-special", action=argparse.BooleanOptionalAction, default=True,
                         help=f"BOS = EOS = the {ENDOFTEXT} piece of the vocabulary when it has one "
                              "(default); --no-endoftext-special uses sentencepiece's own BOS/EOS")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="safetensors shard size (default: %(default)s)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading the result back (saves time and memory)")
    a = parser.parse_args(argv)
    try:
        config = convert_adept_checkpoint(a.checkpoint, a.tokenizer, a.output, dtype=a.dtype,
                                          bos_eos_id=a.bos_eos_id, endoftext_special=a.endoftext_special,
                                          max_shard_size=a.max_shard_size, verify=a.verify)
    except (OSError, ValueError) as e:
        parser.exit(1, f"persimmon-convert: error: {e}\n")
    print(f"wrote {a.output}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads, vocab {config.vocab_size}, bos {config.bos_token_id}, "
          f"eos {config.eos_token_id}, {config.torch_dtype}" + (", verified" if a.verify else ""))


if __name__ == "__main__":
    main()
