"""CPU weight packing, in place: every Linear runs through oneDNN with its weight packed once
into oneDNN's blocked layout (1.1-1.3x faster small-batch matmuls on CPU).

The packed tensor replaces the plain one (the weights are in memory once); `state_dict()`
unpacks on the fly, casting or moving the model unpacks first. Where torch's oneDNN does not run
the dtype (`cpu_packing_unsupported`) the model keeps plain `F.linear`, with the same results.
Quantized linears are not `nn.Linear`s: they keep their own 8-bit matmul.
"""

from __future__ import annotations

import collections
import logging
import os
import platform

import torch
from torch import nn

from .modeling import PersimmonMLP

log = logging.getLogger(__name__)


def _packed_forward(module, activation="none"):
    out_features = module.out_features

    def forward(x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), module._packed_weight, module.bias,
                                               activation, [], "")
        return y.view(*x.shape[:-1], out_features)
    return forward


def _dense_state(module, state_dict, prefix, local_metadata):
    if hasattr(module, "_packed_weight"):
        state_dict[prefix + "weight"] = module._packed_weight.to_dense()


def _unpack_then_apply(module):
    def apply(fn, recurse=True):
        _unpack_linear(module)
        return type(module)._apply(module, fn, recurse)
    return apply


def _unpack_linear(module) -> None:
    packed = module.__dict__.pop("_packed_weight", None)
    if packed is not None and module.weight.numel() == 0:
        module.weight.data = packed.to_dense()
    for name in ("forward", "_apply"):
        module.__dict__.pop(name, None)
    handle = module.__dict__.pop("_dense_state_hook", None)
    if handle is not None:
        handle.remove()


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_packing_unsupported(dtype: torch.dtype) -> str | None:
    """Why oneDNN weight packing cannot run `dtype` Linears on this CPU, or None when it can.
    torch is asked, not /proc/cpuinfo: its checks honour ONEDNN_MAX_CPU_ISA (how CI makes an
    AVX-512 machine behave as an AVX2-only one). x86 only, where it is tested."""
    if os.environ.get("PERSIMMON_PACKED_LINEARS", "1") == "0":
        return "turned off by PERSIMMON_PACKED_LINEARS=0"
    if platform.machine().lower() not in _X86:
        return f"oneDNN weight packing is used on x86 CPUs only (this is {platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN's bf16 matmul needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which this CPU lacks"
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "oneDNN's fp16 matmul needs AVX512-FP16 or AVX-NE-CONVERT, which this CPU lacks"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no oneDNN packing for {dtype}"
    return None


def pack_cpu_linears(model, wanted: bool | None = None) -> bool:
    """Pack every Linear where `wanted` (None: where this CPU supports the dtype; True where it
    does not: a ValueError saying why); returns whether it did. The MLP's ReLU is fused into its
    first matmul and squared in place (bit-identical, two passes fewer over [tokens,
    intermediate]). The plain weight is dropped (an empty placeholder keeps its dtype and
    device) unless another module shares it (tied embeddings)."""
    param = next(model.parameters())
    why_not = cpu_packing_unsupported(param.dtype) if param.device.type == "cpu" else "not on a CPU"
    if wanted and why_not:
        raise ValueError(f"packed_cpu_linears=True, but {why_not}; leave it None (automatic) or False")
    if wanted is None and why_not and param.device.type == "cpu":
        log.info("Linear layers run plain F.linear: %s", why_not)
    if wanted is False or why_not:
        return False
    counts = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and "_packed_weight" not in module.__dict__:
                weight = module.weight
                module._packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
                if counts[id(weight)] == 1:
                    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
                module.forward = _packed_forward(module)
                module._apply = _unpack_then_apply(module)
                module._dense_state_hook = module._register_state_dict_hook(_dense_state)
        for module in model.modules():  # quantized MLP linears are not nn.Linear: left unpacked, unfused
            if isinstance(module, PersimmonMLP) and "_packed_weight" in module.dense_h_to_4h.__dict__:
                up_relu, down = _packed_forward(module.dense_h_to_4h, "relu"), module.dense_4h_to_h

                def mlp_forward(x, up_relu=up_relu, down=down):
                    return down(up_relu(x).square_())  # relu(x W1 + b1)^2 W2 + b2
                module.forward = mlp_forward
    return True


def unpack_cpu_linears(model) -> None:
    """Undo pack_cpu_linears: plain weights back, plain forwards."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _unpack_linear(module)
        elif isinstance(module, PersimmonMLP):
            module.__dict__.pop("forward", None)
