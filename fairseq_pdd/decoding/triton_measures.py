"""A Dirichlet's five distribution measures per row as one Triton kernel (the torch reference is
:func:`fairseq_pdd.decoding.uncertainty._dirichlet_rows`, which calls this when
:mod:`fairseq_pdd.distill.backend` chooses Triton).

For rows ``alpha`` (n, K) with ``a0 = sum_k alpha_k``, one program per row, two passes over it:

1. ``a0`` and the count of entries that are not ``> 0`` (NaN included);
2. ``data = sum_k alpha_k max(psi(a0 + 1) - psi(alpha_k + 1), 0) / a0`` and
   ``mi = sum_k alpha_k max(g(alpha_k) - g(a0), 0) / a0`` with ``g(x) = psi(x + 1) - log x``, computed
   directly below 8 and by ``1/(2x) - 1/(12x^2) + 1/(120x^4) - 1/(252x^6)`` from 8 on (as the reference,
   where the direct difference would cancel);

then ``total = data + mi``, ``epkl = (K - 1) / a0``, ``mkl = max(epkl - mi, 0)``, written as the columns of
``out`` (n, 5) in the order of :data:`~fairseq_pdd.decoding.uncertainty.DIRICHLET_TOKEN_KEYS`, ``a0`` (n,),
and ``bad`` (n,): the row has an entry that is not ``> 0`` or a non-finite ``a0``. ``alpha`` is read in
its own dtype (float32, float16, bfloat16), the arithmetic is float32. One digamma per entry
(:func:`~fairseq_pdd.distill.special.digamma1p`, which keeps the digits of differences of small
concentrations; the reference also computes one, plus about ten (n, K) passes in three buffers);
nothing (n, K) is written.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from fairseq_pdd.distill.special import digamma1p, row_block

#: Largest tile of classes one program handles at a time.
MAX_BLOCK = 1024
#: Columns of the output, in the order of DIRICHLET_TOKEN_KEYS.
COLUMNS = 5


@triton.jit
def _g_series(x):
    """``g(x) = psi(x + 1) - log x`` by its asymptotic series (x >= 8)."""
    inv = 1.0 / x
    inv2 = inv * inv
    return 0.5 * inv - inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 * (1.0 / 252)))


@triton.jit
def _dirichlet_measures_kernel(alpha_ptr, out_ptr, a0_ptr, bad_ptr, K, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    sums = tl.zeros([BLOCK], tl.float32)
    invalid = tl.zeros([BLOCK], tl.int32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        alpha = tl.load(alpha_ptr + row * stride + idx, mask=mask, other=1.0).to(tl.float32)
        sums += tl.where(mask, alpha, 0.0)
        invalid += tl.where(alpha > 0.0, 0, 1)
    a0 = tl.sum(sums, 0)
    bad = (tl.sum(invalid, 0) > 0) | (a0 != a0) | (a0 == float("inf"))
    psi_a0 = digamma1p(a0)
    g_a0 = tl.where(a0 >= 8.0, _g_series(tl.maximum(a0, 8.0)), psi_a0 - tl.log(a0))
    data = tl.zeros([BLOCK], tl.float32)
    mi = tl.zeros([BLOCK], tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        alpha = tl.load(alpha_ptr + row * stride + idx, mask=mask, other=1.0).to(tl.float32)
        psi = digamma1p(alpha)
        g = tl.where(alpha >= 8.0, _g_series(tl.maximum(alpha, 8.0)), psi - tl.log(alpha))
        data += tl.where(mask, tl.maximum(psi_a0 - psi, 0.0) * alpha, 0.0)
        mi += tl.where(mask, tl.maximum(g - g_a0, 0.0) * alpha, 0.0)
    data_value = tl.sum(data, 0) / a0
    mi_value = tl.sum(mi, 0) / a0
    epkl = (K - 1) / a0
    out = out_ptr + row * 5  # COLUMNS
    tl.store(out, data_value + mi_value)
    tl.store(out + 1, data_value)
    tl.store(out + 2, mi_value)
    tl.store(out + 3, epkl)
    tl.store(out + 4, tl.maximum(epkl - mi_value, 0.0))
    tl.store(a0_ptr + row, a0)
    tl.store(bad_ptr + row, bad.to(tl.int8))


def dirichlet_rows(alpha: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five measures (n, 5) and ``a0`` (n,) (float32), and the invalid rows (n,) (bool) of ``alpha`` (n, K)."""
    n, k = alpha.shape
    if alpha.stride(-1) != 1:
        alpha = alpha.contiguous()
    out = alpha.new_empty(n, COLUMNS, dtype=torch.float32)
    a0 = alpha.new_empty(n, dtype=torch.float32)
    bad = alpha.new_empty(n, dtype=torch.int8)
    if n:
        block = row_block(k, MAX_BLOCK)
        _dirichlet_measures_kernel[(n,)](alpha, out, a0, bad, k, alpha.stride(0), BLOCK=block)
    return out, a0, bad.bool()
