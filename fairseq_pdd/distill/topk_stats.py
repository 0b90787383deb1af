"""Top-k compression of ensemble statistics, and the dense statistics rebuilt from it (pure torch).

What an offline teacher cache stores per target position, for an ensemble of M members over K
classes with mean ``pbar`` and mean log-probability ``mlog`` (see :mod:`fairseq_pdd.distill.ensemble_stats`):

* ``ids`` (k,): the k classes of largest ``pbar``; ``probs`` (k,) = ``pbar[ids]`` (float16 or
  float32);
* ``rest_mass`` = ``1 - sum(probs)`` (after rounding to the storage dtype, so the rebuilt mean sums
  to 1), the mass of the other K - k classes;
* ``entropy_of_expected`` H[pbar], ``expected_entropy`` EH and ``cross_entropy`` -sum pbar mlog,
  float32, computed from the full statistics. They give MKL = CE - H[pbar], EPKL = CE - EH and
  MI = H[pbar] - EH with exactly the float32 arithmetic of the online path, so the proxy precision
  ``beta0`` and the logged ensemble measures are not approximated at all;
* for EnD2's Dirichlet NLL (optional): ``log_probs`` (k,) = ``mlog[ids]`` and ``rest_log_prob``, the
  mean of ``mlog`` over the other K - k classes.

The rebuilt statistics keep the stored values on the top-k classes and spread the rest uniformly::

    pbar~_j = probs_j            (j in ids)      mlog~_j = log_probs_j     (j in ids)
    pbar~_j = rest_mass / (K-k)  (otherwise)     mlog~_j = rest_log_prob   (otherwise)

The approximation (exact when k = K, up to the storage dtype). With ``u`` the unit roundoff of the
storage dtype (2^-11 for float16, 2^-24 for float32), ``||pbar~ - pbar||_1 <= 2 rest_mass + 2u``
per token (the rest: at most ``rest_mass`` on each side; the rounding: ``u`` on the top-k and ``u``
carried into ``rest_mass``). Hence:

* KD to the mean: ``dL/dz = softmax(z) - pbar~``, so the gradient error is ``pbar - pbar~``: L1
  norm at most ``2 rest_mass + 2u`` per token.
* PD-EnD2 (reverse KL, ``exp`` parametrization, ``model_offset >= 1``): ``B`` and ``b0 = B + K`` are
  exact (both means sum to 1), so the gradient error on class j is
  ``e_j psi1(alpha_j) (pbar~_j - pbar_j)`` with ``e_j psi1(alpha_j) = x psi1(x + c) < 1`` for
  ``x = exp(z_j) > 0``, ``c >= 1`` (``psi1(y) < 1 / (y - 1)``): the same bound.
* Forward KL to the proxy: the error ``e_j (psi(beta~_j) - psi(beta_j))`` scales with ``beta0``, and
  EnD2's NLL gradient error is ``e_j (mlog_j - rest_log_prob)`` on the tail, whose log-probabilities
  are not flat: no such bound; both are measured against k in the tests.

The loss values differ by more than the gradients: terms that depend on the target alone (e.g.
``sum_j lnG(beta_j)``) change with the tail too.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from fairseq_pdd.distill.ensemble_stats import EnsembleStatistics

#: Storage dtypes of the top-k probabilities and log-probabilities.
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class TopKStatistics:
    """Compressed statistics at N target positions (shapes in the module docstring, rows first)."""

    ids: torch.Tensor  #: (N, k) integer class ids
    probs: torch.Tensor  #: (N, k) pbar at ids
    rest_mass: torch.Tensor  #: (N,) float32
    entropy_of_expected: torch.Tensor  #: (N,) float32
    expected_entropy: torch.Tensor  #: (N,) float32
    cross_entropy: torch.Tensor  #: (N,) float32
    log_probs: Optional[torch.Tensor]  #: (N, k) mlog at ids, or None
    rest_log_prob: Optional[torch.Tensor]  #: (N,) mean of mlog over the other classes, or None
    num_models: int

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device, non_blocking: bool = False) -> "TopKStatistics":
        """A copy on ``device`` (tensors only; ``num_models`` unchanged)."""
        moved = {
            name: None if value is None else value.to(device, non_blocking=non_blocking)
            for name, value in vars(self).items()
            if name != "num_models"
        }
        return TopKStatistics(num_models=self.num_models, **moved)


def compress(
    stats: EnsembleStatistics, k: int, dtype: torch.dtype = torch.float16, log_probs: bool = True
) -> TopKStatistics:
    """The top-k of ``stats`` (N, K) with its scalar statistics; ``log_probs`` keeps EnD2's mlog part."""
    num_classes = stats.num_classes
    if not 1 <= k <= num_classes:
        raise ValueError(f"top-k size k={k} must be in [1, {num_classes}] (the number of classes)")
    top_probs, ids = stats.mean_probs.topk(k, dim=-1)
    probs = top_probs.to(dtype)
    rest_mass = (1.0 - probs.float().sum(-1)).clamp_(min=0.0)
    top_log_probs = rest_log_prob = None
    if log_probs:
        if stats.mean_log_probs is None:
            raise ValueError("these statistics carry no mean log-probabilities to compress")
        top_mlog = stats.mean_log_probs.gather(-1, ids)
        top_log_probs = top_mlog.to(dtype)
        rest = num_classes - k
        rest_sum = stats.mean_log_probs.sum(-1) - top_mlog.sum(-1)
        rest_log_prob = rest_sum / rest if rest else torch.zeros_like(rest_sum)
    return TopKStatistics(
        ids=ids,
        probs=probs,
        rest_mass=rest_mass,
        entropy_of_expected=stats.entropy_of_expected.float(),
        expected_entropy=stats.expected_entropy.float(),
        cross_entropy=stats.cross_entropy.float(),
        log_probs=top_log_probs,
        rest_log_prob=rest_log_prob,
        num_models=stats.num_models,
    )


def _spread(top: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, K) float32: ``fill`` (N,) everywhere, ``top`` (N, k) at ``ids`` (N, k)."""
    dense = fill.float().unsqueeze(-1).expand(-1, num_classes).contiguous()
    return dense.scatter_(-1, ids.long(), top.float())


def expand(topk: TopKStatistics, num_classes: int, log_probs: bool = False) -> EnsembleStatistics:
    """Dense statistics (N, K) from the top-k, the rest spread uniformly (module docstring).

    ``mean_log_probs`` is rebuilt only when ``log_probs`` is True (EnD2's NLL reads it) and is None
    otherwise, which saves one (N, K) tensor for the other criteria.
    """
    if topk.k > num_classes:
        raise ValueError(f"top-k size {topk.k} exceeds the number of classes {num_classes}")
    rest = num_classes - topk.k
    fill = topk.rest_mass / rest if rest else torch.zeros_like(topk.rest_mass)
    mean_log_probs = None
    if log_probs:
        if topk.log_probs is None:
            raise ValueError(
                "the cached statistics have no mean log-probabilities (built with --no-log-probs): "
                "EnD2's Dirichlet NLL cannot be trained from them"
            )
        mean_log_probs = _spread(topk.log_probs, topk.ids, topk.rest_log_prob, num_classes)
    return EnsembleStatistics(
        mean_probs=_spread(topk.probs, topk.ids, fill, num_classes),
        mean_log_probs=mean_log_probs,
        expected_entropy=topk.expected_entropy.float(),
        entropy_of_expected=topk.entropy_of_expected.float(),
        cross_entropy=topk.cross_entropy.float(),
        num_models=topk.num_models,
    )
