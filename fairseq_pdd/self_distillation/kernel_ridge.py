"""Self-distillation of kernel ridge regression with ground-truth mixing: the closed forms (numpy).

The theory behind the token-level method (Borup & Andersen, 2021). With a Gram matrix ``K`` (n, n)
of the training inputs, labels ``y`` (n,), ridge ``lam`` and ground-truth weight ``a``, step ``s``
fits the mixed target ``c_s = a y + (1 - a) yhat_{s-1}`` (``yhat_0 = y``), so

    f_s(x) = k(x)^T (K + lam I)^{-1} c_s,        yhat_s = H c_s,   H = K (K + lam I)^{-1}.

With the eigendecomposition ``K = V^T D V`` and ``A = D (D + lam I)^{-1}`` the training predictions
are ``yhat_s = V^T B_s V y`` with the recursion

    B_1 = A,        B_s = A ((1 - a) B_{s-1} + a I),

all diagonal. For ``a > 0`` the limit is ``B_inf = a D (a D + lam I)^{-1}``, i.e. the original problem
with the ridge amplified from ``lam`` to ``lam / a``: ``f_inf(x) = k(x)^T (K + (lam / a) I)^{-1} y``;
for ``a = 0``, ``B_s = A^s -> 0`` (the collapse of pure self-distillation).

The dual coefficients returned here give predictions anywhere: ``f_s(x) = k(x)^T beta_s`` with

    beta_s = V^T (D + lam I)^{-1} (a I + (1 - a) B_{s-1}) V y,      B_0 = I.

The optimal ``a`` of a step is the closed form of :func:`fairseq_pdd.self_distillation.gt_weight.brier_optimal_weight`,
since ``f_s`` is affine in the ``a`` used at step ``s``.
"""
from typing import List

import numpy as np


def _eigen(gram: np.ndarray):
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"the Gram matrix must be square, got shape {gram.shape}")
    d, vt = np.linalg.eigh(gram)  # gram = vt diag(d) vt^T, i.e. V = vt^T
    return np.clip(d, 0.0, None), vt


def spectral_factors(eigenvalues: np.ndarray, lam: float, gt_weight: float, steps: int) -> List[np.ndarray]:
    """The diagonals of ``B_1 .. B_steps`` for the eigenvalues ``D`` of ``K``."""
    d = np.asarray(eigenvalues, dtype=np.float64)
    shrink = d / (d + lam)
    factors, b = [], np.ones_like(d)
    for _ in range(steps):
        b = shrink * ((1.0 - gt_weight) * b + gt_weight)
        factors.append(b)
    return factors


def limit_factor(eigenvalues: np.ndarray, lam: float, gt_weight: float) -> np.ndarray:
    """The diagonal of ``B_inf = a D (a D + lam I)^{-1}`` (zero for ``a = 0``)."""
    d = np.asarray(eigenvalues, dtype=np.float64)
    return gt_weight * d / (gt_weight * d + lam)


def dual_coefficients(gram: np.ndarray, y: np.ndarray, lam: float, gt_weight: float, steps: int) -> List[np.ndarray]:
    """``beta_1 .. beta_steps`` (each (n,)) of the self-distillation chain: ``f_s(x) = k(x)^T beta_s``."""
    if lam <= 0.0:
        raise ValueError(f"the ridge lam must be > 0, got {lam}")
    d, vt = _eigen(gram)
    coords = vt.T @ np.asarray(y, dtype=np.float64)  # V y
    betas, previous = [], np.ones_like(d)  # B_0 = I
    for b in spectral_factors(d, lam, gt_weight, steps):
        betas.append(vt @ ((gt_weight + (1.0 - gt_weight) * previous) * coords / (d + lam)))
        previous = b
    return betas


def limit_dual_coefficients(gram: np.ndarray, y: np.ndarray, lam: float, gt_weight: float) -> np.ndarray:
    """``beta_inf = (K + (lam / a) I)^{-1} y``: infinitely many steps equal a ridge of ``lam / a``."""
    if gt_weight <= 0.0:
        return np.zeros(len(y))
    d, vt = _eigen(gram)
    return vt @ (vt.T @ np.asarray(y, dtype=np.float64) / (d + lam / gt_weight))
