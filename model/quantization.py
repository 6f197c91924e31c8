"""Weight quantization: the decoder layers' linear weights in 8 bits, one scale per output channel.

- int8 (CPU and CUDA): torchao's symmetric per-row rule (`Int8Tensor.from_hp`). torchao's own
  int8 linear casts the whole transposed weight to the activation dtype on every call (6x slower
  than a bf16 Linear on CPU); `Int8Linear` gives the same outputs faster: on CPU, for up to
  INT8_ROWS bf16 rows, torch's `_weight_int8pack_mm` (one byte read per weight, 1.6x faster than
  oneDNN's bf16 at one row, slower from 4 rows); otherwise the weight is dequantized a slice of
  rows at a time and multiplied, as torchao does. On CPU int8 saves memory; it is faster than
  bf16 only with a row or two.
- fp8 (CUDA, compute capability 8.9+): float8 e4m3 weights, fp32 per-row scales, dequantized the
  same way; quantized here, without torchao.

Quantized: each layer's query_key_value, dense, dense_h_to_4h and dense_4h_to_h, and an untied
lm_head with `quantize_lm_head`; the rest stays in the model dtype (model/capacity.py counts the
same bytes). The loader quantizes each linear as soon as it is in (`LayerQuantizer`): a load
peaks at the quantized model plus one linear.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from .capacity import FP8_MIN_CAPABILITY, QUANTIZATIONS
from .modeling import PersimmonDecoderLayer

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'persimmon-batch[quant]'"
FP8_MAX = 448.0  # largest finite float8 e4m3fn
# bf16 rows up to which _weight_int8pack_mm beats dequantize-then-matmul on CPU: it reads the
# weight once per 4 rows, so it wins while the weight's bytes dominate. Measured for a 16384 x
# 4096 weight on 2 AVX-512 cores: 2.7 / 9.5 / 18 ms at 1 / 8 / 16 rows, dequantizing 10 / 12 / 14
# (oneDNN's packed bf16: 4.3 / 5.3 / 7)
INT8_ROWS = 8
# weight bytes dequantized at a time (in the activation dtype): on CPU into one reused buffer (a
# fresh one per slice cost more than the matmul: allocation and page faults); on a GPU, few launches
SLICE_BYTES = {"cpu": 16 << 20, "cuda": 64 << 20}
QUANTIZE_ELEMENTS = 1 << 20  # weights quantized at a time: 4 MiB fp32 temporaries, fast (cache-sized)


_scratch = threading.local()


def _cpu_scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for dequantized weight slices (<= SLICE_BYTES), made outside inference
    mode: a later forward outside it (a user's no_grad forward) could not write an inference tensor."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _torchao_int8():
    """torchao's Int8Tensor and PerRow, on first use (the `quant` extra), its CUDA import noise quieted."""
    noisy = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    levels = [logger.level for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError as e:
        raise ImportError(f"quantization='int8' needs torchao, which is not installed ({e}): {INSTALL_HINT}") from None
    try:
        from torchao.quantization import Int8Tensor, PerRow
    except ImportError as e:  # Int8Tensor is torchao 0.15's
        raise ImportError(f"quantization='int8' needs torchao >= 0.15; this is torchao "
                          f"{getattr(torchao, '__version__', '?')} ({e}): pip install -U 'persimmon-batch[quant]'") from None
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
    return Int8Tensor, PerRow


def check_supported(quantization: str, device, quantize_lm_head: bool = False) -> None:
    """Raise, before any weight is read, where `quantization` cannot run on `device`."""
    if quantize_lm_head and quantization == "none":
        raise ValueError("quantize_lm_head=True needs quantization='int8' or 'fp8'")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    if quantization == "int8":
        _torchao_int8()
    elif quantization == "fp8":
        device = torch.device(device)
        need = f"quantization='fp8' needs a CUDA GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))}+ " \
               "(L4, L40S, H100, H200)"
        if device.type != "cuda":
            raise ValueError(f"{need}; the model is on {device.type}: use quantization='int8'")
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise ValueError(f"{need}; {torch.cuda.get_device_name(device)} has compute capability "
                             f"{capability[0]}.{capability[1]}: use quantization='int8'")


class QuantizedLinear(nn.Module):
    """y = (x W^T) * scale + b, W [out, in] in 8 bits, one scale per output channel. Weight,
    scale and bias are frozen parameters, so `parameters()` counts their bytes."""

    kind = ""
    storage: torch.dtype  # of the 8-bit weight
    scale_dtype: torch.dtype | None = None  # None: the weight's dtype

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A Linear's weight [out, in] and bias quantized, slices of rows at a time (small scratch)."""
        weight = weight.detach()
        q = torch.empty(weight.shape, dtype=cls.storage, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=cls.scale_dtype or weight.dtype, device=weight.device)
        step = max(1, QUANTIZE_ELEMENTS // max(weight.shape[1], 1))
        for a in range(0, weight.shape[0], step):
            q[a:a + step], scale[a:a + step] = cls.quantize(weight[a:a + step])  # [rows, in], [rows]
        return cls(q, scale, None if bias is None else bias.detach())

    def weight_8bit(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # [M, in]
        y = self.matmul(x2)  # [M, out]
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x W^T * scale with W dequantized to x's dtype a slice of rows at a time: the order of
        operations of torchao's weight-only linear, without a full-precision copy of W."""
        w, N = self.weight_8bit(), self.out_features
        step = max(1, SLICE_BYTES.get(x2.device.type, SLICE_BYTES["cuda"]) // (self.in_features * x2.element_size()))
        # float16: x q^T is 127 / max|w| (fp8: 448 / max|w|) times the output and can pass 65504
        # where the output does not; the scale goes into each slice instead (bf16 / fp32: torchao's order)
        fold = x2.dtype == torch.float16
        y = x2.new_empty(x2.shape[0], N) if step < N else None
        for a in range(0, N, step):
            part = w[a:a + step]
            if x2.device.type == "cpu":
                deq = _cpu_scratch(part.numel(), x2.dtype).view(part.shape).copy_(part)
            else:  # CUDA's caching allocator makes a fresh slice cheap (and safe in graph capture)
                deq = part.to(x2.dtype)
            if fold:
                deq.mul_(self.scale[a:a + step, None])
            if y is None:
                y = x2 @ deq.t()  # [M, N]: the whole weight in one slice
            else:
                y[:, a:a + step] = x2 @ deq.t()
        return y if fold else y.mul_(self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """int8 weights, scales in the model dtype: torchao's values (torchao casts its fp32 scale to
    the activation dtype anyway)."""

    kind, storage = "int8", torch.int8

    @staticmethod
    def quantize(part):  # torchao's per-row rule
        Int8Tensor, PerRow = _torchao_int8()
        t = Int8Tensor.from_hp(part, PerRow())
        return t.qdata, t.scale.reshape(-1)

    def matmul(self, x2):
        if x2.device.type == "cpu" and x2.dtype == torch.bfloat16 and x2.shape[0] <= INT8_ROWS \
                and self.in_features % 16 == 0 and self.weight.data_ptr() % 16 == 0:
            # its x86 kernels step through rows 16 values at a time with aligned vector loads and
            # check neither: rows of a multiple of 16 values, activations 32-byte aligned
            if x2.data_ptr() % 64:
                x2 = x2.clone()  # a few rows; fresh CPU tensors are 64-byte aligned
            return torch._weight_int8pack_mm(x2, self.weight, self.scale)
        return super().matmul(x2)


class Float8Linear(QuantizedLinear):
    """float8 e4m3 weights, fp32 scales. The weight is stored as its bytes (uint8) so that
    casting the model (`.to(dtype)` casts floating tensors) cannot turn it into unscaled bf16."""

    kind, storage, scale_dtype = "fp8", torch.uint8, torch.float32

    @staticmethod
    def quantize(part):  # each row's largest magnitude maps to FP8_MAX
        part = part.float()
        s = part.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX  # [rows]
        return (part / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), s

    def weight_8bit(self):
        return self.weight.view(torch.float8_e4m3fn)


LAYERS = {cls.kind: cls for cls in (Int8Linear, Float8Linear)}


# ---- which linears, and quantizing a model ---------------------------------------------------
def linears_to_quantize(model: nn.Module, quantize_lm_head: bool = False) -> list[str]:
    """Names of the modules quantization turns into 8 bits; a tied lm_head (the embedding) stays,
    with a warning, as capacity.weights_bytes counts it."""
    names = [f"{prefix}.{leaf}" if prefix else leaf
             for prefix, layer in model.named_modules() if isinstance(layer, PersimmonDecoderLayer)
             for leaf in ("self_attn.query_key_value", "self_attn.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")]
    head = getattr(model, "lm_head", None)
    if quantize_lm_head and head is not None:
        if model.config.tie_word_embeddings:
            log.warning("quantize_lm_head: this model's lm_head is tied to its embedding, which stays in the model "
                        "dtype; the lm_head is not quantized")
        else:
            names.append("lm_head")
    elif quantize_lm_head:
        log.info("quantize_lm_head: %s has no lm_head; nothing more to quantize", type(model).__name__)
    return names


def quantize_model(model: nn.Module, quantization: str, quantize_lm_head: bool = False) -> nn.Module:
    """Quantize a loaded model in place (tests, benchmarks); checkpoints quantize while they load."""
    check_supported(quantization, next(model.parameters()).device, quantize_lm_head)
    if quantization == "none":
        return model
    with torch.no_grad():
        for name in linears_to_quantize(model, quantize_lm_head):
            linear = model.get_submodule(name)
            if isinstance(linear, nn.Linear):
                model.set_submodule(name, LAYERS[quantization].from_weights(linear.weight, linear.bias))
    return model


def quantization_of(model: nn.Module) -> tuple[str, bool]:
    """(quantization, lm_head quantized), as capacity.weights_bytes takes them."""
    kinds = {m.kind for m in model.modules() if isinstance(m, QuantizedLinear)}
    if len(kinds) > 1:
        raise ValueError(f"a model mixes quantizations {sorted(kinds)}")
    return (kinds.pop() if kinds else "none"), isinstance(getattr(model, "lm_head", None), QuantizedLinear)


class LayerQuantizer:
    """Quantizes linears while a checkpoint streams in: `take(name, state)` after each tensor lands
    in `state` turns a linear whose weight (and bias) are all there into its 8-bit module;
    `install(model)` puts the modules in place of the meta-device Linears."""

    def __init__(self, model: nn.Module, quantization: str, quantize_lm_head: bool, device):
        check_supported(quantization, device, quantize_lm_head)
        self.layer = LAYERS.get(quantization)
        names = linears_to_quantize(model, quantize_lm_head) if self.layer else []
        self.targets = {name: model.get_submodule(name).bias is not None for name in names}  # name -> has bias
        self.modules: dict[str, QuantizedLinear] = {}
        self.loaded: set[str] = set()  # checkpoint names taken out of `state`

    def take(self, name: str, state: dict) -> None:
        module, _, _ = name.rpartition(".")
        if module not in self.targets:
            return
        keys = [f"{module}.weight"] + ([f"{module}.bias"] if self.targets[module] else [])
        if all(k in state for k in keys):
            self.modules[module] = self.layer.from_weights(*[state.pop(k) for k in keys])
            self.loaded.update(keys)

    def install(self, model: nn.Module) -> None:
        for name, module in self.modules.items():
            model.set_submodule(name, module)
        first = next(iter(self.modules.values()), None)
        if isinstance(first, Int8Linear) and first.scale.device.type == "cpu" and first.scale.dtype == torch.float32:
            log.warning("int8 weights with float32 activations on CPU dequantize every weight to float32 at each "
                        "step: up to 7x slower than plain float32 (bench/quantization.py); on CPU int8 pays with "
                        "dtype bfloat16, or where memory, not speed, is short")
