"""Checkpoint I/O in HF layout: config.json + safetensors (single or sharded) or pickle `.bin`.

Loading builds the model on the meta device, streams tensors one at a time into the target
dtype and device and assigns them: peak memory is one model plus one tensor (quantized: the
quantized model plus about one linear, model/quantization.py). Pickle files are read with
`torch.load(weights_only=True, mmap=True)`: no arbitrary code, no second copy.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import PersimmonConfig
from .modeling import MODEL_CLASSES, PersimmonForCausalLM, PersimmonModel
from .quantization import LayerQuantizer, quantization_of

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: lists every offending tensor."""


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[str(dtype)]


def pick_weight_files(names, read_index) -> list[str]:
    """The weight files of a checkpoint directory holding the files `names`, in a fixed order: a
    safetensors index's files, else model.safetensors, else the same for `.bin`. `read_index(name)`
    returns an index file's bytes (local and object-store directories: pipeline.modelcheck)."""
    names = set(names)
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if index in names:
            try:
                files = sorted(set(json.loads(read_index(index))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is not a valid weight index ({e})") from None
            outside = [f for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]
            if outside:
                raise ValueError(f"{index} names files outside the checkpoint dir: {outside[:5]}")
            if not files:
                raise ValueError(f"{index} names no weight files (empty weight_map)")
            missing = [f for f in files if f not in names]
            if missing:
                raise FileNotFoundError(f"{index} lists missing weight files: {missing[:5]}")
            return files
        if single in names:
            return [single]
    raise FileNotFoundError(f"no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_MAX_HEADER = 100_000_000


def safetensors_header(file_size: int, read_at) -> tuple[int, dict]:
    """(data start, {tensor name: (dtype name, shape, begin, end)}) of a .safetensors file of
    `file_size` bytes that `read_at(nbytes, offset)` reads. Every byte range is checked against its
    dtype, shape and the file's size, so a truncated file fails here, not halfway through a load."""
    head = read_at(8, 0) if file_size >= 8 else b""
    (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
    if not 0 < n <= min(file_size - 8, SAFETENSORS_MAX_HEADER):
        raise ValueError(f"not a safetensors file (header length {n}; truncated or another format)")
    try:
        header = json.loads(read_at(n, 8))
        header.pop("__metadata__", None)
        out = {}
        for name, info in header.items():
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {dtype}")
            if not all(type(d) is int and d >= 0 for d in shape) or not all(type(o) is int for o in (begin, end)):
                raise ValueError(f"tensor {name}: shape {list(shape)} / offsets {[begin, end]} are not non-negative integers")
            if begin < 0 or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
                raise ValueError(f"tensor {name}: byte range {begin}..{end} does not hold {dtype}{list(shape)}")
            if 8 + n + end > file_size:
                raise ValueError(f"tensor {name} ends at byte {8 + n + end} but the file has {file_size} bytes "
                                 "(truncated?)")
            out[name] = (dtype, shape, begin, end)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed safetensors header ({type(e).__name__}: {e})") from None
    return 8 + n, out


def iter_safetensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A .safetensors file a tensor at a time, by plain reads (no mmap pages count against us)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        def read_at(nbytes, offset):
            f.seek(offset)
            return f.read(nbytes)

        try:
            base, header = safetensors_header(size, read_at)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        for name, (dtype, shape, begin, end) in sorted(header.items(), key=lambda kv: kv[1][2]):
            tensor = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
            nbytes = end - begin
            if nbytes:
                f.seek(base + begin)
                buf = tensor.reshape(-1).view(torch.uint8).numpy()  # writable view of the tensor's bytes
                if f.readinto(memoryview(buf)) != nbytes:
                    raise ValueError(f"{file}: truncated while reading {name}")
            yield name, tensor


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) across shards, one tensor in memory at a time where the format allows."""
    for file in files:
        if file.endswith(".safetensors"):
            yield from iter_safetensors(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state


def load_pretrained(path, dtype=None, device=None, model_class=None, quantization: str = "none",
                    quantize_lm_head: bool = False):
    """Load an HF-layout Persimmon checkpoint directory into our model, in eval mode. `model_class`
    defaults to config.architectures' (else the causal LM), `dtype` to its torch_dtype, else
    float32. `quantization` "int8" / "fp8" stores the layers' linears (and the lm_head with
    `quantize_lm_head`) in 8 bits; where it cannot run it fails before any weight is read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = PersimmonConfig.from_pretrained(path)
    try:
        files = pick_weight_files(os.listdir(path), lambda name: Path(path, name).read_bytes())
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from None
    if model_class is None:
        arch = (config.architectures or ["PersimmonForCausalLM"])[0]
        model_class = MODEL_CLASSES.get(arch, PersimmonForCausalLM)
    dtype = resolve_dtype(dtype) or resolve_dtype(config.torch_dtype) or torch.float32
    device = torch.device(device or "cpu")

    model, expected, tied = meta_model(model_class, config)
    bare = model_class is PersimmonModel
    quantizer = LayerQuantizer(model, quantization, quantize_lm_head, device)

    state, unexpected, mismatched = {}, [], []
    for name, tensor in iter_tensors([os.path.join(path, f) for f in files]):
        name = model_param_name(name, expected, bare, tied)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
            continue
        state[name] = tensor.to(device=device, dtype=dtype)  # one cast, straight to the target
        del tensor
        quantizer.take(name, state)  # a linear complete in the dtype leaves `state` in 8 bits
    missing = sorted(set(expected) - set(state) - quantizer.loaded - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        report = mismatch_report([("missing", missing), ("unexpected", sorted(unexpected)),
                                  ("wrong shape", mismatched)], limit=20)
        raise CheckpointError(f"checkpoint {path} does not match {model_class.__name__}: {report}")
    quantizer.install(model)
    model.load_state_dict(state, strict=not tied and not quantizer.modules, assign=True)  # all checked above
    model.tie_weights()
    return model.eval()


def meta_model(model_class, config: PersimmonConfig):
    """(meta-device model, its parameters by name, tied); a tied lm_head is left out (checkpoints vary)."""
    with torch.device("meta"):
        model = model_class(config)
    expected = dict(model.state_dict())
    tied = config.tie_word_embeddings and "lm_head.weight" in expected
    if tied:
        expected.pop("lm_head.weight")
    return model, expected, tied


def mismatch_report(parts: list[tuple[str, list]], limit: int) -> str:
    """'missing 2: [...]; wrong shape 1: [...]' for the non-empty lists, each cut to `limit`."""
    return "; ".join(f"{label} {len(items)}: {items[:limit]}" for label, items in parts if items)


def model_param_name(name: str, expected, bare: bool, tied: bool) -> str | None:
    """The model parameter a checkpoint tensor loads into, or None for skipped ones (rotary
    `inv_freq`, a tied lm_head, head weights into a bare backbone). `model.` prefixes are dropped
    or added so backbone and head-model checkpoints load into either class."""
    if bare and name.startswith("model."):
        name = name[len("model."):]  # backbone out of a checkpoint with a head
    elif bare and name.split(".")[0] in ("lm_head", "score"):
        return None
    elif not bare and name not in expected and f"model.{name}" in expected:
        name = f"model.{name}"  # head model from a bare-backbone checkpoint
    if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
        return None
    return name


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def save_state_dict(state: dict[str, torch.Tensor], path, max_shard_size="5GB") -> list[str]:
    """Write tensors as safetensors: one `model.safetensors`, or shards plus an index."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards, current, current_size = [], {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor.detach().contiguous().cpu()
        current_size += size
    shards.append(current)
    names = [SAFE_SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(len(shards))]
    umask = os.umask(0)
    os.umask(umask)
    for shard, name in zip(shards, names):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        # safetensors >= 0.8.1 writes via a 0600 temp file (safetensors#782): give the file the
        # mode any new file gets, so other users (Ray workers, containers) can read it
        os.chmod(os.path.join(path, name), 0o666 & ~umask)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for shard, name in zip(shards, names) for k in shard}}
        Path(path, SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
    return [os.path.join(path, n) for n in names]


def save_pretrained(model, path, max_shard_size="5GB") -> None:
    """Write config.json + safetensors that both this package and transformers load."""
    quantized, _ = quantization_of(model)
    if quantized != "none":
        raise ValueError(f"this model's linears are quantized ({quantized}): neither this package nor transformers "
                         "loads its 8-bit weights and scales as a checkpoint; save the unquantized model (loading "
                         "quantizes it again: quantization=...)")
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with model.embed_tokens.weight
    config.architectures = [type(model).__name__]
    dtype = next(iter(state.values())).dtype
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(path)
    save_state_dict(state, path, max_shard_size=max_shard_size)
