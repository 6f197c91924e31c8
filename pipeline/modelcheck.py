"""Checks of the model directory on the driver, before any replica starts.

A bad checkpoint must fail once, here, naming the problem, not in every replica (each would load
for minutes, die, restart and retry). Cheap: config.json, the weight index and the safetensors
*headers* only (ranged reads), every tensor name and shape compared with the model config.json
describes, built on the meta device:

    missing dir / config.json / weights / tokenizer.model   -> ModelError
    a tokenizer.model that does not load or encode           -> ModelError
    --kv-cache-gib too small for one row of max_seq_len      -> ConfigError (names both fixes)
    config.json that does not validate                      -> ModelError (names the field)
    head that does not fit the task                         -> ModelError
    tensors missing, unexpected or of the wrong shape       -> ModelError (lists them)
    a truncated or corrupt .safetensors file                 -> ModelError

Pickles (`pytorch_model*.bin`) have no cheap header: local ones are opened memory-mapped with
`torch.load(weights_only=True)` (no code runs, no tensor is read); remote ones are checked when
the replicas load them. A hub id is checked and fingerprinted in this node's HF cache snapshot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

from .errors import ConfigError, ModelError, one_line
from .settings import PipelineConfig
from .storage import Location, local_copy, model_location, read_bytes, read_file, retry
from .stages import CAUSAL, TASKS


def check_model(config: PipelineConfig) -> dict:
    """Validate the checkpoint at `config.model` for `config.task`; return its config dict."""
    from model import PersimmonConfig

    loc = model_location(config.model, config)
    names = _list(loc)
    if "config.json" not in names:
        raise ModelError(f"model {loc.uri} has no config.json")
    try:
        raw = json.loads(read_bytes(loc.join("config.json")))
        if not isinstance(raw, dict):
            raise ValueError("config.json must hold a JSON object")
        mcfg = PersimmonConfig.from_dict(raw)
    except (ValueError, TypeError, OSError) as e:
        raise ModelError(f"model {loc.uri}: config.json: {e}") from None
    if "tokenizer.model" not in names:
        raise ModelError(f"model {loc.uri} has no tokenizer.model")
    arch = (mcfg.architectures or ["PersimmonForCausalLM"])[0]
    task = TASKS[config.task]
    if arch != task.architecture:
        raise ModelError(f"{task.name} needs a {task.architecture} checkpoint; {loc.uri} is {arch}"
                         + task.wrong_architecture_hint)
    _check_tokenizer(loc, names, mcfg)
    if arch == CAUSAL:
        check_kv_pool(config, mcfg)
    files = _weight_files(loc, names)
    # pickles have no cheap header: remote ones are checked when the replicas load them
    read = read_safetensors_shapes if files[0].endswith(".safetensors") else _pickle_shapes if loc.is_local else None
    if read is not None:
        _compare(loc, mcfg, arch, {k: v for name in files for k, v in read(loc.join(name)).items()})
    return mcfg.to_dict()


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
TEST_TEXT = "Persimmons ripen in autumn: 3 of them, please."


def _check_tokenizer(loc: Location, names: set[str], mcfg) -> None:
    """The tokenizer loads and encodes a test sentence here, once, not in every replica, and its
    pieces fit config.json's vocab_size."""
    from model import PersimmonTokenizer

    try:
        with local_copy(loc, names.intersection(TOKENIZER_FILES)) as path:
            tokenizer = PersimmonTokenizer.from_pretrained(path)
            if not tokenizer.encode(TEST_TEXT, add_bos=False):
                raise ValueError("it encodes a test sentence to no tokens")
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError for a corrupt file
        first = one_line(str(e)) or type(e).__name__
        raise ModelError(f"model {loc.uri}: its tokenizer cannot be used ({first}); put the model's own "
                         "tokenizer.model (and tokenizer_config.json) in the directory") from None
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise ModelError(f"model {loc.uri}: tokenizer.model has {tokenizer.vocab_size} pieces, more than "
                         f"config.json's vocab_size={mcfg.vocab_size}: it is another model's tokenizer")


def check_kv_pool(config: PipelineConfig, mcfg) -> None:
    """With --kv-cache-gib, the pool must hold one row of max_seq_len tokens (whole blocks, less the
    runner's reserved ones), or no full-length row could run and a pool below the runner's
    minimum would kill every replica. Without it each replica sizes its own pool."""
    if config.kv_cache_gib is None:
        return
    from model import capacity

    dtype = config.resolved_dtype
    per_token = capacity.kv_bytes_per_token(mcfg, dtype)
    longest = config.max_seq_len or mcfg.max_position_embeddings
    holds = capacity.pool_tokens(int(config.kv_cache_gib * capacity.GIB), per_token)
    if holds < longest:
        block = 16  # the engine's kv_block_size, which the pipeline keeps
        need = (-(-longest // block) + capacity.RESERVED_BLOCKS) * block * per_token / capacity.GIB
        fixes = f"use --kv-cache-gib {math.ceil(need * 1000) / 1000:g} or more" + (
            f", or --max-seq-len {holds} or less" if holds >= 2 else "")
        raise ConfigError(f"kv_cache_gib: {config.kv_cache_gib:g} GiB of KV cache holds {holds} tokens "
                          f"({per_token / 1024:g} KiB a token in {dtype}), fewer than one row of "
                          f"max_seq_len={longest}: {fixes}")


def _pickle_shapes(loc: Location) -> dict[str, tuple]:
    """Shapes from a local pickle, opened as the replicas will; one that needs code to load is refused."""
    import torch

    try:
        state = torch.load(loc.path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError: not loadable safely
        first = one_line(str(e)) or type(e).__name__
        raise ModelError(f"model weights {loc.uri} cannot be loaded with torch.load(weights_only=True) "
                         f"({first}); convert them to safetensors") from None
    if not isinstance(state, dict):
        raise ModelError(f"model weights {loc.uri} hold a {type(state).__name__}, not a state dict")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


# (the weight indexes: model.checkpoint's SAFE_INDEX and BIN_INDEX; `import pipeline` stays torch-free)
IDENTITY_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                  "model.safetensors.index.json", "pytorch_model.bin.index.json")
SAMPLES, SAMPLE_BYTES = 64, 64 << 10  # windows of each weight file's data hashed (4 MiB a file at most)


def model_identity(config: PipelineConfig) -> str:
    """A hash of config.json, the tokenizer files, and each weight file's size, header and 64 windows
    of 64 KiB over its weights (every layer of an 8B checkpoint). In each output's footer: a rerun
    whose model changed is refused; the node model cache keeps a copy per identity."""
    from model.checkpoint import SAFETENSORS_MAX_HEADER

    loc = model_location(config.model, config)
    names = _list(loc)
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        if name in names:
            h.update(f"{name}\0".encode() + read_bytes(loc.join(name)))
    for name in _weight_files(loc, names):
        part = loc.join(name)

        def _read(f):
            size, start, header = f.size(), 0, b""
            if name.endswith(".safetensors") and size >= 8:
                (n,) = struct.unpack("<Q", f.read_at(8, 0))
                header = f.read_at(min(n, SAFETENSORS_MAX_HEADER, size - 8), 8)
                start = min(size, 8 + n)
            # retrained weights of the same shapes differ in the samples (any layer), not the header
            span = size - start
            width = min(SAMPLE_BYTES, span)
            offsets = sorted({start + (span - width) * k // max(1, SAMPLES - 1) for k in range(SAMPLES)})
            return size, header + b"".join(f.read_at(width, o) for o in offsets)
        try:
            size, data = read_file(part, _read)
        except OSError as e:
            raise ModelError(f"model weights {part.uri}: {e}") from None
        h.update(f"{name}\0{size}\0".encode() + data)
    return h.hexdigest()[:32]


def _list(loc: Location) -> set[str]:
    if loc.is_local:
        if not os.path.isdir(loc.path):
            what = "is not a directory" if os.path.exists(loc.path) else "does not exist"
            raise ModelError(f"model directory {loc.uri} {what}")
        return set(os.listdir(loc.path))
    import pyarrow.fs as pafs

    try:
        infos = retry(lambda: loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)),
                      f"list model {loc.uri}", loc.retries)
    except OSError as e:
        raise ModelError(f"model {loc.uri}: {e}") from None
    if not infos:
        raise ModelError(f"model directory {loc.uri} does not exist or is empty")
    return {i.base_name for i in infos}


def _weight_files(loc: Location, names: set[str]) -> list[str]:
    """Weight file names, picked as the engine's loader picks them (model.checkpoint)."""
    from model.checkpoint import pick_weight_files

    try:
        return pick_weight_files(names, lambda index: read_bytes(loc.join(index)))
    except (ValueError, OSError) as e:
        repo = loc.uri.removeprefix("hf://").split("@")[0]  # an hf:// snapshot in the HF cache, maybe partial
        hint = (f" (its snapshot in the Hugging Face cache at {loc.path} is incomplete: fetch it again with "
                f"`hf download {repo}`, or delete it from the cache)") if loc.uri.startswith("hf://") else ""
        raise ModelError(f"model {loc.uri}: {e}{hint}") from None


def read_safetensors_shapes(loc: Location) -> dict[str, tuple]:
    """{tensor name: shape} from a .safetensors header, checked as the loader does (truncated: fails here)."""
    from model.checkpoint import safetensors_header

    try:
        _, header = read_file(loc, lambda f: safetensors_header(f.size(), f.read_at))
    except (ValueError, OSError) as e:
        raise ModelError(f"model weights {loc.uri}: {e}") from None
    return {name: shape for name, (_, shape, _, _) in header.items()}


def _compare(loc: Location, mcfg, arch: str, shapes: dict[str, tuple]) -> None:
    """Names and shapes of the checkpoint vs the model config.json describes, mapped as
    `model.checkpoint.load_pretrained` does (tied head, `model.` prefix, rotary buffers)."""
    from model.checkpoint import meta_model, mismatch_report, model_param_name
    from model.modeling import MODEL_CLASSES, PersimmonForCausalLM, PersimmonModel

    cls = MODEL_CLASSES.get(arch, PersimmonForCausalLM)
    _, params, tied = meta_model(cls, mcfg)
    expected = {k: tuple(v.shape) for k, v in params.items()}
    bare = cls is PersimmonModel
    found = {model_param_name(name, expected, bare, tied): shape for name, shape in shapes.items()}
    found.pop(None, None)  # skipped tensors
    # in the model's own order (embeddings first)
    wrong = [f"{name}: checkpoint {found[name]} vs config {shape}" for name, shape in expected.items()
             if name in found and found[name] != shape]
    missing = [name for name in expected if name not in found]
    unexpected = sorted(name for name in found if name not in expected)
    if missing or unexpected or wrong:
        report = mismatch_report([("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)],
                                 limit=5)
        raise ModelError(f"model {loc.uri}: weights do not match config.json ({arch}): {report}")
