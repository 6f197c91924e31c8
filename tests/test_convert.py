"""persimmon-convert: a synthetic adept-inference checkpoint in, an HF-layout directory out that
both our loader and transformers read with the source model's exact weights."""

import argparse
import os
import random
import shutil

import numpy as np
import pytest
import torch
from tolerances import assert_forward_close
from conftest import random_model

from model import CheckpointError, PersimmonConfig, PersimmonForCausalLM, load_pretrained
from model.convert import convert_adept_checkpoint, main
from model.tiny_tokenizer import train_tiny_tokenizer
from model.tokenizer import ENDOFTEXT, PersimmonTokenizer

# not the PersimmonConfig defaults, so a converter that ignores args gives other logits
SOURCE = dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=3, intermediate_size=320,
              partial_rotary_factor=0.25, rope_theta=10000.0, layer_norm_eps=1e-6,
              max_position_embeddings=256)


def adept_args(config: PersimmonConfig, **overrides) -> argparse.Namespace:
    """The Megatron args fields persimmon-convert reads, plus some it must ignore."""
    fields = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                  ffn_hidden_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
                  rotary_pct=config.partial_rotary_factor, rotary_emb_base=config.rope_theta,
                  qk_layernorm=config.qk_layernorm, padded_vocab_size=config.vocab_size,
                  max_position_embeddings=config.max_position_embeddings, seq_length=128,
                  layernorm_epsilon=config.layer_norm_eps, bf16=True, params_dtype=torch.bfloat16,
                  tensor_model_parallel_size=1, pipeline_model_parallel_size=1, hidden_dropout=0.1,
                  data_path=["/data/a", "/data/b"], vocab_file="adept_vocab.model", lr=None)
    return argparse.Namespace(**{**fields, **overrides})


def adept_tree(state: dict) -> dict:
    """HF names -> the nested "model" dict of model_optim_rng.pt (convert's renames, inverted).
    Like Megatron, the encoder is one flat dict with dotted keys inside the nested ones."""
    encoder = {}
    tree = {"language_model": {"embedding": {"word_embeddings": {"weight": state["model.embed_tokens.weight"]}},
                               "encoder": encoder}}
    for name, tensor in state.items():
        if name.startswith("model.layers.") or name.startswith("model.final_layernorm."):
            encoder[name.removeprefix("model.").replace("self_attn", "self_attention")] = tensor.clone()
    for i in range(1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("layers."))):
        encoder[f"layers.{i}.self_attention.rotary_emb.inv_freq"] = torch.rand(8)  # dropped
    if "lm_head.weight" in state:  # tied models have no separate head in Megatron
        tree["word_embeddings_for_head"] = {"weight": state["lm_head.weight"].clone()}
    return tree


def save_adept(path, model, args=None, **extra):
    random.seed(0)
    np.random.seed(0)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    ckpt = {"model": adept_tree(state), "iteration": 1251, "checkpoint_version": 3.0,
            "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8)}],
            **extra}
    if args is not None:
        ckpt["args"] = args
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def source():
    return random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**SOURCE), seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, source):
    root = tmp_path_factory.mktemp("adept")
    vocab = root / "adept_vocab.model"
    shutil.copyfile(train_tiny_tokenizer(root / "tok"), vocab)
    ckpt = save_adept(root / "model_optim_rng.pt", source, adept_args(source.config))
    return str(ckpt), str(vocab)


def ids(seed=0):
    return torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_convert_gives_source_weights_and_logits(files, source, tmp_path):
    import transformers

    ckpt, vocab = files
    config = convert_adept_checkpoint(ckpt, vocab, tmp_path / "out", dtype="float32")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (128, 3, 320)
    assert (config.partial_rotary_factor, config.rope_theta, config.layer_norm_eps) == (0.25, 10000.0, 1e-6)
    assert config.max_position_embeddings == 256 and not config.tie_word_embeddings
    ours = load_pretrained(tmp_path / "out")
    for name, tensor in source.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    x = ids()
    assert torch.equal(logits(ours, x), logits(source, x))
    hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path / "out")
    assert_forward_close(logits(hf, x), logits(source, x), source.config)


def test_convert_writes_tokenizer_and_endoftext_ids(files, tmp_path):
    ckpt, vocab = files
    config = convert_adept_checkpoint(ckpt, vocab, tmp_path, dtype="float32")
    with open(vocab, "rb") as a, open(tmp_path / "tokenizer.model", "rb") as b:
        assert a.read() == b.read()
    tok = PersimmonTokenizer.from_pretrained(tmp_path)
    eot = tok.token_to_id(ENDOFTEXT)
    assert eot is not None and tok.bos_token_id == tok.eos_token_id == eot
    assert config.bos_token_id == config.eos_token_id == eot
    assert PersimmonConfig.from_pretrained(tmp_path).bos_token_id == eot
    assert tok.vocab_size <= config.vocab_size


def test_default_dtype_is_bfloat16(files, source, tmp_path):
    ckpt, vocab = files
    convert_adept_checkpoint(ckpt, vocab, tmp_path)
    assert PersimmonConfig.from_pretrained(tmp_path).torch_dtype == "bfloat16"
    loaded = load_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


def test_console_script_with_bos_eos_id(files, tmp_path, capsys):
    ckpt, vocab = files
    main(["--checkpoint", ckpt, "--tokenizer", vocab, "--output", str(tmp_path / "out"),
          "--dtype", "float32", "--bos-eos-id", "5", "--max-shard-size", "200KB"])
    assert "wrote" in capsys.readouterr().out
    config = PersimmonConfig.from_pretrained(tmp_path / "out")
    assert config.bos_token_id == config.eos_token_id == 5
    tok = PersimmonTokenizer.from_pretrained(tmp_path / "out")
    assert tok.bos_token_id == tok.eos_token_id == 5
    assert os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")  # sharded
    assert torch.equal(logits(load_pretrained(tmp_path / "out"), ids()),
                       logits(random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**SOURCE), seed=3), ids()))


def test_console_script_help_and_errors(files, tmp_path, capsys):
    ckpt, vocab = files
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "persimmon-convert" in out and "--bos-eos-id" in out and "--no-endoftext-special" in out
    # the tiny vocabulary has |ENDOFTEXT| but no sentencepiece BOS/EOS of its own
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", ckpt, "--tokenizer", vocab, "--output", str(tmp_path / "a"), "--no-endoftext-special"])
    assert exit_.value.code == 1 and "--bos-eos-id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the two choices are exclusive
        main(["--checkpoint", ckpt, "--tokenizer", vocab, "--output", str(tmp_path / "b"),
              "--bos-eos-id", "1", "--no-endoftext-special"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--tokenizer", vocab, "--output", str(tmp_path / "c")])
    assert exit_.value.code == 1 and "missing.pt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outside the vocabulary"):
        convert_adept_checkpoint(ckpt, vocab, tmp_path / "d", bos_eos_id=10**6)


CALLED = []


def run_code(marker):
    CALLED.append(marker)
    return marker


class Payload:
    def __reduce__(self):
        return run_code, ("pwned",)


def test_refuses_pickled_code(files, source, tmp_path):
    _, vocab = files
    ckpt = save_adept(tmp_path / "evil.pt", source, adept_args(source.config), extra=Payload())
    with pytest.raises(ValueError, match=r"test_convert\.run_code") as err:
        convert_adept_checkpoint(ckpt, vocab, tmp_path / "out")
    assert "not unpickled" in str(err.value)
    assert CALLED == [] and not os.path.exists(tmp_path / "out")


def test_tied_head_and_sizes_from_shapes_without_args(files, tmp_path):
    _, vocab = files
    config = PersimmonConfig.tiny(tie_word_embeddings=True, num_attention_heads=8)  # head_dim 8
    model = random_model(PersimmonForCausalLM, config, seed=1)
    ckpt = save_adept(tmp_path / "noargs.pt", model, args=None)
    written = convert_adept_checkpoint(ckpt, vocab, tmp_path / "out", dtype="float32")
    assert written.tie_word_embeddings and written.num_attention_heads == 8
    assert (written.hidden_size, written.num_hidden_layers, written.vocab_size) == (64, 2, 512)
    loaded = load_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_args_that_disagree_with_tensors_are_refused_before_writing(files, source, tmp_path):
    _, vocab = files
    bad = save_adept(tmp_path / "bad.pt", source, adept_args(source.config, ffn_hidden_size=512))
    with pytest.raises(CheckpointError, match=r"wrong shape 9: .*dense_h_to_4h\.bias: checkpoint \(320,\) vs config \(512,\)"):
        convert_adept_checkpoint(bad, vocab, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    split = save_adept(tmp_path / "tp.pt", source, adept_args(source.config, tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match="merge it to a single rank"):
        convert_adept_checkpoint(split, vocab, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_adept_checkpoint(files[0], vocab, tmp_path / "full")


def test_rng_state_pickled_under_numpy_1_names_loads(files, source, tmp_path):
    """Checkpoints from 2023 name numpy.core.multiarray (numpy 2 renamed it numpy._core)."""
    import zipfile

    _, vocab = files
    new = save_adept(tmp_path / "new.pt", source, adept_args(source.config))
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.", b"numpy.core.")
                assert b"numpy.core.multiarray\n_reconstruct" in data
            dst.writestr(info.filename, data)
    convert_adept_checkpoint(old, vocab, tmp_path / "out", dtype="float32")
    assert torch.equal(logits(load_pretrained(tmp_path / "out"), ids()), logits(source, ids()))


# The key names of adept-inference's model_optim_rng.pt, written out as they appear in the
# Adept release (nested "model" dict; the encoder's keys are dotted strings), each with the
# transformers parameter it must become. Independent of the converter's own rename rules.
ADEPT_TOP = [
    (("language_model", "embedding", "word_embeddings", "weight"), "model.embed_tokens.weight"),
    (("language_model", "encoder", "final_layernorm.weight"), "model.final_layernorm.weight"),
    (("language_model", "encoder", "final_layernorm.bias"), "model.final_layernorm.bias"),
    (("word_embeddings_for_head", "weight"), "lm_head.weight"),
]
ADEPT_LAYER = [  # language_model.encoder."layers.{i}.<name>" -> model.layers.{i}.<hf name>
    ("input_layernorm.weight", "input_layernorm.weight"), ("input_layernorm.bias", "input_layernorm.bias"),
    ("self_attention.query_key_value.weight", "self_attn.query_key_value.weight"),
    ("self_attention.query_key_value.bias", "self_attn.query_key_value.bias"),
    ("self_attention.q_layernorm.weight", "self_attn.q_layernorm.weight"),
    ("self_attention.q_layernorm.bias", "self_attn.q_layernorm.bias"),
    ("self_attention.k_layernorm.weight", "self_attn.k_layernorm.weight"),
    ("self_attention.k_layernorm.bias", "self_attn.k_layernorm.bias"),
    ("self_attention.dense.weight", "self_attn.dense.weight"), ("self_attention.dense.bias", "self_attn.dense.bias"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("post_attention_layernorm.bias", "post_attention_layernorm.bias"),
    ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.weight"), ("mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.bias"),
    ("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.weight"), ("mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.bias"),
]


def test_real_adept_key_names_map_to_transformers_names(source, files, tmp_path):
    """A checkpoint built from the literal Adept key names above (random tensors of the right
    shapes) converts so that each tensor lands at the transformers name the table gives."""
    _, vocab = files
    shapes = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    g = torch.Generator().manual_seed(11)
    tree, expected = {}, {}
    entries = list(ADEPT_TOP) + [(("language_model", "encoder", f"layers.{i}.{adept}"), f"model.layers.{i}.{hf}")
                                 for i in range(source.config.num_hidden_layers) for adept, hf in ADEPT_LAYER]
    for path, hf_name in entries:
        tensor = torch.randn(shapes[hf_name], generator=g)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = tensor
        expected[hf_name] = tensor
    assert set(expected) == set(shapes)  # the table covers every parameter of the model
    ckpt = tmp_path / "model_optim_rng.pt"
    torch.save({"model": tree, "iteration": 1, "args": adept_args(source.config)}, ckpt)
    convert_adept_checkpoint(str(ckpt), vocab, tmp_path / "out", dtype="float32")
    state = load_pretrained(tmp_path / "out").state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
