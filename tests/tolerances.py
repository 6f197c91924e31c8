"""Numeric tolerances from the arithmetic, not from what one CPU happened to print.

Two correct computations of the same value differ only by rounding, and they round in
different places: AVX-512 and AVX2 vectors split a dot product into different partial sums,
oneDNN blocks a matmul differently than plain GEMM, a cached prefix is attended in another
order than a fresh prompt. Each rounding moves a partial result by at most the unit roundoff
u = eps / 2 of its size; summing n terms, the rounding errors are (to an excellent
approximation) independent and centred, so the total stays within

    LAMBDA * sqrt(n) * u * sum|x_i|

with probability at least 1 - 2 exp(-LAMBDA^2 / 2) (Higham and Mary, "A new approach to
probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019). LAMBDA = 8 makes a false
failure a 1e-14 event per comparison. Both sides of a comparison carry such an error, hence the
factor 2. A real bug (a wrong mask, rotary on the wrong half, a dropped token) moves values by
whole units, orders of magnitude beyond these bounds.

For a model output, n is the number of products accumulated along the longest path from the
input to the value, `forward_terms(config, keys)`: per layer the q/k/v projection (hidden), the
attention over up to `keys` positions, the output projection (hidden), and the MLP (hidden, then
intermediate); then the head (hidden). The magnitude is the size of the value compared (its
sum of absolute parts where it is a sum, e.g. a choice's log-likelihood over its tokens).

bf16 and fp16 accumulate in fp32 but store every intermediate in 16 bits: that rounding (u of
the 16-bit type at each stored result, not at each product) dominates, and how it propagates
through LayerNorms and the softmax is not worth modelling. There the tolerance comes from the
reference itself (`no_less_precise`): our 16-bit result may stray from the fp32 answer by no
more than transformers' 16-bit result does, with room for both sides rounding independently.
"""

from __future__ import annotations

import math

import torch

LAMBDA = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def accumulation_tol(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """Largest difference expected between two evaluations, in `dtype`, of a value of size
    `magnitude` built from `terms` accumulated products (see the module doc)."""
    return 2 * LAMBDA * math.sqrt(max(1, terms)) * unit_roundoff(dtype) * max(abs(magnitude), 1.0)


def forward_terms(config, keys: int) -> int:
    """Accumulated products along the longest path to one output of the model (module doc)."""
    h, m = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * (h + keys + h + h + m) + h


def forward_tol(config, dtype: torch.dtype, keys: int, magnitude: float) -> float:
    """Tolerance for a model output of size `magnitude` over `keys` positions in `dtype`."""
    return accumulation_tol(dtype, forward_terms(config, keys), magnitude)


def approx_forward(expected, config, keys: int, dtype: torch.dtype = torch.float32):
    """pytest.approx for model outputs (a number or a list of them) computed two ways."""
    import pytest

    return pytest.approx(expected, abs=forward_tol(config, dtype, keys, max_abs(expected)))


def no_less_precise(ours: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor, slack: float = 2.0) -> None:
    """Assert `ours` (16-bit) is within `slack` x the largest error of `reference` (the same
    computation by transformers in the same 16-bit dtype), both measured against `exact` (fp32)."""
    ours, reference, exact = ours.float(), reference.float(), exact.float()
    ref_err = (reference - exact).abs().max().item()
    our_err = (ours - exact).abs().max().item()
    assert ref_err > 0, "the 16-bit reference equals fp32 exactly: the comparison would prove nothing"
    assert our_err <= slack * ref_err, (our_err, ref_err)


def max_abs(values) -> float:
    """Largest |x| of a tensor or a (nested) list of numbers."""
    if isinstance(values, torch.Tensor):
        return float(values.detach().abs().max()) if values.numel() else 0.0
    if isinstance(values, (list, tuple)):
        return max((max_abs(v) for v in values), default=0.0)
    return abs(float(values))


def assert_forward_close(ours: torch.Tensor, reference: torch.Tensor, config, keys: int = 64) -> None:
    """Two fp32 evaluations of a model output (logits, hidden states) agree to `forward_tol`:
    `keys` bounds the sequence length (every sequence in these tests is shorter than 64)."""
    diff = (ours.float() - reference.float()).abs().max().item()
    tol = forward_tol(config, torch.float32, keys, max_abs(reference))
    assert diff <= tol, f"max abs difference {diff:.3g} > {tol:.3g} (fp32 accumulation bound)"


def attention_tol(dtype: torch.dtype, head_dim: int, keys: int, magnitude: float) -> float:
    """Attention of one query over `keys` cached keys, computed in fp32 from `dtype` inputs and
    stored once in `dtype`: fp32 accumulation over the head_dim products of each score and the
    `keys` weighted values, plus one rounding of the result (u of `dtype`, at most half an ulp)."""
    extra = unit_roundoff(dtype) * max(abs(magnitude), 1.0) if dtype != torch.float32 else 0.0
    return accumulation_tol(torch.float32, head_dim + keys, magnitude) + extra
