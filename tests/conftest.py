"""Shared fixtures: tiny configs, random models, and the transformers reference oracle."""

import os

import pytest
import torch

from model import PersimmonConfig

@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray for the test module that asks for it (pipeline_fixtures.local_ray)."""
    from pipeline_fixtures import local_ray

    with local_ray():
        yield


# Keep CPU thread use predictable on small CI boxes.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def random_model(cls, config: PersimmonConfig, seed: int = 0):
    """Our model with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    model = cls(config).init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # give LayerNorms and biases non-trivial values so they are tested
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hf_config(config: PersimmonConfig):
    import transformers

    return transformers.PersimmonConfig(**config.to_dict())


def hf_twin(model, attn_implementation="sdpa"):
    """transformers' Persimmon of the same class holding exactly our weights (strict load)."""
    import transformers

    hf_cls = getattr(transformers, type(model).__name__)
    cfg = hf_config(model.config)
    cfg._attn_implementation = attn_implementation
    hf = hf_cls(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    # transformers keeps no persistent buffers we lack; nothing may be left over either way
    assert not unexpected, unexpected
    assert not [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")], missing
    return hf.eval()


@pytest.fixture
def tiny_config():
    return PersimmonConfig.tiny()


# ---- the lively tiny causal model and its transformers twin (engine, logprobs, score tests) ------
# a larger init spread makes random models emit varied tokens instead of one repeated id
LIVELY = dict(initializer_range=0.3)


def prompts_of(lengths, seed=0, vocab=512):
    """Random prompts of token ids (ids 0-2 are special) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def lm():
    from model import PersimmonForCausalLM

    return random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))


@pytest.fixture(scope="module")
def hf_lm(lm):
    return hf_twin(lm)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny sentencepiece tokenizer (byte fallback), trained once per module."""
    from model import PersimmonTokenizer
    from model.tiny_tokenizer import train_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(d)
    return PersimmonTokenizer.from_pretrained(d)


# ---- leaving the test process ------------------------------------------------------------------
# Once every result is reported, the process exits with pytest's status without running the
# interpreter's finalization. After a full run (dozens of local Ray sessions, torch's thread
# pools, the C attention kernel, llguidance) that finalization crashed once with SIGSEGV (exit
# 139 after "578 passed"), in some extension's destructor, after pytest had already reported:
# a crash there says nothing about any test, and must not turn a passing suite into a failing one.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and not hasattr(config, "workerinput"):  # the main process, after its summary
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
