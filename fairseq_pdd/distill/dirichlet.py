"""Dirichlet parametrization of a student's logits and the Proxy-Dirichlet target (pure torch).

Notation (one target position; K classes):
    alpha_k = f(z_k) + model_offset,  f = exp ("exp") or softplus ("softplus"),
    a0 = sum_k alpha_k (the precision),  phat = alpha / a0 (the predictive mean).

``f(z)`` is clamped to ``[ALPHA_MIN, ALPHA_MAX / K]`` so that digamma/trigamma of alpha and lgamma
of a0 stay finite in float32 for any logit; the gradient is zero where the clamp binds (as for
``torch.clamp``). The authors' code divided the bound by the sequence length instead of K.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

#: Added to the denominators of losses (the authors' value, float32 machine epsilon).
EPS_LOSS = 1.19e-7
#: Added inside logarithms of uncertainty measures.
EPS_UNCERTAINTY = 1e-10

PARAMETRIZATIONS = ("exp", "softplus")
TARGET_CONCENTRATIONS = ("mkl", "epkl")

#: Bounds on f(z): trigamma(ALPHA_MIN) ~ 1e26 and lgamma(ALPHA_MAX) ~ 8e20 are finite in float32.
ALPHA_MIN = math.exp(-30.0)
ALPHA_MAX = math.sqrt(torch.finfo(torch.float32).max)


def check_parametrization(parametrization: str) -> None:
    """ValueError naming the choices unless ``parametrization`` is one of :data:`PARAMETRIZATIONS`."""
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose from {PARAMETRIZATIONS}")


def alpha_and_derivative(
    z: torch.Tensor,
    parametrization: str = "exp",
    offset: float = 0.0,
    need_derivative: bool = True,
    num_classes: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dirichlet parameters ``alpha = clamp(f(z)) + offset`` (N, K) and ``d alpha / d z`` (N, K).

    The derivative is None when ``need_derivative`` is False. ``num_classes`` (default: the last
    dimension of ``z``) sets the clamp, for callers that pass a subset of a row.
    """
    check_parametrization(parametrization)
    upper = ALPHA_MAX / (num_classes or z.shape[-1])
    if parametrization == "exp":
        raw = z.exp()
        derivative = raw if need_derivative else None
    else:
        raw = F.softplus(z)
        derivative = torch.sigmoid(z) if need_derivative else None
    clamped = raw.clamp(ALPHA_MIN, upper)
    if need_derivative:
        derivative = torch.where(clamped == raw, derivative, torch.zeros_like(derivative))
    return clamped + offset, derivative


def concentrations(
    z: torch.Tensor, parametrization: str = "exp", offset: float = 0.0, num_classes: Optional[int] = None
) -> torch.Tensor:
    """Differentiable ``alpha`` (..., K) from logits (..., K), with the same clamp as the losses."""
    return alpha_and_derivative(z, parametrization, offset, False, num_classes)[0]


def proxy_precision(
    mkl: torch.Tensor, epkl: torch.Tensor, num_classes: int, mode: str = "mkl", max_precision: float = 0.0
) -> torch.Tensor:
    """Proxy precision from ensemble disagreement (N,).

    ``beta0 = (K - 1) / (2 MKL + eps)`` ("mkl") or ``(K - 1) / (EPKL + eps)`` ("epkl"), then
    ``min(beta0, max_precision)`` when ``max_precision > 0`` (0: no cap).
    """
    if mode == "mkl":
        beta0 = (num_classes - 1) / (2 * mkl + EPS_LOSS)
    elif mode == "epkl":
        beta0 = (num_classes - 1) / (epkl + EPS_LOSS)
    else:
        raise ValueError(f"unknown target concentration {mode!r}; choose from {TARGET_CONCENTRATIONS}")
    if not max_precision >= 0.0:
        raise ValueError(f"the cap on the proxy precision must be >= 0 (0: none), got {max_precision}")
    return beta0.clamp(max=max_precision) if max_precision else beta0
