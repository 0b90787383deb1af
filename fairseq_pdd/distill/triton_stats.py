"""The ensemble statistics' accumulation as two Triton kernels (the torch reference is
:class:`fairseq_pdd.distill.ensemble_stats.EnsembleAccumulator`, which calls these when
:mod:`fairseq_pdd.distill.backend` chooses Triton).

* :func:`accumulate`: one member's log-probabilities ``l`` (N, K) (float32 / float16 / bfloat16, read as
  they are) into the running sums, in one pass per row: ``sum_p += exp(l)``, ``sum_l += l``, and the
  member's entropy ``H = -sum_k exp(l_k) max(l_k, -FLT_MAX)`` (so ``0 log 0 = 0``) added to ``entropy`` (N,);
  the member's probabilities are written to ``probs`` when it is given. With a per-row weight ``w`` (N,)
  (the expectation-of-products mixture of the beam, ``q = sum_m w_m p_m``) also ``ep += w exp(l)``. The
  first member writes the sums instead of adding to them. From a member's raw logits ``z`` (any of the three
  dtypes, as the model produced them) and a temperature T, a first pass over the row's tiles computes
  ``lse = logsumexp(z / T)`` (online, :func:`fairseq_pdd.distill.special.logsumexp_update`) and the second
  pass uses ``l = z / T - lse``: the (N, K) log-probabilities are never written, and the kernel also reports
  per row whether they are all finite.
* :func:`finalize`: divides the sums by M in place (``pbar``, ``mlog``) and returns the per-row
  ``H[pbar] = -sum_k pbar_k log max(pbar_k, FLT_TINY)`` and ``-sum_k pbar_k mlog_k``, in one pass; with
  ``ep`` also ``H[q]`` and ``-sum_k q_k max(mlog_k, -FLT_MAX)`` in the same pass.

Against the torch path (exp into a buffer, two in-place adds, a clamp and a product into a scratch, a row
sum; for the mixture a product-add per member and an entropy and a clamped product at the end), the (N, K)
traffic of a member drops from about ten passes to four (read l, read and write the two sums), six with
the mixture, five with ``probs``; no scratch buffer is needed. From logits, the member's input is read twice
but at its own width (2 bytes for half precision), and torch's ``log_softmax`` (a read, a write of the (N, K)
float32 log-probabilities and their read here) is gone. Arithmetic in float32. Memory does not grow
with M: the sums (and the mixture) are the only (N, K) buffers.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fairseq_pdd.distill.special import logsumexp_finish, logsumexp_start, logsumexp_update, row_block

#: Largest tile of classes one program handles at a time.
MAX_BLOCK = 1024
_FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
_FLT_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _accumulate_kernel(
    x_ptr, sum_p_ptr, sum_lp_ptr, probs_ptr, entropy_ptr, ep_ptr, weight_ptr, finite_ptr, K, x_stride, weight_stride,
    inv_t, FIRST: tl.constexpr, WRITE_PROBS: tl.constexpr, MIXTURE: tl.constexpr, LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    if MIXTURE:
        weight = tl.load(weight_ptr + row * weight_stride).to(tl.float32)
    if LOGITS:  # pass 1: lse = logsumexp(z / T)
        top, exp_sum = logsumexp_start(BLOCK)
        for start in range(0, K, BLOCK):
            idx = start + cols
            z = tl.load(x_row + idx, mask=idx < K, other=float("-inf")).to(tl.float32)
            top, exp_sum = logsumexp_update(top, exp_sum, z * inv_t)
        lse = logsumexp_finish(top, exp_sum)
        bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        lp = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        if LOGITS:
            lp = lp * inv_t - lse
            finite = (tl.abs(lp) <= _FLT_MAX).to(tl.int32)  # 0 for inf and NaN
            bad += tl.where(mask, 1 - finite, 0)
        p = tl.exp(lp)
        total += tl.where(mask, tl.maximum(lp, -_FLT_MAX) * p, 0.0)
        out = row * K + idx
        if FIRST:
            tl.store(sum_p_ptr + out, p, mask=mask)
            tl.store(sum_lp_ptr + out, lp, mask=mask)
        else:
            tl.store(sum_p_ptr + out, tl.load(sum_p_ptr + out, mask=mask) + p, mask=mask)
            tl.store(sum_lp_ptr + out, tl.load(sum_lp_ptr + out, mask=mask) + lp, mask=mask)
        if WRITE_PROBS:
            tl.store(probs_ptr + out, p, mask=mask)
        if MIXTURE:
            if FIRST:
                tl.store(ep_ptr + out, weight * p, mask=mask)
            else:
                tl.store(ep_ptr + out, tl.load(ep_ptr + out, mask=mask) + weight * p, mask=mask)
    entropy = -tl.sum(total, 0)
    if FIRST:
        tl.store(entropy_ptr + row, entropy)
    else:
        tl.store(entropy_ptr + row, tl.load(entropy_ptr + row) + entropy)
    if LOGITS:
        tl.store(finite_ptr + row, (tl.sum(bad, 0) == 0).to(tl.int8))


@triton.jit
def _finalize_kernel(sum_p_ptr, sum_lp_ptr, entropy_ptr, cross_ptr, ep_ptr, ep_entropy_ptr, ep_cross_ptr, K, inv_m,
                     MIXTURE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    entropy = tl.zeros([BLOCK], tl.float32)
    cross = tl.zeros([BLOCK], tl.float32)
    ep_entropy = tl.zeros([BLOCK], tl.float32)
    ep_cross = tl.zeros([BLOCK], tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        out = row * K + idx
        p = tl.load(sum_p_ptr + out, mask=mask, other=0.0) * inv_m
        lp = tl.load(sum_lp_ptr + out, mask=mask, other=0.0) * inv_m
        tl.store(sum_p_ptr + out, p, mask=mask)
        tl.store(sum_lp_ptr + out, lp, mask=mask)
        entropy += tl.where(mask, tl.log(tl.maximum(p, _FLT_TINY)) * p, 0.0)
        cross += tl.where(mask & (p > 0.0), p * lp, 0.0)  # 0 * log 0 = 0
        if MIXTURE:
            q = tl.load(ep_ptr + out, mask=mask, other=0.0)
            ep_entropy += tl.where(mask, tl.log(tl.maximum(q, _FLT_TINY)) * q, 0.0)
            ep_cross += tl.where(mask, tl.maximum(lp, -_FLT_MAX) * q, 0.0)
    tl.store(entropy_ptr + row, -tl.sum(entropy, 0))
    tl.store(cross_ptr + row, -tl.sum(cross, 0))
    if MIXTURE:
        tl.store(ep_entropy_ptr + row, -tl.sum(ep_entropy, 0))
        tl.store(ep_cross_ptr + row, -tl.sum(ep_cross, 0))


def accumulate(log_probs: torch.Tensor, sum_probs: torch.Tensor, sum_log_probs: torch.Tensor,
               entropy: torch.Tensor, first: bool, probs: Optional[torch.Tensor] = None,
               mixture: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               temperature: Optional[float] = None) -> Optional[torch.Tensor]:
    """Add one member's ``log_probs`` (N, K) to ``sum_probs``, ``sum_log_probs`` (N, K) and ``entropy`` (N,)
    (all float32, contiguous; overwritten when ``first``); its probabilities into ``probs`` when given; with
    ``mixture = (ep, weight)`` also ``weight (N,) * exp(log_probs)`` into ``ep`` (N, K) (float32, contiguous).

    With ``temperature`` T, the first argument is the member's raw logits ``z`` instead, and the member's
    log-probabilities ``log_softmax(z / T)`` are computed per row in the kernel (never stored); returns then
    (N,) bool: whether the row's log-probabilities are all finite (else None)."""
    n, k = log_probs.shape
    if log_probs.stride(-1) != 1:
        log_probs = log_probs.contiguous()
    logits = temperature is not None
    finite = log_probs.new_empty(n, dtype=torch.int8) if logits else None
    ep, weight = mixture if mixture is not None else (sum_probs, entropy)
    if n:
        _accumulate_kernel[(n,)](
            log_probs, sum_probs, sum_log_probs, sum_probs if probs is None else probs, entropy, ep, weight,
            entropy if finite is None else finite, k, log_probs.stride(0), weight.stride(0),
            1.0 / temperature if logits else 1.0, FIRST=first, WRITE_PROBS=probs is not None,
            MIXTURE=mixture is not None, LOGITS=logits, BLOCK=row_block(k, MAX_BLOCK),
        )
    return None if finite is None else finite.bool()


def finalize(sum_probs: torch.Tensor, sum_log_probs: torch.Tensor, num_models: int,
             ep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Divide the sums (N, K) by ``num_models`` in place; return ``H[pbar]`` and ``-sum_k pbar_k mlog_k`` (N,),
    and with the mixture ``ep`` (N, K) also ``H[q]`` and ``-sum_k q_k max(mlog_k, -FLT_MAX)`` (N,)."""
    n, k = sum_probs.shape
    sums = [sum_probs.new_empty(n) for _ in range(2 if ep is None else 4)]
    ep_args = (sum_probs, *sums) if ep is None else (ep, *sums[2:])  # not read without the mixture
    if n:
        _finalize_kernel[(n,)](sum_probs, sum_log_probs, *sums[:2], *ep_args[:3], k, 1.0 / num_models,
                               MIXTURE=ep is not None, BLOCK=row_block(k, MAX_BLOCK))
    return tuple(sums)
