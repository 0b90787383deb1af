"""Token- and sequence-level uncertainty of hypotheses, one set of names for ensembles and Dirichlet students.

Pure torch (no fairseq import). The caller runs the forward passes (decoding, or teacher-forced
re-scoring of an n-best list or of the references) and hands over, for a batch of B hypotheses padded
to T positions, a boolean ``mask`` (B, T) of the hypothesis' tokens (EOS included, as in fairseq's
hypotheses) and either

* a Dirichlet student's concentrations ``alpha`` (B, T, K) and the chosen ``tokens`` (B, T), or
* an ensemble's streamed :class:`~fairseq_pdd.distill.ensemble_stats.EnsembleStatistics` (tensors (B, T) and
  (B, T, K)) plus the members' log-probabilities of the chosen tokens (M, B, T);
  :class:`EnsembleHypothesisAccumulator` collects all of it member by member.

Notation: ``y_t`` the chosen token at position t, ``L`` the hypothesis length (``mask.sum(-1)``),
``p_m`` the members' distributions, ``pbar = mean_m p_m``, ``phat = alpha / a0``.

**Token measures** (B, T); names shared by both model kinds:

============================  =====================================  =====================================
key                           ensemble                               Dirichlet
============================  =====================================  =====================================
``total_uncertainty``         ``H[pbar]``                            ``H[phat]``
``data_uncertainty``          ``mean_m H[p_m]``                      ``E_pi H[pi]``
``mutual_information``        total - data                           total - data = ``E_pi KL(pi || phat)``
``epkl``                      ``-sum pbar mlog - data``              ``(K - 1) / a0``
``mkl``                       ``mean_m KL(pbar || p_m)``             ``E_pi KL(phat || pi)``
``nll``                       ``-log pbar(y_t)``                     ``-log phat(y_t)``
``expected_nll``              ``-mean_m log p_m(y_t)``               ``-E_pi log pi(y_t)``
``nll_mkl``                   expected_nll - nll (>= 0)              expected_nll - nll (>= 0)
============================  =====================================  =====================================

The first five use the whole distribution at position t ("chain-rule" terms); the ``nll`` family uses
only the chosen token (single-sample, "joint-sequence" terms). Ensembles also give the
expectation-of-products ("EP") variants ``ep_total_uncertainty``, ``ep_mutual_information``,
``ep_epkl``, ``ep_mkl`` (from the EP predictive, see :func:`ensemble_token_measures`) and ``ep_nll``,
``ep_nll_mkl`` (see :func:`ensemble_target_measures`). The plain names are the product-of-expectations
("PE") versions: ``pbar`` is the per-token mean of the members. A Dirichlet student has one
distribution per token, so its PE and EP coincide and it has no ``ep_*`` keys.

**Sequence measures** (B,) (:func:`sequence_measures`): every token measure averaged over the
hypothesis' tokens, under the same key (so ``sequence["nll"] = -log P(y) / L``, the authors'
``pe_sTU``), plus ``log_prob = sum_t log P(y_t | y_<t)`` and ``score = log_prob / L``; ensembles add
``ep_log_prob``, ``var``, ``var_combo``, ``logvar``, ``logvar_combo`` (:func:`ensemble_sequence_measures`).

**n-best** (:func:`nbest_aggregate`): one value per source, importance-weighted ("bs") or uniform ("mc").

:data:`AUTHORS_TOKEN_NAMES`, :data:`AUTHORS_SEQUENCE_NAMES` and :data:`AUTHORS_LABELS` map the names of
the authors' fork to these (:func:`to_authors_names` renames a dict).

Numerics: float32 (half precision is upcast; float64 stays float64). The Dirichlet MI and MKL are sums
of non-negative terms computed without cancellation (asymptotic series for large alpha), so they are
>= 0 and accurate even for precisions of 1e8. Inputs are validated (shapes, NaN, alpha > 0) with one
device sync per call; pass ``validate=False`` to skip the value checks.
"""
import math
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from fairseq_pdd.distill import backend
from fairseq_pdd.distill.dirichlet import EPS_UNCERTAINTY
from fairseq_pdd.distill import ensemble_stats
from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator, EnsembleStatistics
from fairseq_pdd.distill.fused import CHUNK_ELEMENTS, compute_dtype

Measures = Dict[str, torch.Tensor]

#: Member log-probabilities of chosen tokens are floored here (instead of -inf), so that the EP weights
#: ``softmax_m(log P_m(y_<t))`` stay defined when a member gives a chosen token probability 0.
LOG_PROB_FLOOR = -1e30

DIRICHLET_TOKEN_KEYS = ("total_uncertainty", "data_uncertainty", "mutual_information", "epkl", "mkl")
TARGET_KEYS = ("nll", "expected_nll", "nll_mkl")
EP_TOKEN_KEYS = ("ep_total_uncertainty", "ep_mutual_information", "ep_epkl", "ep_mkl")
EP_TARGET_KEYS = ("ep_nll", "ep_nll_mkl")
ENSEMBLE_SEQUENCE_KEYS = ("ep_log_prob", "var", "var_combo", "logvar", "logvar_combo")
WEIGHTINGS = ("bs", "mc")

# x >= _SERIES_MIN uses the asymptotic series of digamma (truncation error < 1 / (240 x^8) ~ 3e-10).
_SERIES_MIN = 8.0


# ----------------------------------------------------------------------------------------------
# Dirichlet


def _digamma_gap(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``g(x) = psi(x + 1) - log x`` (kind "g") or ``h(x) = log x - psi(x)`` (kind "h"), both ~ 1/(2x).

    Both are positive and decreasing (g + h = 1/x). Computed directly below :data:`_SERIES_MIN` and by
    ``1/(2x) -+ 1/(12x^2) +- 1/(120x^4) -+ 1/(252x^6)`` above it, where the direct difference would
    cancel (at x = 1e6 it has no correct digit in float32). For (n, K) rows see :func:`_gap_g_rows`.
    """
    big = x >= _SERIES_MIN
    xs = torch.where(big, x, torch.full_like(x, _SERIES_MIN))
    inv = xs.reciprocal()
    inv2 = inv * inv
    tail = inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 / 252))
    xd = torch.where(big, torch.ones_like(x), x)
    if kind == "g":
        return torch.where(big, 0.5 * inv - tail, torch.digamma(xd + 1) - torch.log(xd))
    return torch.where(big, 0.5 * inv + tail, torch.log(xd) - torch.digamma(xd))


def _gap_g_rows(alpha: torch.Tensor, psi_alpha1: torch.Tensor, out: torch.Tensor, big: torch.Tensor
                ) -> torch.Tensor:
    """``g(alpha)`` of :func:`_digamma_gap` for (n, K) rows, into ``out``, given ``psi(alpha + 1)``: the
    direct difference everywhere, then the series at the (few) entries ``alpha >= _SERIES_MIN`` (``big``:
    a bool buffer of the same shape, overwritten)."""
    g = torch.log(alpha, out=out).neg_().add_(psi_alpha1)
    torch.ge(alpha, _SERIES_MIN, out=big)
    return g.masked_scatter_(big, _digamma_gap(alpha.masked_select(big), "g"))


def _dirichlet_rows(alpha: torch.Tensor, tokens: Optional[torch.Tensor], workspace: ensemble_stats.Workspace
                    ) -> Tuple[Measures, torch.Tensor]:
    """Measures of rows ``alpha`` (n, K) (and chosen ``tokens`` (n,)); also the rows with invalid alpha (n,).

    The (n, K) work is done in three buffers of ``workspace`` (two float, one bool), in place; or, on CUDA,
    by one Triton kernel (:mod:`fairseq_pdd.decoding.triton_measures`, chosen by :mod:`fairseq_pdd.distill.backend`).
    """
    k = alpha.shape[-1]
    if backend.use_triton(alpha):
        from fairseq_pdd.decoding import triton_measures  # imports triton: only when the backend chose it

        columns, a0, bad = triton_measures.dirichlet_rows(alpha)
        out = {key: columns[:, i] for i, key in enumerate(DIRICHLET_TOKEN_KEYS)}
        if tokens is not None:
            alpha_y = alpha.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
            out.update(dirichlet_target_measures(alpha_y, a0))
        return out, bad
    alpha = alpha.to(compute_dtype(alpha.dtype))
    a0 = alpha.sum(-1, keepdim=True)
    psi_alpha1 = torch.add(alpha, 1, out=workspace.like("psi_alpha1", alpha)).digamma_()
    terms = workspace.like("terms", alpha)
    # sum_k phat_k x_k = sum_k alpha_k x_k / a0
    # E H[pi] = sum_k phat_k (psi(a0 + 1) - psi(alpha_k + 1)); every term >= 0.
    torch.sub(torch.digamma(a0 + 1), psi_alpha1, out=terms).clamp_(min=0)
    data = ensemble_stats.dot_rows(terms, alpha, terms) / a0.squeeze(-1)
    # MI = sum_k phat_k (g(alpha_k) - g(a0)); every term >= 0 since g decreases and alpha_k <= a0.
    g = _gap_g_rows(alpha, psi_alpha1, terms, workspace.like("big", alpha, torch.bool))
    mi = ensemble_stats.dot_rows(g.sub_(_digamma_gap(a0, "g")).clamp_(min=0), alpha, terms) / a0.squeeze(-1)
    a0 = a0.squeeze(-1)
    epkl = (k - 1) / a0
    out = {
        "total_uncertainty": data + mi,  # = H[phat], algebraically
        "data_uncertainty": data,
        "mutual_information": mi,
        "epkl": epkl,
        # sum_k phat_k (h(alpha_k) - h(a0)) = EPKL - MI (h = 1/x - g); MKL >= MI >= 0 (h - g decreases).
        "mkl": (epkl - mi).clamp(min=0),
    }
    # rows with an invalid alpha: a NaN makes the minimum NaN, an infinity the sum
    bad = ~(alpha.amin(-1) > 0) | ~torch.isfinite(a0)
    if tokens is not None:
        out.update(dirichlet_target_measures(alpha.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), a0))
    return out, bad


def dirichlet_target_measures(alpha_y: torch.Tensor, a0: torch.Tensor) -> Measures:
    """Chosen-token measures from the chosen class' concentration ``alpha_y`` and the precision ``a0``
    (same shape): ``nll = log a0 - log alpha_y = -log phat(y)``, ``nll_mkl = E_pi[log phat(y) - log pi(y)]
    = h(alpha_y) - h(a0) >= 0`` (``h(x) = log x - psi(x)``) and ``expected_nll = nll + nll_mkl``."""
    nll = torch.log(a0) - torch.log(alpha_y)
    nll_mkl = (_digamma_gap(alpha_y, "h") - _digamma_gap(a0, "h")).clamp(min=0)
    return {"nll": nll, "expected_nll": nll + nll_mkl, "nll_mkl": nll_mkl}


def dirichlet_token_measures(
    alpha: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    validate: bool = True,
    workspace: Optional[ensemble_stats.Workspace] = None,
) -> Measures:
    """Token measures of Dirichlet concentrations ``alpha`` (..., K); each value has shape (...).

    With ``a0 = sum_k alpha_k``, ``phat = alpha / a0``, ``psi`` = digamma, ``pi ~ Dir(alpha)``:

    * ``total_uncertainty  = H[phat] = -sum_k phat_k log phat_k``
    * ``data_uncertainty   = E_pi H[pi] = -sum_k phat_k (psi(alpha_k + 1) - psi(a0 + 1))``
    * ``mutual_information = total - data = E_pi KL(pi || phat) >= 0``
    * ``epkl = E_{pi, pi' iid} KL(pi || pi') = (K - 1) / a0``
    * ``mkl  = E_pi KL(phat || pi) = sum_k phat_k (log phat_k - psi(alpha_k) + psi(a0)) = epkl - MI``

    With ``tokens`` (...) (int64 class ids) also the chosen-token measures:

    * ``nll = -log phat_y``, ``expected_nll = -E_pi log pi_y = psi(a0) - psi(alpha_y)``,
      ``nll_mkl = expected_nll - nll = E_pi[log phat_y - log pi_y] >= 0``.

    Rows are processed in chunks of about ``CHUNK_ELEMENTS`` elements, so the temporaries stay small
    whatever (..., K); they are buffers of ``workspace`` (kept by a caller that calls again, e.g. at every
    decoding step), else of a workspace of this call. ``alpha`` must be finite and > 0 (ValueError
    otherwise, unless ``validate`` is False) at the positions where the optional bool ``mask`` (...) is
    True (everywhere without one); no epsilon is needed since every logarithm is of ``alpha_k > 0`` or
    ``a0``.
    """
    if alpha.dim() < 1:
        raise ValueError("alpha must have a class dimension (..., K)")
    lead, k = alpha.shape[:-1], alpha.shape[-1]
    if tokens is not None and tuple(tokens.shape) != tuple(lead):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match alpha {tuple(alpha.shape)}: "
                         f"expected {tuple(lead)}")
    if mask is not None:
        _check_mask(mask, lead, "alpha's positions")
    rows = alpha.reshape(-1, k)
    flat_tokens = None if tokens is None else tokens.reshape(-1).long()
    workspace = workspace if workspace is not None else ensemble_stats.Workspace()
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    parts, bad = [], []
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        chunk_tokens = None if flat_tokens is None else flat_tokens[start:start + step]
        out, chunk_bad = _dirichlet_rows(chunk, chunk_tokens, workspace)
        parts.append(out)
        bad.append(chunk_bad)
    if not parts:  # no rows
        out, chunk_bad = _dirichlet_rows(rows, flat_tokens, workspace)
        parts, bad = [out], [chunk_bad]
    if validate:
        bad = torch.cat(bad)
        if mask is not None:
            bad = bad & mask.reshape(-1)
        if bool(bad.any()):
            raise ValueError("alpha has NaN, infinite or non-positive values; Dirichlet concentrations must be "
                             "finite and > 0")
    return {key: torch.cat([p[key] for p in parts]).view(lead) for key in parts[0]}


def dirichlet_hypothesis_measures(
    alpha: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, validate: bool = True,
    workspace: Optional[ensemble_stats.Workspace] = None,
) -> Tuple[Measures, Measures]:
    """Token measures (B, T) (0 at padding) and sequence measures (B,) of a Dirichlet student's hypotheses.

    ``alpha`` (B, T, K) at the hypothesis positions (teacher-forced on ``tokens``), ``tokens`` (B, T),
    ``mask`` (B, T) bool. Keys: :data:`DIRICHLET_TOKEN_KEYS` + :data:`TARGET_KEYS`; the sequence dict
    has their means plus ``log_prob = sum_t log phat(y_t)`` and ``score = log_prob / L``.
    """
    _check_mask(mask, tokens.shape, "tokens")
    token = dirichlet_token_measures(alpha, tokens, mask, validate, workspace)
    token = {key: torch.where(mask, value, torch.zeros_like(value)) for key, value in token.items()}
    return token, sequence_measures(token, mask, -token["nll"], validate)


def dirichlet_measures_of(
    distribution_measures: Mapping[str, torch.Tensor],
    alpha_y: torch.Tensor,
    a0: torch.Tensor,
    mask: torch.Tensor,
    validate: bool = True,
) -> Tuple[Measures, Measures]:
    """:func:`dirichlet_hypothesis_measures` from the distribution measures (B, T) already computed
    (:data:`DIRICHLET_TOKEN_KEYS`, e.g. step by step during beam search) and the chosen tokens'
    concentrations ``alpha_y`` and precisions ``a0`` (B, T) (any value at padding)."""
    one = torch.ones_like(a0)
    token = dict(distribution_measures)
    token.update(dirichlet_target_measures(torch.where(mask, alpha_y, one), torch.where(mask, a0, one)))
    token = {key: torch.where(mask, value, torch.zeros_like(value)) for key, value in token.items()}
    return token, sequence_measures(token, mask, -token["nll"], validate)


# ----------------------------------------------------------------------------------------------
# Ensembles


def ensemble_token_measures(stats: EnsembleStatistics, ep_mean_probs: Optional[torch.Tensor] = None,
                            scratch: Optional[torch.Tensor] = None) -> Measures:
    """The Dirichlet student's five token measures for an ensemble (DESIGN.md section 2); shape of ``stats``.

    ``total_uncertainty = H[pbar]``, ``data_uncertainty = EH = mean_m H[p_m]``, ``mutual_information =
    H[pbar] - EH``, ``epkl = -sum_k pbar_k mlog_k - EH``, ``mkl = -sum_k pbar_k mlog_k - H[pbar]``
    (``mlog = mean_m log p_m``); the three disagreements are clamped at 0 against float32 rounding.

    With ``ep_mean_probs`` (the expectation-of-products predictive ``q_t = sum_m w_{m,t} p_m(. | y_<t)``,
    ``w_{m,t} = softmax_m(log P_m(y_<t))``, same shape as ``stats.mean_probs``; see
    :class:`EnsembleHypothesisAccumulator`) also the authors' EP variants, with ``q`` in place of ``pbar``
    and ``EH``, ``mlog`` still uniform over members:
    ``ep_total_uncertainty = H[q]``, ``ep_mutual_information = H[q] - EH``,
    ``ep_epkl = -sum_k q_k mlog_k - EH``, ``ep_mkl = -sum_k q_k mlog_k - H[q] = mean_m KL(q || p_m) >= 0``.
    ``ep_mutual_information`` and ``ep_epkl`` can be negative (EH is not q-weighted); they are not clamped.
    For one member every disagreement measure is exactly 0. ``scratch`` (like ``ep_mean_probs``), when
    given, is overwritten instead of allocating the EP variants' (N, K) temporary. Without
    ``ep_mean_probs``, statistics accumulated with the EP weights (``EnsembleAccumulator.add(..., weight=)``,
    as in the beam) give the EP variants from their ``H[q]`` and ``-sum_k q_k mlog_k``.
    """
    out = {
        "total_uncertainty": stats.entropy_of_expected,
        "data_uncertainty": stats.expected_entropy,
        "mutual_information": stats.mutual_information,
        "epkl": stats.epkl,
        "mkl": stats.mkl,
    }
    if ep_mean_probs is not None:
        if ep_mean_probs.shape != stats.mean_probs.shape:
            raise ValueError(f"ep_mean_probs of shape {tuple(ep_mean_probs.shape)} do not match the ensemble "
                             f"statistics {tuple(stats.mean_probs.shape)}")
        q = ep_mean_probs.to(stats.mean_probs.dtype)
        entropy, cross = ensemble_stats.mixture_entropies(q, stats.mean_log_probs, scratch)
    elif stats.mixture_entropy is not None:
        entropy, cross = stats.mixture_entropy, stats.mixture_cross_entropy
    else:
        return out
    out.update(
        ep_total_uncertainty=entropy,
        ep_mutual_information=entropy - stats.expected_entropy,
        ep_epkl=cross - stats.expected_entropy,
        ep_mkl=(cross - entropy).clamp(min=0),
    )
    if stats.num_models == 1:  # q = pbar = p_1: no disagreement, exactly
        out.update({key: torch.zeros_like(entropy) for key in ("ep_mutual_information", "ep_epkl", "ep_mkl")})
    return out


def _member_log_probs(member_token_log_probs: torch.Tensor, mask: torch.Tensor, validate: bool) -> torch.Tensor:
    """(M, B, T) float64, floored at LOG_PROB_FLOOR, 0 at padding; shape and NaN checks."""
    if member_token_log_probs.dim() != 3 or member_token_log_probs.shape[1:] != mask.shape:
        raise ValueError(f"member_token_log_probs must be (M, B, T) with (B, T) = {tuple(mask.shape)}, got "
                         f"{tuple(member_token_log_probs.shape)}")
    if member_token_log_probs.shape[0] == 0:
        raise ValueError("member_token_log_probs has no ensemble member (M = 0)")
    lp = member_token_log_probs.double()
    if validate and bool(((torch.isnan(lp) | (lp == math.inf)) & mask).any()):
        raise ValueError("member_token_log_probs has NaN or +inf values at hypothesis tokens")
    return torch.where(mask, lp.clamp(min=LOG_PROB_FLOOR), torch.zeros_like(lp))


def ensemble_target_measures(
    member_token_log_probs: torch.Tensor, mask: torch.Tensor, validate: bool = True
) -> Measures:
    """Chosen-token measures (B, T) of an ensemble from the members' ``log p_m(y_t | y_<t)`` (M, B, T).

    * ``nll = -log pbar(y_t) = -(logsumexp_m log p_m(y_t) - log M)``      (authors: ``token_pe_TU``)
    * ``expected_nll = -mean_m log p_m(y_t)``                              (``token_DU``)
    * ``nll_mkl = expected_nll - nll >= 0`` (Jensen)                       (``token_pe_MKL``)
    * ``ep_nll = -log P_EP(y_t | y_<t) = -log sum_m w_{m,t} p_m(y_t)``, ``w_{m,t} = softmax_m(c_{m,t})``,
      ``c_{m,t} = sum_{s<t} log p_m(y_s)``, where ``P_EP(y) = mean_m P_m(y)``; so
      ``sum_t ep_nll = -log P_EP(y)``                                     (``token_ep_TU``)
    * ``ep_nll_mkl = expected_nll - ep_nll`` (may be negative)             (``token_ep_MKL``)

    Computed in float64 (the tensors are small), returned in float32; 0 at padding.
    """
    _check_mask(mask, mask.shape, "mask")
    lp = _member_log_probs(member_token_log_probs, mask, validate)
    log_m = math.log(lp.shape[0])
    log_pbar = torch.logsumexp(lp, 0) - log_m
    mean_lp = lp.mean(0)
    prefix = lp.cumsum(-1) - lp
    log_ep = torch.logsumexp(prefix + lp, 0) - torch.logsumexp(prefix, 0)
    out = {
        "nll": -log_pbar,
        "expected_nll": -mean_lp,
        "nll_mkl": (log_pbar - mean_lp).clamp(min=0),
        "ep_nll": -log_ep,
        "ep_nll_mkl": log_ep - mean_lp,
    }
    dtype = compute_dtype(member_token_log_probs.dtype)
    return {key: torch.where(mask, value, torch.zeros_like(value)).to(dtype) for key, value in out.items()}


def ensemble_sequence_measures(
    member_token_log_probs: torch.Tensor, mask: torch.Tensor, validate: bool = True
) -> Measures:
    """Sequence measures (B,) of an ensemble that are not means of token measures.

    With ``log P_m(y) = sum_t log p_m(y_t | y_<t)`` and ``x_m = log P_m(y) / L``:

    * ``ep_log_prob = log mean_m P_m(y) = logsumexp_m log P_m(y) - log M`` (expectation of products;
      ``log_prob`` of :func:`sequence_measures` is the product of expectations ``sum_t log pbar(y_t)``).
      ``-ep_log_prob / L`` equals the mean of the token ``ep_nll`` (the authors' ``ep_sTU``).
    * ``var = Var_m[exp(x_m)]`` (population variance of the per-token geometric-mean probabilities),
      ``logvar = Var_m[x_m]``;
    * ``var_combo = var / (eps + exp(ep_log_prob / L)) - 1`` and
      ``logvar_combo = logvar / (eps + mean_m x_m) - 1`` (eps = EPS_UNCERTAINTY): the authors'
      ``combo``/``logcombo`` heuristics, kept for parity. NB ``mean_m x_m < 0``, so ``logvar_combo``
      *decreases* as the members disagree more, unlike every other measure here.
    """
    _check_mask(mask, mask.shape, "mask")
    lp = _member_log_probs(member_token_log_probs, mask, validate)
    lengths = _lengths(mask, validate)
    seq = lp.sum(-1)  # (M, B)
    ep_log_prob = torch.logsumexp(seq, 0) - math.log(seq.shape[0])
    x = seq / lengths
    var = x.exp().var(0, unbiased=False)
    logvar = x.var(0, unbiased=False)
    out = {
        "ep_log_prob": ep_log_prob,
        "var": var,
        "var_combo": var / (EPS_UNCERTAINTY + (ep_log_prob / lengths).exp()) - 1,
        "logvar": logvar,
        "logvar_combo": logvar / (EPS_UNCERTAINTY + x.mean(0)) - 1,
    }
    dtype = compute_dtype(member_token_log_probs.dtype)
    return {key: value.to(dtype) for key, value in out.items()}


def ensemble_hypothesis_measures(
    stats: EnsembleStatistics,
    member_token_log_probs: torch.Tensor,
    mask: torch.Tensor,
    ep_mean_probs: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> Tuple[Measures, Measures]:
    """Token measures (B, T) (0 at padding) and sequence measures (B,) of an ensemble's hypotheses.

    ``stats`` has (B, T) statistics (feed :class:`~fairseq_pdd.distill.ensemble_stats.EnsembleAccumulator`
    with (B, T, K) log-probabilities), ``member_token_log_probs`` (M, B, T). Token keys:
    :data:`DIRICHLET_TOKEN_KEYS` + :data:`TARGET_KEYS` + :data:`EP_TARGET_KEYS` (+ :data:`EP_TOKEN_KEYS`
    with ``ep_mean_probs``). Sequence keys: their means, ``log_prob = sum_t log pbar(y_t)`` (PE),
    ``score = log_prob / L`` and :data:`ENSEMBLE_SEQUENCE_KEYS`.
    """
    _check_mask(mask, stats.expected_entropy.shape, "the ensemble statistics")
    return ensemble_measures_of(ensemble_token_measures(stats, ep_mean_probs), member_token_log_probs, mask, validate)


def ensemble_measures_of(
    distribution_measures: Mapping[str, torch.Tensor],
    member_token_log_probs: torch.Tensor,
    mask: torch.Tensor,
    validate: bool = True,
) -> Tuple[Measures, Measures]:
    """:func:`ensemble_hypothesis_measures` from the distribution measures (B, T) already computed
    (:func:`ensemble_token_measures`' keys, e.g. step by step during beam search) and the members'
    chosen-token log-probabilities (M, B, T)."""
    token = dict(distribution_measures)
    token.update(ensemble_target_measures(member_token_log_probs, mask, validate))
    token = {key: torch.where(mask, value, torch.zeros_like(value)) for key, value in token.items()}
    sequence = sequence_measures(token, mask, -token["nll"], validate)
    sequence.update(ensemble_sequence_measures(member_token_log_probs, mask, validate=False))
    return token, sequence


class EnsembleHypothesisAccumulator:
    """Everything :func:`ensemble_hypothesis_measures` needs, accumulated one member at a time.

    ``tokens`` (B, T) are the hypotheses (or references), ``mask`` (B, T) their positions. Each
    :meth:`add` takes one member's log-probabilities (B, T, K) at those positions (teacher-forced).
    Memory: the four (B, T, K) buffers of :class:`~fairseq_pdd.distill.ensemble_stats.EnsembleAccumulator`, plus
    one for the EP predictive when ``expectation_of_products`` (exact online softmax over members:
    ``q <- q e^{Z - Z'} + p_m e^{c_m - Z'}``, ``Z' = logaddexp(Z, c_m)``), plus (M, B, T) chosen-token
    log-probabilities; the (B, T, K) ones from ``workspace`` when given (re-used by the next accumulator
    of that workspace: the statistics are valid until then).
    """

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, expectation_of_products: bool = True,
                 workspace: Optional[ensemble_stats.Workspace] = None) -> None:
        _check_mask(mask, tokens.shape, "tokens")
        self.tokens, self.mask = tokens.long(), mask
        self._workspace = workspace if workspace is not None else ensemble_stats.Workspace()
        self._stats = EnsembleAccumulator(self._workspace)
        self._chosen = []
        self._ep = expectation_of_products
        self._log_norm: Optional[torch.Tensor] = None
        self._ep_probs: Optional[torch.Tensor] = None

    def add(self, log_probs: torch.Tensor) -> None:
        """Add one member's log-probabilities (B, T, K)."""
        if log_probs.shape[:-1] != self.tokens.shape:
            raise ValueError(f"ensemble member {len(self._chosen)} gives log-probabilities of shape "
                             f"{tuple(log_probs.shape)}; the hypotheses are {tuple(self.tokens.shape)} (B, T)")
        probs = self._stats.add(log_probs)
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        self._dtype = log_probs.dtype
        chosen = log_probs.gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1).double()
        chosen = torch.where(self.mask, chosen.clamp(min=LOG_PROB_FLOOR), torch.zeros_like(chosen))
        self._chosen.append(chosen)
        if not self._ep:
            return
        prefix = chosen.cumsum(-1) - chosen  # log P_m(y_<t), finite thanks to the floor
        if self._log_norm is None:
            self._log_norm = prefix
            self._ep_probs = self._workspace.like("ep_probs", probs).copy_(probs)
            return
        log_norm = torch.logaddexp(self._log_norm, prefix)
        old = (self._log_norm - log_norm).exp().to(log_probs.dtype).unsqueeze(-1)
        new = (prefix - log_norm).exp().to(log_probs.dtype).unsqueeze(-1)
        self._ep_probs.mul_(old).addcmul_(probs, new)
        self._log_norm = log_norm

    def finalize(self) -> Tuple[EnsembleStatistics, torch.Tensor, Optional[torch.Tensor]]:
        """``(stats, member_token_log_probs (M, B, T), ep_mean_probs (B, T, K) or None)``.

        float32, or float64 for float64 members. Raises ValueError when no member was added.
        """
        stats = self._stats.finalize()
        return stats, torch.stack(self._chosen).to(self._dtype), self._ep_probs

    def measures(self, validate: bool = True) -> Tuple[Measures, Measures]:
        """``finalize()`` then :func:`ensemble_hypothesis_measures`."""
        stats, chosen, ep_probs = self.finalize()
        return ensemble_hypothesis_measures(stats, chosen, self.mask, ep_probs, validate)


# ----------------------------------------------------------------------------------------------
# Sequence and n-best aggregation


def _check_mask(mask: torch.Tensor, shape, what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True at hypothesis tokens), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {what} {tuple(shape)}")


def _lengths(mask: torch.Tensor, validate: bool) -> torch.Tensor:
    lengths = mask.sum(-1)
    if validate and bool((lengths == 0).any()):
        raise ValueError("a hypothesis has no token (empty row in mask); every hypothesis needs at least its EOS")
    return lengths


def sequence_measures(
    token_measures: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    token_log_probs: torch.Tensor,
    validate: bool = True,
) -> Measures:
    """Per-hypothesis (B,) means of token measures (B, T), and the hypothesis log-probability.

    For each key ``u``: ``sequence[u] = (1/L) sum_{t: mask} u_t`` with ``L = mask.sum(-1)``; and
    ``log_prob = sum_{t: mask} token_log_probs_t``, ``score = log_prob / L`` (fairseq's score with
    length penalty 1). Values at padding are ignored (even NaN). ValueError on shape mismatches, a
    non-bool mask, an empty hypothesis, or (``validate``) NaN at hypothesis tokens, naming the keys.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    _check_mask(mask, token_log_probs.shape, "token_log_probs")
    for key, value in token_measures.items():
        if tuple(value.shape) != tuple(mask.shape):
            raise ValueError(f"token measure {key!r} has shape {tuple(value.shape)}, mask {tuple(mask.shape)}")
    lengths = _lengths(mask, validate)
    values = dict(token_measures, log_prob=token_log_probs)
    if validate and values:
        flags = torch.stack([(torch.isnan(v) & mask).any() for v in values.values()]).tolist()
        if any(flags):
            names = [key for key, flag in zip(values, flags) if flag]
            raise ValueError(f"NaN at hypothesis tokens in {', '.join(names)}")
    out = {}
    for key, value in values.items():
        value = value.to(compute_dtype(value.dtype))
        out[key] = torch.where(mask, value, torch.zeros_like(value)).sum(-1)
        if key != "log_prob":
            out[key] = out[key] / lengths
    out["score"] = out["log_prob"] / lengths
    return out


def nbest_weights(
    log_probs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    weighting: str = "bs",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Weights (S, N) over the n-best of S sources; rows sum to 1, 0 where ``mask`` is False.

    ``"bs"``: ``softmax_n(log_probs / temperature)`` over the present hypotheses (importance weights;
    the authors' ``--beam_search``); ``"mc"``: uniform ``1 / N_present``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be (S, N), got shape {tuple(log_probs.shape)}")
    if mask is None:
        mask = torch.ones_like(log_probs, dtype=torch.bool)
    _check_mask(mask, log_probs.shape, "log_probs")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a source has no hypothesis (empty row in mask)")
    if weighting == "mc":
        m = mask.to(compute_dtype(log_probs.dtype))
        return m / m.sum(-1, keepdim=True)
    z = log_probs.to(compute_dtype(log_probs.dtype)) / temperature
    if bool(((torch.isnan(z) | (z == math.inf)) & mask).any()):
        raise ValueError("log_probs has NaN or +inf values for present hypotheses")
    z = torch.where(mask, z, torch.full_like(z, -math.inf))
    if bool((z.amax(-1) == -math.inf).any()):
        raise ValueError("every hypothesis of a source has log-probability -inf: 'bs' weights are undefined")
    return torch.softmax(z, -1)


def nbest_aggregate(
    values: Union[torch.Tensor, Mapping[str, torch.Tensor]],
    log_probs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    weighting: str = "bs",
    temperature: float = 1.0,
    nbest: Optional[int] = None,
) -> Union[torch.Tensor, Measures]:
    """One value per source (S,) from per-hypothesis measures (S, N): ``sum_n w_n u_n``.

    ``w`` from :func:`nbest_weights` (``"bs"``: softmax of the sequence ``log_probs`` / temperature;
    ``"mc"``: uniform), over the first ``nbest`` hypotheses (all when None) that ``mask`` marks present.
    ``values`` is one tensor or a dict of them (then a dict comes back). Use the sequence ``log_prob``
    (PE) as the authors did, or ``ep_log_prob`` for EP weights.
    """
    if nbest is not None:
        if nbest < 1:
            raise ValueError(f"nbest must be >= 1 (or None for all), got {nbest}")
        log_probs = log_probs[:, :nbest]
        mask = None if mask is None else mask[:, :nbest]
    weights = nbest_weights(log_probs, mask, weighting, temperature)
    present = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask

    def reduce(key: str, value: torch.Tensor) -> torch.Tensor:
        if nbest is not None:
            value = value[:, :nbest]
        if value.shape != weights.shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, log_probs {tuple(weights.shape)} (S, N)")
        value = value.to(weights.dtype)
        if bool((torch.isnan(value) & present).any()):
            raise ValueError(f"NaN in {key} for a present hypothesis")
        return (torch.where(present, value, torch.zeros_like(value)) * weights).sum(-1)

    if isinstance(values, torch.Tensor):
        return reduce("values", values)
    return {key: reduce(repr(key), value) for key, value in values.items()}


# ----------------------------------------------------------------------------------------------
# Names of the authors' fork (yandex-research/proxy-dirichlet-distillation), for JSON compatibility

#: ``hypo["token_uncertainties"]`` keys -> ours
AUTHORS_TOKEN_NAMES = {
    "entropy_of_expected": "total_uncertainty",
    "expected_entropy": "data_uncertainty",
    "mutual_information": "mutual_information",
    "EPKL": "epkl",
    "MKL": "mkl",
    "ep_entropy_of_expected": "ep_total_uncertainty",
    "ep_mutual_information": "ep_mutual_information",
    "ep_EPKL": "ep_epkl",
    "ep_MKL": "ep_mkl",
    "token_pe_TU": "nll",
    "token_ep_TU": "ep_nll",
    "token_DU": "expected_nll",
    "token_pe_MKL": "nll_mkl",
    "token_ep_MKL": "ep_nll_mkl",
}

#: ``hypo["sequence_uncertainties"]`` keys -> ours, in the column order of the authors' ``SU-`` lines
AUTHORS_SEQUENCE_NAMES = {
    "pe_entropy_of_expected": "total_uncertainty",
    "expected_entropy": "data_uncertainty",
    "pe_mutual_information": "mutual_information",
    "pe_EPKL": "epkl",
    "pe_sTU": "nll",
    "ep_sTU": "ep_nll",
    "sDU": "expected_nll",
    "ep_sMKL": "ep_nll_mkl",
    "pe_sMKL": "nll_mkl",
    "log-prob": "log_prob",
    "ep_entropy_of_expected": "ep_total_uncertainty",
    "ep_mutual_information": "ep_mutual_information",
    "ep_EPKL": "ep_epkl",
    "ep_MKL": "ep_mkl",
    "pe_MKL": "mkl",
    "var": "var",
    "combo": "var_combo",
    "logvar": "logvar",
    "logcombo": "logvar_combo",
}

#: Measure labels of the authors' evaluation (``assessment/utils.py``; results lines and JSON keys such as
#: ``ood_test5_decode_bs_5_<label>``) -> our sequence keys. Their ``ood_detection.py`` misspells
#: "logcombo" as "logcomvo"; that label is deliberately not reproduced.
AUTHORS_LABELS = {
    "Total Uncertainty-PE": "total_uncertainty",
    "Total Uncertainty-EP": "ep_total_uncertainty",
    "SCR-PE": "nll",
    "SCR-EP": "ep_nll",
    "Data Uncertainty": "data_uncertainty",
    "Mutual Information-PE": "mutual_information",
    "Mutual Information-EP": "ep_mutual_information",
    "EPKL-PE": "epkl",
    "EPKL-EP": "ep_epkl",
    "MKL": "mkl",
    "ep_MKL": "ep_mkl",
    "sMKL-PE": "nll_mkl",
    "sMKL-EP": "ep_nll_mkl",
    "var": "var",
    "varcombo": "var_combo",
    "logvar": "logvar",
    "logcombo": "logvar_combo",
}

#: Short token-level names (the authors' stdout prefixes ``T-EOE-``, ``T-EXE-``, ...) -> ours
AUTHORS_SHORT_NAMES = {
    "EoE": "total_uncertainty",
    "ExE": "data_uncertainty",
    "MI": "mutual_information",
    "EPKL": "epkl",
    "MKL": "mkl",
    "EoE-EP": "ep_total_uncertainty",
    "MI-EP": "ep_mutual_information",
    "EPKL-EP": "ep_epkl",
    "MKL-EP": "ep_mkl",
    "DU": "expected_nll",
    "PE-TU": "nll",
    "EP-TU": "ep_nll",
    "PE-MKL": "nll_mkl",
    "EP-MKL": "ep_nll_mkl",
}

_AUTHORS_TABLES = {"token": AUTHORS_TOKEN_NAMES, "sequence": AUTHORS_SEQUENCE_NAMES,
                   "label": AUTHORS_LABELS, "short": AUTHORS_SHORT_NAMES}


def to_authors_names(measures: Mapping[str, object], table: str = "sequence", fill_missing=None) -> Dict[str, object]:
    """Rename our keys to the authors' (``table``: "token", "sequence", "label" or "short").

    Keys without an authors' name are dropped. Authors' keys we do not have (e.g. the EP keys of a
    Dirichlet student, which the authors filled with zeros) are set to ``fill_missing`` unless it is None.
    """
    if table not in _AUTHORS_TABLES:
        raise ValueError(f"table must be one of {sorted(_AUTHORS_TABLES)}, got {table!r}")
    out = {}
    for theirs, ours in _AUTHORS_TABLES[table].items():
        if ours in measures:
            out[theirs] = measures[ours]
        elif fill_missing is not None:
            out[theirs] = fill_missing
    return out
