"""The four distillation losses, per token, with closed-form gradients (pure torch).

Shapes: student logits ``z`` (N, K) for the N non-padding target positions; ensemble statistics as
in :mod:`fairseq_pdd.distill.ensemble_stats`. Each function returns the per-token loss (N,) in float32
(float64 for float64 logits), whose gradient flows to ``z`` only (teacher quantities are targets),
and the log-normaliser of the student's predictive (N,): ``log a0`` for the Dirichlet losses
(predictive ``alpha / a0``), ``logsumexp(z)`` for KD (predictive ``softmax(z)``).
``alpha = f(z) + model_offset`` as in :mod:`fairseq_pdd.distill.dirichlet`; psi = digamma,
psi1 = trigamma, lnG = lgamma, ``e = d alpha / d z``.

* :func:`rkl_proxy_loss` (PD-EnD2) ``KL(Dir(alpha) || Dir(beta)) / B`` with ``beta = B pbar + 1``,
  ``B = beta0 + K * target_offset``. Up to terms constant in alpha this is
  ``-sum_k pbar_k (psi(alpha_k) - psi(a0)) - H[Dir(alpha)] / B``; the full KL is returned so the
  value is >= 0. ``dL/dz_j = e_j [(alpha_j - beta_j) psi1(alpha_j) - (a0 - b0) psi1(a0)] / B``.
* :func:`fkl_proxy_loss` ``KL(Dir(beta) || Dir(alpha))`` with ``beta = beta0 pbar + target_offset``;
  ``dL/dz_j = e_j [psi(alpha_j) - psi(a0) - psi(beta_j) + psi(b0)]``.
* :func:`dirichlet_nll_loss` (EnD2) ``-(1/M) sum_m log Dir(p_m; alpha)
  = -lnG(a0) + sum_k lnG(alpha_k) - sum_k (alpha_k - 1) mlog_k``;
  ``dL/dz_j = e_j [psi(alpha_j) - psi(a0) - mlog_j]``.
* :func:`mean_kd_loss` (KD to the ensemble mean) ``KL(pbar || softmax(z))``;
  ``dL/dz = softmax(z) - pbar``.

Every function takes ``logit_scale`` s (default 1): the loss is then that of ``s * z`` (``s = 1/T`` for a
tempered student) with the gradient with respect to ``z`` (``dL/dz = s dL/d(s z)``); the scale is applied as
the logits are read, so no scaled (N, K) copy of them exists.

The kernels here are the reference and the CPU path. For CUDA logits (not float64) the same losses run
as one Triton kernel each (:mod:`fairseq_pdd.distill.triton_losses`) when triton imports; the environment
variable ``FAIRSEQ_PDD_KERNELS=auto|torch|triton`` overrides the choice (:mod:`fairseq_pdd.distill.backend`).
"""
from functools import partial

import torch

from fairseq_pdd.distill import backend
from fairseq_pdd.distill.dirichlet import alpha_and_derivative
from fairseq_pdd.distill.fused import chunked_token_loss


def _triton_loss(name, z, target, row_scale=None, **options):
    from fairseq_pdd.distill import triton_losses  # imports triton: only when the backend chose it

    return triton_losses.token_loss(name, z, target, row_scale, **options)


def _digamma_gap(p, p0):
    """``psi(p_k) - psi(p0)`` (n, K): ``E[log pi_k]`` under ``Dir(p)``."""
    return torch.digamma(p) - torch.digamma(p0).unsqueeze(-1)


def _dirichlet_kl(p, p0, q, q0, p_gap):
    """``KL(Dir(p) || Dir(q)) = lnG(p0) - sum lnG(p_k) - lnG(q0) + sum lnG(q_k) + sum (p_k - q_k) p_gap_k``."""
    return (
        torch.lgamma(p0)
        - torch.lgamma(p).sum(-1)
        - torch.lgamma(q0)
        + torch.lgamma(q).sum(-1)
        + ((p - q) * p_gap).sum(-1)
    )


def _rkl_kernel(z, pbar, scale, *, parametrization, offset, need_grad):
    alpha, e = alpha_and_derivative(z, parametrization, offset, need_grad)
    a0 = alpha.sum(-1)
    scale = scale.unsqueeze(-1)
    beta = scale * pbar + 1.0
    b0 = beta.sum(-1)
    loss = _dirichlet_kl(alpha, a0, beta, b0, _digamma_gap(alpha, a0)) / scale.squeeze(-1)
    if not need_grad:
        return loss, None, a0.log()
    grad = (alpha - beta) * torch.polygamma(1, alpha)
    grad -= ((a0 - b0) * torch.polygamma(1, a0)).unsqueeze(-1)
    return loss, grad.mul_(e).div_(scale), a0.log()


def _fkl_kernel(z, pbar, precision, *, parametrization, offset, target_offset, need_grad):
    alpha, e = alpha_and_derivative(z, parametrization, offset, need_grad)
    a0 = alpha.sum(-1)
    beta = precision.unsqueeze(-1) * pbar + target_offset
    b0 = beta.sum(-1)
    target_gap = _digamma_gap(beta, b0)
    kl = _dirichlet_kl(beta, b0, alpha, a0, target_gap)
    if not need_grad:
        return kl, None, a0.log()
    grad = _digamma_gap(alpha, a0) - target_gap
    return kl, grad.mul_(e), a0.log()


def _nll_kernel(z, mean_log_probs, *, parametrization, offset, need_grad):
    alpha, e = alpha_and_derivative(z, parametrization, offset, need_grad)
    a0 = alpha.sum(-1)
    loss = torch.lgamma(alpha).sum(-1) - torch.lgamma(a0) - ((alpha - 1.0) * mean_log_probs).sum(-1)
    if not need_grad:
        return loss, None, a0.log()
    grad = _digamma_gap(alpha, a0) - mean_log_probs
    return loss, grad.mul_(e), a0.log()


def _kd_kernel(z, pbar, *, need_grad):
    log_norm = torch.logsumexp(z, -1)
    log_q = z - log_norm.unsqueeze(-1)
    loss = (torch.xlogy(pbar, pbar) - pbar * log_q).sum(-1)
    if not need_grad:
        return loss, None, log_norm
    return loss, log_q.exp_().sub_(pbar), log_norm


def rkl_proxy_loss(z, mean_probs, scale, parametrization="exp", model_offset=0.0, logit_scale=1.0):
    """PD-EnD2 per-token loss (N,) and ``log a0`` (N,): ``KL(Dir(alpha) || Dir(scale * pbar + 1)) / scale``.

    Args:
        z: (N, K) student logits. mean_probs: pbar (N, K). scale: B (N,).
    """
    if backend.use_triton(z):
        return _triton_loss("rkl", z, mean_probs, scale, parametrization=parametrization, model_offset=model_offset,
                            logit_scale=logit_scale)
    kernel = partial(_rkl_kernel, parametrization=parametrization, offset=model_offset)
    return chunked_token_loss(kernel, z, mean_probs, scale, logit_scale=logit_scale)


def fkl_proxy_loss(z, mean_probs, precision, target_offset=0.0, parametrization="exp", model_offset=0.0,
                   logit_scale=1.0):
    """Forward KL to the proxy per token (N,), and ``log a0`` (N,): ``KL(Dir(precision * pbar + target_offset) || Dir(alpha))``.

    Args:
        z: (N, K) student logits. mean_probs: pbar (N, K). precision: beta0 (N,).
    """
    if backend.use_triton(z):
        return _triton_loss("fkl", z, mean_probs, precision, parametrization=parametrization,
                            model_offset=model_offset, target_offset=target_offset, logit_scale=logit_scale)
    kernel = partial(
        _fkl_kernel, parametrization=parametrization, offset=model_offset, target_offset=target_offset
    )
    return chunked_token_loss(kernel, z, mean_probs, precision, logit_scale=logit_scale)


def dirichlet_nll_loss(z, mean_log_probs, parametrization="exp", model_offset=0.0, logit_scale=1.0):
    """EnD2 per-token loss (N,) and ``log a0`` (N,): mean over members of ``-log Dir(p_m; alpha)``, from mlog (N, K)."""
    if backend.use_triton(z):
        return _triton_loss("nll", z, mean_log_probs, parametrization=parametrization, model_offset=model_offset,
                            logit_scale=logit_scale)
    kernel = partial(_nll_kernel, parametrization=parametrization, offset=model_offset)
    return chunked_token_loss(kernel, z, mean_log_probs, logit_scale=logit_scale)


def mean_kd_loss(z, mean_probs, logit_scale=1.0):
    """KD to the ensemble mean per token (N,): ``KL(pbar || softmax(z))``, and ``logsumexp(z)``."""
    if backend.use_triton(z):
        return _triton_loss("kd", z, mean_probs, logit_scale=logit_scale)
    return chunked_token_loss(_kd_kernel, z, mean_probs, logit_scale=logit_scale)
