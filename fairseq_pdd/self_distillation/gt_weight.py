"""Choosing the ground-truth weight ``a`` of a self-distillation step from two students (pure math).

Borup & Andersen (2021) show for kernel ridge regression that the step-``s`` fit is affine in
``a``: ``f_a = f_0 + a (f_1 - f_0)``, where ``f_0`` is the ``a = 0`` student (fit to the teacher
alone) and ``f_1`` the ``a = 1`` student (fit to the labels alone, i.e. the step-0 model, shared by
all steps). The optimal ``a`` then needs two trainings per step instead of a grid search. For deep
models the same estimator treats the ``a``-student as the mixture of the two students' predictions
(an approximation there) and picks ``a`` on held-out data:

* **squared error / Brier** (closed form): with the reference ``r`` (the true function, or one-hot
  held-out labels),

      a* = clip( <f_1 - f_0, r - f_0> / ||f_1 - f_0||^2, 0, 1 )

  which minimises ``||f_a - r||^2`` (a quadratic in ``a``). Over tokens with distributions
  ``p0_t, p1_t`` and labels ``y_t``: ``a* = sum_t <p1_t - p0_t, e(y_t) - p0_t> / sum_t ||p1_t - p0_t||^2``.
* **NLL** (1-D concave search): with ``p0_t, p1_t`` the two students' probabilities of the reference
  token,

      a* = argmax_{a in [0, 1]} g(a),   g(a) = sum_t log(a p1_t + (1 - a) p0_t),
      g'(a) = sum_t (p1_t - p0_t) / (a p1_t + (1 - a) p0_t),   g''(a) = -sum_t (p1_t - p0_t)^2 / (...)^2 <= 0

  so ``g'`` is non-increasing: ``a* = 0`` if ``g'(0) <= 0``, ``1`` if ``g'(1) >= 0``, else the root
  of ``g'``, found by bisection. Needs only two scalars per token, whatever the vocabulary.

If the two students agree exactly every ``a`` is optimal and ``1`` (plain supervised) is returned.
The scalar search runs in float64 on the N per-token values (not a training hot path).
"""
from dataclasses import dataclass

import numpy as np
import torch

#: Bisection stops when the bracket is narrower than this.
TOLERANCE = 1e-10


def _finite_log_probs(log_probs, what: str) -> np.ndarray:
    arr = np.asarray(log_probs, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what}: no tokens")
    if np.isnan(arr).any() or (arr > 1e-6).any():
        raise ValueError(f"{what}: log-probabilities must be <= 0 and not NaN")
    return arr


def mixture_log_probs(a: float, log_p0: np.ndarray, log_p1: np.ndarray) -> np.ndarray:
    """``log(a p1 + (1 - a) p0)`` per token, stable for ``a`` in {0, 1} and tiny probabilities."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(a) + log_p1, np.log1p(-a) + log_p0)


def _slope(a: float, log_p0: np.ndarray, log_p1: np.ndarray) -> float:
    """``g'(a) = sum_t (p1_t - p0_t) / mix_t``."""
    log_mix = mixture_log_probs(a, log_p0, log_p1)
    with np.errstate(over="ignore"):
        return float(np.sum(np.exp(log_p1 - log_mix) - np.exp(log_p0 - log_mix)))


@dataclass
class Estimate:
    """The chosen ``a`` and the held-out objective at ``a``, 0 and 1 (mean per token)."""

    gt_weight: float
    objective: float
    objective_a0: float
    objective_a1: float
    num_tokens: int


def nll_optimal_weight(log_p0, log_p1) -> Estimate:
    """NLL-optimal ``a`` from the reference-token log-probabilities (N,) of the a=0 and a=1 students.

    ``objective*`` are the mean NLLs (nats/token) of the mixture at ``a*``, 0 and 1.
    """
    lp0 = _finite_log_probs(log_p0, "a=0 student")
    lp1 = _finite_log_probs(log_p1, "a=1 student")
    if lp0.shape != lp1.shape:
        raise ValueError(f"the two students scored different numbers of tokens ({lp0.size} vs {lp1.size})")
    if _slope(1.0, lp0, lp1) >= 0.0:
        a = 1.0
    elif _slope(0.0, lp0, lp1) <= 0.0:
        a = 0.0
    else:
        lo, hi = 0.0, 1.0
        while hi - lo > TOLERANCE:
            mid = 0.5 * (lo + hi)
            if _slope(mid, lp0, lp1) > 0.0:
                lo = mid
            else:
                hi = mid
        a = 0.5 * (lo + hi)

    def nll(x):
        return float(-mixture_log_probs(x, lp0, lp1).mean())

    return Estimate(a, nll(a), nll(0.0), nll(1.0), lp0.size)


class BrierStatistics:
    """Streams ``num = sum_t <p1 - p0, e(y) - p0>``, ``den = sum_t ||p1 - p0||^2`` and the two Brier scores."""

    def __init__(self) -> None:
        self.num = self.den = self.brier0 = self.brier1 = 0.0
        self.num_tokens = 0

    @torch.no_grad()
    def add(self, probs0: torch.Tensor, probs1: torch.Tensor, target: torch.Tensor) -> None:
        """Add N tokens: the students' distributions (N, V) and the reference indices (N,)."""
        if probs0.shape != probs1.shape or probs0.dim() != 2 or target.shape != probs0.shape[:1]:
            raise ValueError(
                f"expected two (N, V) distributions and (N,) targets, got {tuple(probs0.shape)}, "
                f"{tuple(probs1.shape)} and {tuple(target.shape)}"
            )
        index = target.long().unsqueeze(-1)
        diff = probs1 - probs0
        at_target0, at_target1 = probs0.gather(-1, index), probs1.gather(-1, index)
        self.num += float((diff.gather(-1, index).squeeze(-1) - (diff * probs0).sum(-1)).sum())
        self.den += float(diff.square().sum())
        # ||p - e(y)||^2 = ||p||^2 - 2 p_y + 1
        self.brier0 += float((probs0.square().sum(-1) - 2 * at_target0.squeeze(-1) + 1).sum())
        self.brier1 += float((probs1.square().sum(-1) - 2 * at_target1.squeeze(-1) + 1).sum())
        self.num_tokens += target.numel()

    def estimate(self) -> Estimate:
        """Brier-optimal ``a``; ``objective*`` are mean Brier scores of the mixture at ``a*``, 0 and 1."""
        if self.num_tokens == 0:
            raise ValueError("no tokens were added")
        a = closed_form_weight(self.num, self.den)
        # ||f_a - r||^2 = ||f_0 - r||^2 - 2 a num + a^2 den
        brier = self.brier0 - 2 * a * self.num + a * a * self.den
        n = self.num_tokens
        return Estimate(a, brier / n, self.brier0 / n, self.brier1 / n, n)


def closed_form_weight(num: float, den: float) -> float:
    """``clip(num / den, 0, 1)``, and 1 when ``den = 0`` (the students agree, every ``a`` is optimal)."""
    if den <= 0.0:
        return 1.0
    return float(min(1.0, max(0.0, num / den)))


def brier_optimal_weight(f0, f1, reference) -> float:
    """Squared-error-optimal ``a`` for arrays of any (equal) shape: predictions of the two students and the reference."""
    f0, f1, r = (np.asarray(x, dtype=np.float64) for x in (f0, f1, reference))
    if not f0.shape == f1.shape == r.shape:
        raise ValueError(f"shapes differ: {f0.shape}, {f1.shape}, {r.shape}")
    diff = f1 - f0
    return closed_form_weight(float(np.sum(diff * (r - f0))), float(np.sum(diff * diff)))
