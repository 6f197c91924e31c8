"""build_tiny_checkpoint: the no-network checkpoint used by tests, benchmarks and the demo."""

import os

import pytest
import torch
from hf_compat import batch_encode
from tolerances import assert_forward_close

from model import PersimmonConfig, PersimmonForCausalLM, PersimmonForSequenceClassification, load_pretrained
from model.tiny import build_tiny_checkpoint, main
from model.tokenizer import ENDOFTEXT, PersimmonTokenizer


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "causal")


def test_deterministic_per_seed(causal_dir, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again")
    for name in sorted(os.listdir(causal_dir)):
        assert read(os.path.join(causal_dir, name)) == read(os.path.join(again, name)), name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert read(os.path.join(other, "model.safetensors")) != read(os.path.join(again, "model.safetensors"))


def test_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_loads_with_tokenizer_and_generates_logits(causal_dir):
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(causal_dir))
    model = load_pretrained(causal_dir)
    tok = PersimmonTokenizer.from_pretrained(causal_dir)
    config = model.config
    assert type(model) is PersimmonForCausalLM and not model.training
    assert config == PersimmonConfig.tiny(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, architectures=["PersimmonForCausalLM"],
                                          torch_dtype="float32")
    eot = tok.token_to_id(ENDOFTEXT)
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == eot
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == eot
    assert tok.vocab_size == config.vocab_size  # every id the model emits decodes to a piece
    ids = torch.tensor([tok.encode("The cat reads a long letter.")])
    assert ids[0, 0] == eot and ids.max() < tok.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size) and logits.isfinite().all()
    assert logits.std() > 0  # random weights, not a constant init


def test_sequence_classification_variant(tmp_path):
    path = build_tiny_checkpoint(tmp_path, task="sequence_classification", id2label={0: "neg", 1: "pos", 2: "mixed"})
    model = load_pretrained(path)
    assert type(model) is PersimmonForSequenceClassification
    assert model.config.num_labels == 3 and model.config.label2id == {"neg": 0, "pos": 1, "mixed": 2}
    tok = PersimmonTokenizer.from_pretrained(path)
    batch = batch_encode(tok, ["good", "a much longer and worse sentence"])
    ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["attention_mask"])
    assert (mask == 0).any()  # left padding with the |ENDOFTEXT| pad id
    import transformers
    hf = transformers.PersimmonForSequenceClassification.from_pretrained(path)
    assert hf.config.id2label[2] == "mixed" and hf.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        out, ref = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    assert out.shape == (2, 3)
    assert_forward_close(out, ref, model.config)


def test_options_dtype_overrides_and_cli(tmp_path, capsys):
    path = build_tiny_checkpoint(tmp_path / "bf16", dtype="bfloat16", seed=2,
                                 config_overrides={"num_hidden_layers": 3, "tie_word_embeddings": True})
    model = load_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.model.layers) == 3 and model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_checkpoint(tmp_path / "small", config_overrides={"vocab_size": 100})
    with pytest.raises(ValueError, match="unknown task"):
        build_tiny_checkpoint(tmp_path / "x", task="vision")
    main([str(tmp_path / "cli"), "--task", "sequence_classification", "--labels", "a,b,c,d"])
    assert "PersimmonForSequenceClassification" in capsys.readouterr().out
    assert load_pretrained(tmp_path / "cli").config.num_labels == 4
