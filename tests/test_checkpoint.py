"""Checkpoint I/O: every on-disk layout we read, both config.json styles, errors, and
cross-loading with transformers in both directions."""

import json
import os

import pytest
import torch
from tolerances import assert_forward_close
from conftest import random_model

from model import (
    CheckpointError,
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonModel,
    load_pretrained,
    save_pretrained,
)
from model.checkpoint import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, save_state_dict


# adept/persimmon-8b-base config.json as released (transformers 4.34 style, unused keys included)
HUB_CONFIG = {
    "architectures": ["PersimmonForCausalLM"], "bos_token_id": 71013, "eos_token_id": 71013,
    "hidden_act": "relu2", "hidden_dropout": 0.6, "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 16384, "layer_norm_eps": 1e-05, "max_position_embeddings": 16384,
    "model_type": "persimmon", "num_attention_heads": 64, "num_hidden_layers": 36,
    "num_key_value_heads": 64, "pretraining_tp": 1, "qk_layernorm": True, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 25000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True,
    "vocab_size": 262144,
}


def ids(batch=2, length=12, seed=0):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def write_config(path, raw):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def save_bin(model, path, num_shards=1):
    """HF pickle layout (transformers 5 no longer writes it): pytorch_model.bin or shards + index."""
    model.config.save_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if num_shards == 1:
        torch.save(state, os.path.join(path, BIN_SINGLE))
        return
    names, weight_map = list(state), {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard = {n: state[n] for n in names[i::num_shards]}
        torch.save(shard, os.path.join(path, file))
        weight_map.update(dict.fromkeys(shard, file))
    with open(os.path.join(path, BIN_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture
def causal():
    return random_model(PersimmonForCausalLM, PersimmonConfig.tiny())


# ---- layouts --------------------------------------------------------------------------------
def test_single_safetensors_round_trip(causal, tmp_path):
    save_pretrained(causal, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", SAFE_SINGLE]
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is PersimmonForCausalLM and not loaded.training
    assert_same_weights(causal, loaded)
    assert torch.equal(logits(causal, ids()), logits(loaded, ids()))


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_weight_files_get_the_same_mode_as_config(causal, tmp_path):
    save_pretrained(causal, tmp_path, max_shard_size="100KB")
    mode = os.stat(tmp_path / "config.json").st_mode & 0o777
    for name in os.listdir(tmp_path):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_sharded_safetensors_round_trip(causal, tmp_path):
    save_pretrained(causal, tmp_path, max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 2 and SAFE_SINGLE not in shards
    with open(tmp_path / SAFE_INDEX) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(causal.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    assert_same_weights(causal, load_pretrained(tmp_path))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_pytorch_bin_round_trip(causal, tmp_path, num_shards):
    save_bin(causal, tmp_path, num_shards)
    assert os.path.isfile(tmp_path / (BIN_SINGLE if num_shards == 1 else BIN_INDEX))
    loaded = load_pretrained(tmp_path)
    assert_same_weights(causal, loaded)
    assert torch.equal(logits(causal, ids()), logits(loaded, ids()))


def test_bfloat16_target_dtype(causal, tmp_path):
    save_pretrained(causal, tmp_path)  # fp32 on disk
    loaded = load_pretrained(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, causal.lm_head.weight.to(torch.bfloat16))
    # a bf16 checkpoint loads as bf16 by default (config torch_dtype)
    save_pretrained(loaded, tmp_path / "bf16")
    assert PersimmonConfig.from_pretrained(tmp_path / "bf16").torch_dtype == "bfloat16"
    again = load_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert_same_weights(loaded, again)


@pytest.mark.parametrize("tied", [False, True])
def test_meta_device_load_leaves_no_meta_tensors(tmp_path, tied):
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(tie_word_embeddings=tied))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    assert {t.device.type for t in tensors} == {"cpu"}
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_tied_embeddings_round_trip(tmp_path):
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / SAFE_SINGLE), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(model, ids()), logits(loaded, ids()))


def test_bare_backbone_from_causal_checkpoint(causal, tmp_path):
    save_pretrained(causal, tmp_path)
    bare = load_pretrained(tmp_path, model_class=PersimmonModel)
    assert type(bare) is PersimmonModel
    assert torch.equal(bare.embed_tokens.weight, causal.model.embed_tokens.weight)


# ---- config.json styles ---------------------------------------------------------------------
def test_config_4x_style_fields(tmp_path):
    raw = {"model_type": "persimmon", "hidden_size": 128, "num_attention_heads": 4,
           "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-6}
    write_config(tmp_path, raw)
    config = PersimmonConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 10000.0 and config.partial_rotary_factor == 0.25
    assert config.rotary_dim == 8 and config.head_dim == 32
    assert config.rope_type == "linear" and config.rope_factor == 2.0
    assert config.extra == {"rms_norm_eps": 1e-6}
    assert config.to_dict()["rms_norm_eps"] == 1e-6  # unused keys survive a round trip


def test_config_5x_style_rope_parameters(tmp_path):
    raw = {"model_type": "persimmon", "hidden_size": 128, "num_attention_heads": 4,
           "dtype": "bfloat16",
           "rope_parameters": {"rope_type": "dynamic", "rope_theta": 12345.0, "factor": 3.0,
                               "partial_rotary_factor": 0.75}}
    write_config(tmp_path, raw)
    config = PersimmonConfig.from_pretrained(tmp_path)
    assert config.rope_theta == 12345.0 and config.partial_rotary_factor == 0.75
    assert config.rope_type == "dynamic" and config.rope_factor == 3.0
    assert config.rotary_dim == 24 and config.torch_dtype == "bfloat16"
    default = PersimmonConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    assert default.rope_scaling is None and default.rope_theta == 500.0
    assert default.partial_rotary_factor == 0.5  # Persimmon's default when the key is absent


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0}],
                         ids=["linear", "dynamic"])
def test_scaled_rope_config_cross_loads_with_transformers(tmp_path, scaling):
    import transformers

    config = PersimmonConfig.tiny(rope_scaling=scaling, max_position_embeddings=16)
    model = random_model(PersimmonForCausalLM, config)
    save_pretrained(model, tmp_path / "ours")
    hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path / "ours")
    x = ids(2, 40)  # past max_position_embeddings: dynamic NTK rescales
    assert_forward_close(logits(model, x), logits(hf, x), model.config)
    hf.save_pretrained(tmp_path / "hf")  # 5.x-style config with rope_parameters
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.rope_type == config.rope_type and ours.config.rope_factor == config.rope_factor
    assert ours.config.rope_theta == config.rope_theta
    assert torch.equal(logits(model, x), logits(ours, x))


def test_released_config_parses():
    config = PersimmonConfig.from_dict(HUB_CONFIG)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (4096, 36, 64)
    assert config.head_dim == 64 and config.rotary_dim == 32 and config.rope_theta == 25000.0
    assert config.bos_token_id == config.eos_token_id == 71013 and config.pad_token_id is None
    assert config.rope_scaling is None and config.torch_dtype == "bfloat16"
    assert config.hidden_dropout == 0.6 and not config.tie_word_embeddings
    assert {"rms_norm_eps", "num_key_value_heads", "pretraining_tp"} <= set(config.extra)


def test_released_config_scaled_down_loads_in_eval_mode(tmp_path):
    raw = dict(HUB_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=1, torch_dtype="float32")
    config = PersimmonConfig.from_dict(raw)
    model = random_model(PersimmonForCausalLM, config)
    write_config(tmp_path, raw)
    save_state_dict(model.state_dict(), tmp_path)
    loaded = load_pretrained(tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = ids()
    first, second = logits(loaded, x), logits(loaded, x)
    assert torch.equal(first, second)  # hidden_dropout 0.6 is not applied
    assert torch.equal(first, logits(model, x))
    import transformers
    hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path)
    assert_forward_close(first, logits(hf, x), loaded.config)


# ---- errors ---------------------------------------------------------------------------------
def test_mismatched_checkpoint_lists_every_offending_tensor(causal, tmp_path):
    state = dict(causal.state_dict())
    del state["model.layers.1.mlp.dense_4h_to_h.bias"]
    state["model.layers.7.extra.weight"] = torch.zeros(3)
    state["model.final_layernorm.weight"] = torch.ones(65)
    causal.config.save_pretrained(tmp_path)
    save_state_dict(state, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing 1" in msg and "model.layers.1.mlp.dense_4h_to_h.bias" in msg
    assert "unexpected 1" in msg and "model.layers.7.extra.weight" in msg
    assert "wrong shape 1" in msg and "model.final_layernorm.weight: checkpoint (65,) vs model (64,)" in msg


def test_missing_directory_config_or_weights(causal, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    causal.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    save_state_dict(causal.state_dict(), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)


def test_index_naming_a_missing_shard(causal, tmp_path):
    save_pretrained(causal, tmp_path, max_shard_size="100KB")
    os.remove(tmp_path / "model-00002-of-{:05d}.safetensors".format(
        len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")])))
    with pytest.raises(FileNotFoundError, match="lists missing weight files"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("overrides,field", [
    ({"hidden_size": 66}, "hidden_size"),  # not divisible by 4 heads
    ({"partial_rotary_factor": 0.5625, "hidden_size": 64}, "partial_rotary_factor"),  # 16*0.5625 = 9, odd
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 1.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "rope_scaling"),
    ({"bos_token_id": 512}, "bos_token_id"),
])
def test_invalid_config_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=rf"PersimmonConfig\.{field}"):
        PersimmonConfig.tiny(**overrides)
    write_config(tmp_path, {**PersimmonConfig.tiny().to_dict(), **overrides})
    with pytest.raises(ValueError, match=rf"PersimmonConfig\.{field}"):
        load_pretrained(tmp_path)


# ---- cross-loading with transformers --------------------------------------------------------
def test_ours_to_transformers_causal(causal, tmp_path):
    import transformers

    save_pretrained(causal, tmp_path)
    hf = transformers.PersimmonForCausalLM.from_pretrained(tmp_path)
    assert not hf.training
    for name, tensor in causal.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    x = ids()
    assert_forward_close(logits(causal, x), logits(hf, x), causal.config)


def test_ours_to_transformers_sequence_classification(tmp_path):
    import transformers

    config = PersimmonConfig.tiny(pad_token_id=0, id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = random_model(PersimmonForSequenceClassification, config)
    save_pretrained(model, tmp_path)
    hf = transformers.PersimmonForSequenceClassification.from_pretrained(tmp_path)
    assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"} and hf.config.pad_token_id == 0
    x = ids(3, 9)
    x[1, 6:] = 0  # right padding
    assert_forward_close(logits(model, x), logits(hf, x), model.config)
    # and back: the architecture recorded in config.json picks our class
    ours = load_pretrained(tmp_path)
    assert type(ours) is PersimmonForSequenceClassification and ours.config.num_labels == 3
    assert torch.equal(logits(model, x), logits(ours, x))


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_to_ours_causal(tmp_path, tied):
    import transformers

    from conftest import hf_config

    torch.manual_seed(0)
    hf = transformers.PersimmonForCausalLM(hf_config(PersimmonConfig.tiny(tie_word_embeddings=tied))).eval()
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.tie_word_embeddings is tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    for name, tensor in ours.state_dict().items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    x = ids()
    assert_forward_close(logits(ours, x), logits(hf, x), ours.config)


def test_save_pretrained_records_architecture_and_dtype(tmp_path):
    model = random_model(PersimmonForSequenceClassification, PersimmonConfig.tiny(pad_token_id=0))
    save_pretrained(model.to(torch.bfloat16), tmp_path)
    config = PersimmonConfig.from_pretrained(tmp_path)
    assert config.architectures == ["PersimmonForSequenceClassification"]
    assert config.torch_dtype == "bfloat16"


def test_headers_and_indexes_the_loader_could_not_use_are_refused(tmp_path):
    from model.checkpoint import pick_weight_files, safetensors_header

    with pytest.raises(ValueError, match="names no weight files"):
        pick_weight_files({"model.safetensors.index.json"}, lambda name: b'{"weight_map": {}}')

    def header(entries: dict) -> tuple[int, callable]:
        raw = json.dumps(entries).encode()
        blob = len(raw).to_bytes(8, "little") + raw + bytes(64)
        return len(blob), lambda n, at: blob[at:at + n]

    size, read = header({"w": {"dtype": "F32", "shape": [2.0, 2.0], "data_offsets": [0, 16]}})
    with pytest.raises(ValueError, match="not non-negative integers"):
        safetensors_header(size, read)
    size, read = header({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    assert safetensors_header(size, read)[1] == {"w": ("F32", (2, 2), 0, 16)}
