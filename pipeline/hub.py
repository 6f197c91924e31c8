"""Models named by their Hugging Face hub id (README: Models from the Hugging Face hub).

The driver resolves the id to a commit once (`pin`, `model_commit`): every replica loads the
snapshot the driver checked and fingerprinted, even if the branch moves. Each node fetches into
its own HF cache under a file lock, only what the engine reads; huggingface_hub is optional.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass

from .errors import ModelError, one_line

PREFIX = "hf://"
# what the engine and the driver's checks read (model/checkpoint.py, model/tokenizer.py)
CONFIG_AND_TOKENIZER = ["config.json", "tokenizer.model", "adept_vocab.model", "tokenizer_config.json",
                        "special_tokens_map.json"]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
PICKLES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOP_LEVEL_ONLY = ["*/*"]  # ignore subfolders (original/, onnx/): the engine reads the top level only
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"   # the hub's rule: no leading / trailing . or -
_ID = re.compile(rf"({_NAME})/({_NAME})(?:@(\S+))?")


@dataclass(frozen=True)
class HubModel:
    repo_id: str               # owner/name
    revision: str | None       # branch, tag or commit; None = main

    @property
    def uri(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def hub_model(model: str, commit: str | None = None) -> HubModel | None:
    """The hub model `model` names, or None for a local path or a URI; with `commit` (the driver's
    `pin`) a hub id at that commit, whatever the working directory holds."""
    model = os.fspath(model)
    text = model.removeprefix(PREFIX)
    explicit = text != model
    if not explicit and commit is None:
        if "://" in model or model.startswith(("/", ".", "~")) or os.path.lexists(os.path.expanduser(model)):
            return None
    m = _ID.fullmatch(text)
    repo = text.split("@")[0]
    valid = m is not None and max(len(m.group(1)), len(m.group(2))) <= 96 and ".." not in repo and "--" not in repo
    if not valid:
        if explicit or commit is not None:
            raise ModelError(f"model {model!r}: not a Hugging Face hub id; write hf://owner/name or "
                             "hf://owner/name@revision")
        return None
    return HubModel(f"{m.group(1)}/{m.group(2)}", commit or m.group(3))


def pin(config):
    """`config` with the model fixed on the driver: a hub model's commit (`model_commit`), a local
    directory's absolute path (`model_dir`); URIs unchanged."""
    hub = hub_model(config.model, config.model_commit)
    if hub is None:
        if "://" in os.fspath(config.model):
            return config
        # a local directory, maybe relative: every replica loads the one the driver checked (in
        # another working directory the same text could name another directory, or a hub id)
        return dataclasses.replace(config, model_dir=os.path.abspath(os.path.expanduser(config.model)))
    return dataclasses.replace(config, model_commit=os.path.basename(snapshot(hub, config.model)))


def snapshot(hub: HubModel, model: str | None = None) -> str:
    """`hub`'s snapshot directory in this node's HF cache, fetched if missing (one process per node
    at a time), or a ModelError saying what to do. `model`: as given."""
    from filelock import FileLock

    model = model or hub.uri
    huggingface_hub = _import(model)
    locks = os.path.join(os.path.expanduser(huggingface_hub.constants.HF_HUB_CACHE), ".locks")
    with contextlib.suppress(OSError):
        os.makedirs(locks, exist_ok=True)
    folder = "models--" + hub.repo_id.replace("/", "--")
    # a read-only shared cache is only read: nothing to serialise
    lock = FileLock(os.path.join(locks, f"persimmon-batch--{folder}.lock")) if os.access(locks, os.W_OK) \
        else contextlib.nullcontext()
    with lock:
        try:
            path = huggingface_hub.snapshot_download(hub.repo_id, revision=hub.revision,
                                                     allow_patterns=CONFIG_AND_TOKENIZER + SAFETENSORS,
                                                     ignore_patterns=TOP_LEVEL_ONLY)
            if not any(name.endswith(".safetensors") for name in os.listdir(path)):
                # no safetensors at this commit: the pickle weights, loaded with weights_only=True
                path = huggingface_hub.snapshot_download(hub.repo_id, revision=os.path.basename(path),
                                                         allow_patterns=CONFIG_AND_TOKENIZER + PICKLES,
                                                         ignore_patterns=TOP_LEVEL_ONLY)
        except Exception as e:  # noqa: BLE001 - huggingface_hub's errors, named for the user below
            raise ModelError(_explain(e, hub, model)) from None
    return path


def config_file(hub: HubModel, model: str | None = None) -> str:
    """The local path of `hub`'s config.json alone, for `capacity` (no weights downloaded)."""
    model = model or hub.uri
    huggingface_hub = _import(model)
    try:
        return huggingface_hub.hf_hub_download(hub.repo_id, "config.json", revision=hub.revision)
    except Exception as e:  # noqa: BLE001 - named for the user by _explain
        raise ModelError(_explain(e, hub, model)) from None


def _import(model: str):
    """huggingface_hub (with its constants), or a ModelError saying how to install it."""
    try:
        import huggingface_hub.constants
    except ImportError:
        raise ModelError(f"{_head(model)} needs huggingface_hub: pip install 'persimmon-batch[hub]'") from None
    return huggingface_hub


def _explain(error: Exception, hub: HubModel, model: str) -> str:
    """What went wrong fetching a hub model, and what to do about it."""
    from huggingface_hub import constants, errors

    head, cache = _head(model), os.path.expanduser(constants.HF_HUB_CACHE)
    revision = hub.revision or "main"
    if isinstance(error, errors.GatedRepoError):
        return (f"{head} is gated: accept its terms on https://huggingface.co/{hub.repo_id} and give a token "
                "(HF_TOKEN on every node, or `hf auth login`)")
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"{head} names no repository on the hub (or a private one: give a token with HF_TOKEN on every "
                "node, or `hf auth login`); check the spelling")
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{head} has no revision {revision!r} (a branch, tag or commit of {hub.repo_id})"
    if isinstance(error, errors.LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return (f"{head} is not in this node's Hugging Face cache ({cache}) at revision {revision!r}, and "
                    f"HF_HUB_OFFLINE is set: fetch it first on every node (`hf download {hub.repo_id}`), "
                    "point HF_HUB_CACHE at a cache that holds it, or unset HF_HUB_OFFLINE")
        return (f"{head} could not be fetched from the hub and is not in this node's cache ({cache}): "
                f"{one_line(str(error)) or type(error).__name__}; check the network "
                "or HF_ENDPOINT")
    return f"{head} could not be fetched: {type(error).__name__}: {one_line(str(error))}"


def _head(model: str) -> str:
    """How messages name the model: a bare owner/name also says why it was taken for a hub id."""
    return (f"model {model!r}" if model.startswith(PREFIX) else
            f"model {model!r} is not a local directory, and as a Hugging Face hub id it")
