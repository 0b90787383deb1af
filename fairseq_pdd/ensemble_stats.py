"""Ensemble statistics accumulated member by member (pure torch).

For M members with token distributions ``p_m`` (N, K) the losses and measures need only

    pbar = (1/M) sum_m p_m,   mlog = (1/M) sum_m log p_m,   EH = (1/M) sum_m H[p_m],

so they are accumulated one member at a time: memory is two (N, K) float32 tensors whatever M is,
and a B x T x M x V tensor never exists. From them (all (N,)):

    total uncertainty   H[pbar]
    data uncertainty    EH
    mutual information  MI   = H[pbar] - EH
    EPKL                     = -sum_k pbar_k mlog_k - EH
    MKL                      = sum_k pbar_k (log pbar_k - mlog_k) = -sum_k pbar_k mlog_k - H[pbar]
"""
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from fairseq_pdd.fused import compute_dtype


@dataclass
class EnsembleStatistics:
    """Streamed statistics of an ensemble at N target positions over K classes."""

    mean_probs: torch.Tensor  #: pbar (N, K), float32
    #: mlog (N, K), float32; None when rebuilt from a top-k teacher cache for a criterion that does
    #: not read it (:func:`fairseq_pdd.topk_stats.expand`)
    mean_log_probs: Optional[torch.Tensor]
    expected_entropy: torch.Tensor  #: EH (N,)
    entropy_of_expected: torch.Tensor  #: H[pbar] (N,)
    cross_entropy: torch.Tensor  #: -sum_k pbar_k mlog_k (N,)
    num_models: int

    @property
    def num_classes(self) -> int:
        return self.mean_probs.shape[-1]

    # The three differences are >= 0 in exact arithmetic; float32 rounding can make them -1e-7
    # where members agree, which would turn the proxy precision (K-1)/(2 MKL + eps) negative. One
    # member cannot disagree with itself: they are exactly 0 then, not rounding noise.
    def _disagreement(self, minuend: torch.Tensor, subtrahend: torch.Tensor) -> torch.Tensor:
        if self.num_models == 1:
            return torch.zeros_like(self.expected_entropy)
        return (minuend - subtrahend).clamp_(min=0.0)

    @property
    def mutual_information(self) -> torch.Tensor:
        return self._disagreement(self.entropy_of_expected, self.expected_entropy)

    @property
    def epkl(self) -> torch.Tensor:
        return self._disagreement(self.cross_entropy, self.expected_entropy)

    @property
    def mkl(self) -> torch.Tensor:
        return self._disagreement(self.cross_entropy, self.entropy_of_expected)


def entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """``H[p] = -sum_k p_k log p_k`` over the last dimension, with ``0 log 0 = 0``.

    ``log`` of ``p`` clamped at the dtype's smallest normal number: same values as ``torch.xlogy(p, p)``
    to within ``K * tiny``, at about half its cost on CPU.
    """
    return -(probs * torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))).sum(-1)


class EnsembleAccumulator:
    """Adds members' log-probabilities (N, K) one at a time; ``finalize()`` gives the statistics."""

    def __init__(self) -> None:
        self._sum_probs: Optional[torch.Tensor] = None
        self._sum_log_probs: Optional[torch.Tensor] = None
        self._sum_entropy: Optional[torch.Tensor] = None
        self._count = 0
        self._finalized = False

    def add(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Add one member's log-probabilities (N, K); half precision is upcast to float32.

        Returns the member's probabilities (N, K), valid until the next ``add`` (which may update them
        in place).
        """
        if self._finalized:
            raise RuntimeError("EnsembleAccumulator.add() after finalize(); start a new accumulator")
        log_probs = log_probs.to(compute_dtype(log_probs.dtype))
        probs = log_probs.exp()
        # 0 * log 0 = 0: a class with probability 0 (log-probability -inf) adds no entropy.
        entropy = -(probs * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)
        if self._count == 0:
            self._sum_probs, self._sum_log_probs, self._sum_entropy = probs, log_probs.clone(), entropy
        else:
            if log_probs.shape != self._sum_probs.shape:
                raise ValueError(
                    f"ensemble member {self._count} gives log-probabilities of shape "
                    f"{tuple(log_probs.shape)}, the first gave {tuple(self._sum_probs.shape)}"
                )
            self._sum_probs += probs
            self._sum_log_probs += log_probs
            self._sum_entropy += entropy
        self._count += 1
        return probs

    def finalize(self) -> EnsembleStatistics:
        if self._count == 0:
            raise ValueError("no ensemble member was added")
        m = self._count
        self._finalized = True
        mean_probs = self._sum_probs.div_(m)
        mean_log_probs = self._sum_log_probs.div_(m)
        self._sum_probs = self._sum_log_probs = None
        return EnsembleStatistics(
            mean_probs=mean_probs,
            mean_log_probs=mean_log_probs,
            expected_entropy=self._sum_entropy / m,
            entropy_of_expected=entropy_of(mean_probs),
            cross_entropy=-(mean_probs * mean_log_probs).sum(-1),
            num_models=m,
        )


def ensemble_statistics(member_log_probs: Iterable[torch.Tensor]) -> EnsembleStatistics:
    """Statistics of an iterable of members' log-probabilities (each (N, K)), streamed."""
    acc = EnsembleAccumulator()
    for log_probs in member_log_probs:
        acc.add(log_probs)
    return acc.finalize()
