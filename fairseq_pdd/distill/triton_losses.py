"""The four distillation losses as one Triton kernel: value, log-normaliser and gradient per row.

Same formulas, arguments and results as :mod:`fairseq_pdd.distill.losses` (which stays the reference and
the CPU path; :mod:`fairseq_pdd.distill.backend` picks). One program handles one row of the (N, K)
logits in two passes over it, in tiles of ``BLOCK`` classes:

1. the row's reductions: ``a0 = sum_k alpha_k`` and ``b0 = sum_k beta_k`` for the Dirichlet losses, the
   running maximum and sum of ``exp`` (``logsumexp(z)``) for KD;
2. the per-class terms of the value, summed, and the gradient ``dL/dz`` written to its (N, K) output.

So the logits and targets are read twice and the gradient written once, nothing else (N, K) exists:
peak memory is the logits, the targets and the gradient. Arithmetic is float32 whatever the logits'
dtype (float16 / bfloat16 logits are read as they are); the gradient is stored in the dtype the torch
path uses (:func:`fairseq_pdd.distill.fused.gradient_dtype`). digamma, trigamma and lgamma are those of
:mod:`fairseq_pdd.distill.special`.

Per class, with ``alpha = clamp(f(z)) + model_offset``, ``e = d alpha / dz`` (:mod:`.dirichlet`):

* rkl: ``beta = B p + 1``; ``L = [lnG(a0) - lnG(b0) + sum_k (lnG(beta_k) - lnG(alpha_k)
  + (alpha_k - beta_k)(psi(alpha_k) - psi(a0)))] / B``;
  ``dL/dz_k = e_k [(alpha_k - beta_k) psi1(alpha_k) - (a0 - b0) psi1(a0)] / B``;
* fkl: ``beta = beta0 p + target_offset``; ``L = lnG(b0) - lnG(a0) + sum_k (lnG(alpha_k) - lnG(beta_k)
  + (beta_k - alpha_k)(psi(beta_k) - psi(b0)))``; ``dL/dz_k = e_k [psi(alpha_k) - psi(a0) - psi(beta_k) + psi(b0)]``;
* nll: ``L = sum_k (lnG(alpha_k) - (alpha_k - 1) mlog_k) - lnG(a0)``;
  ``dL/dz_k = e_k [psi(alpha_k) - psi(a0) - mlog_k]``;
* kd: ``L = sum_k (p_k log p_k - p_k (z_k - lse))``, ``lse = logsumexp(z)``; ``dL/dz_k = exp(z_k - lse) - p_k``.

A scale ``s`` of the logits (``logit_scale``, a tempered student's 1/T) multiplies them as they are read and
the stored gradient (``dL/dz = s dL/d(s z)``), so ``z / T`` is never materialised.

Importing this module needs ``triton``; on CPU tensors the kernel runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` before triton is imported).
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fairseq_pdd.distill import dirichlet, fused
from fairseq_pdd.distill.special import (
    digamma, digamma_and_trigamma, lgamma, logsumexp_finish, logsumexp_start, logsumexp_update, row_block, trigamma,
)

#: Loss ids of the kernel's ``LOSS`` switch.
LOSS_IDS = {"rkl": 0, "fkl": 1, "nll": 2, "kd": 3}
_RKL, _FKL, _NLL, _KD = (tl.constexpr(i) for i in range(4))
_SOFTPLUS = tl.constexpr(dirichlet.PARAMETRIZATIONS.index("softplus"))
_ALPHA_MIN = tl.constexpr(dirichlet.ALPHA_MIN)
#: Largest tile of classes one program handles at a time (4 warps). ptxas for sm_90: 63-80 registers and no
#: spills at 512; at 1024 the fkl kernel needs 255 registers and spills.
MAX_BLOCK = 512


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (the rounding of 1 + x is corrected)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _alpha_and_derivative(z, upper, model_offset, PARAM: tl.constexpr):
    """``alpha = clamp(f(z), ALPHA_MIN, upper) + model_offset`` and ``d alpha / dz`` (0 where clamped)."""
    if PARAM == _SOFTPLUS:  # torch's softplus: z itself above 20
        raw = tl.where(z > 20.0, z, _log1p(tl.exp(z)))
        derivative = tl.sigmoid(z)
    else:
        raw = tl.exp(z)
        derivative = raw
    inside = (raw >= _ALPHA_MIN) & (raw <= upper)
    alpha = tl.minimum(tl.maximum(raw, _ALPHA_MIN), upper) + model_offset
    return alpha, tl.where(inside, derivative, 0.0)


@triton.jit
def _token_loss_kernel(
    z_ptr, t_ptr, s_ptr, loss_ptr, log_norm_ptr, grad_ptr,
    K, z_stride, t_stride, g_stride, upper, model_offset, target_offset, z_scale,
    LOSS: tl.constexpr, PARAM: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    if LOSS == _RKL:
        scale = tl.load(s_ptr + row).to(tl.float32)
        shift = 1.0
    elif LOSS == _FKL:
        scale = tl.load(s_ptr + row).to(tl.float32)
        shift = target_offset
    else:
        scale = 1.0
        shift = 0.0

    # pass 1: the row's reductions
    if LOSS == _KD:  # running maximum per lane, sum of exp(z - maximum)
        first, second = logsumexp_start(BLOCK)
    else:
        first = tl.zeros([BLOCK], tl.float32)
        second = tl.zeros([BLOCK], tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        if LOSS == _KD:
            z = tl.load(z_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * z_scale
            first, second = logsumexp_update(first, second, z)
        else:
            z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32) * z_scale
            alpha, _ = _alpha_and_derivative(z, upper, model_offset, PARAM)
            first += tl.where(mask, alpha, 0.0)
            if LOSS != _NLL:
                p = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32)
                second += tl.where(mask, scale * p + shift, 0.0)
    if LOSS == _KD:
        lse = logsumexp_finish(first, second)
        log_norm = lse
    else:
        a0 = tl.sum(first, 0)
        b0 = tl.sum(second, 0)
        log_norm = tl.log(a0)
        psi_a0 = digamma(a0)
        if LOSS == _RKL:
            psi1_a0 = trigamma(a0)
        if LOSS == _FKL:
            psi_b0 = digamma(b0)

    # pass 2: the value's terms and the gradient
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, K, BLOCK):
        idx = start + cols
        mask = idx < K
        z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32) * z_scale
        t = tl.load(t_row + idx, mask=mask, other=0.0).to(tl.float32)
        if LOSS == _KD:
            log_q = z - lse
            term = tl.where(t == 0.0, 0.0, t * tl.log(t)) - t * log_q
            grad = tl.exp(log_q) - t
        else:
            alpha, e = _alpha_and_derivative(z, upper, model_offset, PARAM)
            if LOSS == _NLL:
                gap = digamma(alpha) - psi_a0
                term = lgamma(alpha) - (alpha - 1.0) * t
                grad = e * (gap - t)
            else:
                beta = scale * t + shift
                if LOSS == _RKL:
                    diff = alpha - beta
                    psi, psi1 = digamma_and_trigamma(alpha)
                    term = lgamma(beta) - lgamma(alpha) + diff * (psi - psi_a0)
                    grad = e * (diff * psi1 - (a0 - b0) * psi1_a0) / scale
                else:
                    target_gap = digamma(beta) - psi_b0
                    term = lgamma(alpha) - lgamma(beta) + (beta - alpha) * target_gap
                    grad = e * (digamma(alpha) - psi_a0 - target_gap)
        total += tl.where(mask, term, 0.0)
        if NEED_GRAD:
            tl.store(grad_ptr + row * g_stride + idx, (grad * z_scale).to(grad_ptr.dtype.element_ty), mask=mask)

    value = tl.sum(total, 0)
    if LOSS == _RKL:
        value = (value + lgamma(a0) - lgamma(b0)) / scale
    elif LOSS == _FKL:
        value = value + lgamma(b0) - lgamma(a0)
    elif LOSS == _NLL:
        value = value - lgamma(a0)
    tl.store(loss_ptr + row, value)
    tl.store(log_norm_ptr + row, log_norm)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dimension (a copy only when it has not)."""
    return x if x.dim() < 2 or x.stride(-1) == 1 else x.contiguous()


def _compute(loss_id: int, param: int, model_offset: float, target_offset: float, logit_scale: float,
             logits: torch.Tensor, need_grad: bool, target: torch.Tensor, row_scale: Optional[torch.Tensor] = None):
    """``compute`` of :func:`fairseq_pdd.distill.fused.token_loss_with_gradient` by the kernel."""
    n, k = logits.shape
    if target.shape != logits.shape:
        raise ValueError(f"targets of shape {tuple(target.shape)} do not match the logits {tuple(logits.shape)}")
    logits, target = _rows(logits), _rows(target)
    loss = logits.new_empty(n, dtype=torch.float32)
    log_norm = logits.new_empty(n, dtype=torch.float32)
    grad = logits.new_empty(n, k, dtype=fused.gradient_dtype(logits.dtype)) if need_grad else None
    if n:
        scale = target if row_scale is None else row_scale.contiguous()
        block = row_block(k, MAX_BLOCK)
        _token_loss_kernel[(n,)](
            logits, target, scale, loss, log_norm, loss if grad is None else grad,
            k, logits.stride(0), target.stride(0), k, dirichlet.ALPHA_MAX / max(k, 1), model_offset, target_offset,
            logit_scale,
            LOSS=loss_id, PARAM=param, NEED_GRAD=need_grad, BLOCK=block,
        )
    return loss, log_norm, logits.new_empty(n, 0, dtype=torch.float32), grad


def token_loss(
    name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    row_scale: Optional[torch.Tensor] = None,
    parametrization: str = "exp",
    model_offset: float = 0.0,
    target_offset: float = 0.0,
    logit_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (N,) and log-normaliser (N,) of loss ``name`` (:data:`LOSS_IDS`), float32.

    Args:
        logits: (N, K) student logits (float32, float16 or bfloat16), differentiable.
        target: pbar (rkl, fkl, kd) or mlog (nll), (N, K).
        row_scale: B (rkl) or beta0 (fkl), (N,); None for nll and kd.
        logit_scale: s: the loss of ``s * logits``, the gradient with respect to ``logits`` (scaled as read).
    """
    dirichlet.check_parametrization(parametrization)
    compute = functools.partial(
        _compute, LOSS_IDS[name], dirichlet.PARAMETRIZATIONS.index(parametrization), float(model_offset),
        float(target_offset), float(logit_scale),
    )
    targets = (target,) if row_scale is None else (target, row_scale)
    loss, log_norm, _ = fused.token_loss_with_gradient(compute, logits, *targets)
    return loss, log_norm
