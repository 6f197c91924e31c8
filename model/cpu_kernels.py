"""Native CPU kernels, built on first use with the system C compiler and loaded with ctypes.

One kernel today: attention over the paged KV cache (`kernels/paged_attention.c`), reading keys
and values in place instead of gathering a copy of each row's blocks (the gather cost about
twice the attention itself on CPU). Optional: without a C compiler, with PERSIMMON_CPU_KERNELS=0
or if the build fails, `available()` is False and the model uses gather + SDPA (same results).

Built with `-march=native` or PERSIMMON_KERNEL_MARCH (`x86-64-v3`: what an AVX2-only CPU runs;
a compiler that rejects it gets a try without -march), cached under $PERSIMMON_KERNEL_CACHE
(default ~/.cache/persimmon-batch) keyed by source, flags and CPU features, written atomically
(concurrent replicas on one node race safely). torch is imported first, so the kernel's OpenMP
calls land in the OpenMP runtime torch loaded (its threads are torch's).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "paged_attention.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
             ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_lock = threading.Lock()
_loaded: dict = {}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return next((shutil.which(n) for n in (os.environ.get("CC"), "gcc", "cc", "clang") if n and shutil.which(n)), None)


def _build(cc: str) -> str:
    march = os.environ.get("PERSIMMON_KERNEL_MARCH", "native").strip()
    last: subprocess.CalledProcessError | None = None
    for target in ([f"-march={march}"], []) if march else ([],):
        try:
            return _build_with(cc, FLAGS + target)
        except subprocess.CalledProcessError as e:
            last = e
            log.info("building the CPU kernel with %s failed; trying the next target", target or "no -march")
    raise last


def _build_with(cc: str, flags: list[str]) -> str:
    key = hashlib.sha256(Path(SOURCE).read_bytes() + " ".join(flags).encode() + cc.encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    cache = os.environ.get("PERSIMMON_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "persimmon-batch")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, f"paged_attention-{key}.so")
    if os.path.isfile(target):
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, SOURCE, "-lm"], check=True, capture_output=True, timeout=120)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # a cache shared between users must stay loadable
        os.replace(tmp, target)  # atomic: another process may have built the same file meanwhile
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    if os.environ.get("PERSIMMON_CPU_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: CPU paged attention uses the slower gather + SDPA path")
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("could not build the CPU paged-attention kernel (%s %s); using gather + SDPA",
                    e, detail.decode(errors="replace")[-500:])
        return None
    kernels = {}
    for dtype, suffix in _SUFFIX.items():
        fn = getattr(lib, f"paged_attention_{suffix}", None)
        if fn is not None:
            fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
            kernels[dtype] = fn
    return kernels


def kernels() -> dict | None:
    """{dtype: ctypes function} of the built kernel, or None when unavailable."""
    with _lock:
        if "kernels" not in _loaded:
            _loaded["kernels"] = _load()
        return _loaded["kernels"]


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    table_rows: torch.Tensor, positions: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Attention of each query token q[t] [H, D] over positions 0..positions[t] of the sequence
    whose block table is block_tables[table_rows[t]]. q [N, H, D] (last dim contiguous),
    k_pool / v_pool [slots, H, D] contiguous, int64 tables. Returns [N, H, D]."""
    fn = kernels()[q.dtype]
    N, H, D = q.shape
    if q.stride(-1) != 1 or not (k_pool.is_contiguous() and v_pool.is_contiguous() and block_tables.is_contiguous()):
        raise ValueError("paged_attention needs a unit-stride q and contiguous pools and block tables")
    if table_rows.dtype != torch.int64 or positions.dtype != torch.int64 or block_tables.dtype != torch.int64:
        raise TypeError("block_tables, table_rows and positions must be int64")
    table_rows, positions = table_rows.contiguous(), positions.contiguous()
    out = torch.empty((N, H, D), dtype=q.dtype)
    max_keys = int(positions.max()) + 1 if N else 1
    failed = fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(),
                block_tables.data_ptr(), block_tables.stride(0), table_rows.data_ptr(), positions.data_ptr(),
                N, H, D, block_size, max_keys, float(scale), torch.get_num_threads())
    if failed:
        raise MemoryError("paged_attention: out of memory for its per-thread score buffers")
    return out


def available(dtype: torch.dtype) -> bool:
    found = kernels()
    return bool(found) and dtype in found
