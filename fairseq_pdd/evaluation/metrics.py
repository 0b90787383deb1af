"""Uncertainty metrics: OOD detection, prediction-rejection ratio, calibration, token error detection.

All functions take plain arrays and read uncertainty measures as *higher = more uncertain* (apply the
sign convention of :mod:`.aggregate` first). NaN or infinite inputs raise ``ValueError``; results
that are undefined (a single class, all errors equal) are NaN, never an exception.

**OOD detection.** OOD is the positive class. ROC-AUC is ``sklearn.metrics.roc_auc_score``, PR-AUC is
``sklearn.metrics.average_precision_score`` (step-wise AP, not trapezoidal) of the measure. A constant
measure gives ROC-AUC 0.5 and PR-AUC equal to the OOD fraction.

**Prediction-rejection ratio** (Malinin, 2019; Malinin & Gales, 2021). With per-sample errors
``e_i >= 0`` (``1 - sBLEU/100`` or sentence WER) and ``N`` samples, rejecting the ``k`` most
uncertain samples and counting a rejected sample as error 0 (handed to an oracle) gives the
rejection curve ``R(k/N) = (1/N) * sum of e over the N - k retained samples``, ``k = 0..N``.
With ``AR`` the trapezoidal area under a curve over ``[0, 1]``,

    PRR = (AR_random - AR_measure) / (AR_random - AR_oracle),

where the random curve is the straight line ``mean(e) * (1 - k/N)`` (``AR_random = mean(e) / 2``)
and the oracle rejects by decreasing error. PRR is 1 for the oracle ranking, about 0 for a random
one, and negative below random (about -1 for the reverse of the oracle). It is NaN when all errors
are equal (the oracle is no better than random).

*Ties* are resolved deterministically by *expectation*: samples with equal uncertainty form a group
whose errors are replaced by the group mean before accumulating, which is the curve averaged over
every order of rejecting the tied samples. Hence a constant measure gives exactly the random line and
PRR = 0, and the result never depends on the input order. (The reference implementation used
``np.argsort`` order; its curve was sampled at ``(k+1)/N`` instead of ``k/N``.)

**ECE** (token level): equal-width confidence bins ``[b/B, (b+1)/B)`` for ``b = 0..B-1`` with 1.0 in
the last bin; ``ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|`` over non-empty bins.

**Token error detection:** PR-AUC (average precision) of a token measure with *error* as the
positive class, plus ROC-AUC and the error rate (the PR-AUC of a random measure).
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

DEFAULT_ECE_BINS = 15


def _sklearn_metrics():
    """``sklearn.metrics``, imported on first use (about 1.5 s): the commands' ``--help`` starts without it."""
    from sklearn import metrics

    return metrics


def _finite_1d(x, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-d, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: lengths differ ({a.size} vs {b.size})")


# --------------------------------------------------------------------------------------- OOD detection


def ood_detection(in_domain, ood) -> Dict[str, float]:
    """ROC-AUC and PR-AUC of separating ``ood`` (positive) from ``in_domain`` by the measure."""
    s_in, s_ood = _finite_1d(in_domain, "in-domain measure"), _finite_1d(ood, "OOD measure")
    if s_in.size == 0 or s_ood.size == 0:
        raise ValueError("OOD detection needs at least one in-domain and one OOD sample")
    labels = np.r_[np.zeros(s_in.size, dtype=np.int64), np.ones(s_ood.size, dtype=np.int64)]
    scores = np.r_[s_in, s_ood]
    sk = _sklearn_metrics()
    return {
        "roc_auc": float(sk.roc_auc_score(labels, scores)),
        "pr_auc": float(sk.average_precision_score(labels, scores)),
    }


def ood_roc_curve(in_domain, ood) -> Tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the OOD ROC curve (for plotting)."""
    s_in, s_ood = _finite_1d(in_domain, "in-domain measure"), _finite_1d(ood, "OOD measure")
    labels = np.r_[np.zeros(s_in.size, dtype=np.int64), np.ones(s_ood.size, dtype=np.int64)]
    fpr, tpr, _ = _sklearn_metrics().roc_curve(labels, np.r_[s_in, s_ood])
    return fpr, tpr


# ------------------------------------------------------------------------------------ rejection / PRR


@dataclass
class RejectionCurve:
    """Rejection curves at fractions ``k/N``, ``k = 0..N`` (mean error with rejected samples counted as 0)."""

    fraction: np.ndarray
    measure: np.ndarray
    oracle: np.ndarray
    random: np.ndarray
    prr: float


def _retained_error(errors_in_rejection_order: np.ndarray) -> np.ndarray:
    n = errors_in_rejection_order.size
    rejected = np.r_[0.0, np.cumsum(errors_in_rejection_order)]
    return (rejected[-1] - rejected) / n


def _area(curve: np.ndarray) -> float:
    n = curve.size - 1
    return float((curve[:-1] + curve[1:]).sum() / (2.0 * n))


def _tie_averaged_order(errors: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    """Errors sorted by decreasing uncertainty, each tie group replaced by its mean."""
    order = np.argsort(-uncertainty, kind="stable")
    u, e = uncertainty[order], errors[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, u.size])
    return np.repeat(np.add.reduceat(e, starts) / counts, counts)


def rejection_curve(errors, uncertainty) -> RejectionCurve:
    """Rejection curves of ``uncertainty`` (higher = rejected first), the oracle and random, and the PRR."""
    e = _finite_1d(errors, "errors")
    u = _finite_1d(uncertainty, "uncertainty measure")
    _same_length(e, u, "rejection_curve")
    if e.size == 0:
        raise ValueError("rejection_curve needs at least one sample")
    if np.any(e < 0):
        raise ValueError("errors must be >= 0")
    n = e.size
    fraction = np.arange(n + 1) / n
    measure = _retained_error(_tie_averaged_order(e, u))
    oracle = _retained_error(np.sort(e)[::-1])
    random = e.mean() * (1.0 - fraction)
    ar_rnd, ar_orc, ar_unc = e.mean() / 2.0, _area(oracle), _area(measure)
    denom = ar_rnd - ar_orc
    scale = max(abs(ar_rnd), 1e-300)
    prr = float((ar_rnd - ar_unc) / denom) if denom > 1e-12 * scale else float("nan")
    return RejectionCurve(fraction, measure, oracle, random, prr)


def prediction_rejection_ratio(errors, uncertainty) -> float:
    """PRR in [-1, 1]-ish: 1 = oracle, 0 = random; NaN when all errors are equal."""
    return rejection_curve(errors, uncertainty).prr


# ------------------------------------------------------------------------------------------ calibration


def reliability_bins(confidence, correct, n_bins: int = DEFAULT_ECE_BINS) -> Dict[str, np.ndarray]:
    """Per equal-width bin: ``count``, ``accuracy``, ``confidence`` (NaN for empty bins) and the ``edges``."""
    conf = _finite_1d(confidence, "confidence")
    corr = _finite_1d(correct, "correctness")
    _same_length(conf, corr, "reliability_bins")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidence must lie in [0, 1]")
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=corr, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return {"count": count, "accuracy": acc, "confidence": mean_conf, "edges": np.linspace(0.0, 1.0, n_bins + 1)}


def expected_calibration_error(confidence, correct, n_bins: int = DEFAULT_ECE_BINS) -> float:
    """Token-level ECE with ``n_bins`` equal-width bins (NaN when there are no tokens)."""
    b = reliability_bins(confidence, correct, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    full = b["count"] > 0
    return float(np.sum(b["count"][full] / n * np.abs(b["accuracy"][full] - b["confidence"][full])))


# ------------------------------------------------------------------------------ token error detection


def error_detection(scores, labels) -> Dict[str, float]:
    """PR-AUC (average precision) and ROC-AUC of ``scores`` for detecting ``labels == 1`` (errors)."""
    s = _finite_1d(scores, "token measure")
    y = _finite_1d(labels, "error labels")
    _same_length(s, y, "error_detection")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("error labels must be 0/1")
    n_pos = int(y.sum())
    out = {"error_rate": float(y.mean()) if y.size else float("nan"), "pr_auc": float("nan"), "roc_auc": float("nan")}
    if 0 < n_pos < y.size:
        sk = _sklearn_metrics()
        out["pr_auc"] = float(sk.average_precision_score(y, s))
        out["roc_auc"] = float(sk.roc_auc_score(y, s))
    return out
