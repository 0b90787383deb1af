"""B-DISTIL-style progressive (boosted) distillation at token level: the math (pure torch).

Members j = 1..K each give logits ``z_j`` (N, V) at N target positions. The first k members form a
*product of experts*; its log-probabilities are

    log p_k = log_softmax( sum_{j<=k} log_softmax(z_j) ) = log_softmax( sum_{j<=k} z_j ),

with ``p_0`` uniform. Against the teacher's token distribution ``q`` (N, V) the prefix error is

    e_k = KL(q || p_k) = sum_v q_v (log q_v - log p_k,v)        (N,),

and member k is trained (members 1..k-1 frozen) on the per-token weighted residual loss

    w   = exp(eta * sum_{s<k} min(e_s, c)),  normalised to mean 1 over the N tokens
    L_k = sum_t w_t [ (1 - beta) KL(q_t || p_k,t) + beta (-log p_k,t[y_t]) ],

whose gradient in ``z_k`` is ``w (p_k - q)`` for beta = 0: member k learns what its prefix misses.
A member is accepted if its weighted edge ``1 - sum w e_k / sum w e_{k-1} >= gamma`` and the
unweighted KL does not rise. This is an adaptation of B-DISTIL (Dennis et al. 2023) to sequence
models, not the paper's exact equations. Memory is a few (N, V) tensors whatever K is.
"""
from dataclasses import dataclass
from typing import Optional

import math

import torch

from fairseq_pdd.distill.fused import compute_dtype


class ProductOfExperts:
    """Adds members' logits (N, ..., V) one at a time; ``log_probs()`` is the prefix's ``log p_k``.

    With ``average=True`` the sum is divided by k: a geometric mean (logit average) of the members,
    the usual way to combine *independently* trained members. A member may also be added for some
    rows only (``rows``: indices into the first dimension, after a first member for every row), as
    early stopping does; each row is then the product (or mean) of the members added for it.
    """

    def __init__(self, average: bool = False) -> None:
        self.average = average
        self._sum: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None  #: members per row, once a member skipped rows
        self.num_members = 0

    def add(self, logits: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Add member ``k``'s logits (differentiably); with ``rows``, ``logits`` are those rows' only."""
        log_probs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
        if self._sum is None and rows is not None:
            raise ValueError("the first member of a product of experts must cover every row")
        expected = None if self._sum is None else (self._sum.shape if rows is None else (len(rows), *self._sum.shape[1:]))
        if expected is not None and tuple(log_probs.shape) != tuple(expected):
            raise ValueError(
                f"member {self.num_members + 1} gives logits of shape {tuple(logits.shape)}, "
                f"the earlier members {tuple(self._sum.shape)}: their target vocabularies differ"
            )
        if rows is None:
            self._sum = log_probs if self._sum is None else self._sum + log_probs
            if self._counts is not None:
                self._counts = self._counts + 1
        else:
            if self._counts is None:
                self._counts = torch.full(self._sum.shape[:1], self.num_members, device=log_probs.device)
            self._sum = self._sum.index_add(0, rows, log_probs)
            self._counts = self._counts.index_add(0, rows, torch.ones_like(rows))
        self.num_members += 1

    def log_probs(self) -> torch.Tensor:
        """``log p_k`` (N, ..., V), float32 (or the logits' dtype if wider)."""
        if self._sum is None:
            raise ValueError("no member was added to the product of experts")
        if not self.average:
            return torch.log_softmax(self._sum, dim=-1)
        if self._counts is None:
            return torch.log_softmax(self._sum / self.num_members, dim=-1)
        counts = self._counts.view(-1, *([1] * (self._sum.dim() - 1))).to(self._sum.dtype)
        return torch.log_softmax(self._sum / counts, dim=-1)


def confident(log_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``max_v p_v > threshold`` (...,) from ``log p`` (..., V): early stopping's test.

    Strict, so ``threshold = 1`` never stops and ``threshold = 0`` always does.
    """
    return log_probs.max(-1).values.exp() > threshold


def members_used(first_confident: torch.Tensor, prefix: int) -> torch.Tensor:
    """Members used per position (N, T) under the early-stopping rule.

    ``first_confident`` (N, T) is the smallest j such that the first j members are confident at
    position t (``prefix`` if none is). A member dropped for a hypothesis stays dropped:
    ``used_t = min(prefix, min_{s<=t} first_confident_s)``.
    """
    return torch.cummin(first_confident.clamp(max=prefix), dim=-1).values


def kl_to_teacher(teacher_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(q || p)`` per token (N,) from ``q`` (N, V) and ``log p`` (N, V); ``0 log 0 = 0``."""
    return torch.xlogy(teacher_probs, teacher_probs).sum(-1) - (teacher_probs * log_probs).sum(-1)


def uniform_kl(teacher_probs: torch.Tensor) -> torch.Tensor:
    """``e_0 = KL(q || uniform) = log V - H[q]`` (N,): the error of the empty prefix."""
    return math.log(teacher_probs.shape[-1]) + torch.xlogy(teacher_probs, teacher_probs).sum(-1)


def boosting_weights(clipped_error_sum: torch.Tensor, eta: float) -> torch.Tensor:
    """``w = exp(eta * s)`` normalised to mean 1 (N,), from ``s = sum_{s<k} min(e_s, c)`` (N,).

    Computed as a softmax times N, so large ``eta * s`` cannot overflow.
    """
    if clipped_error_sum.numel() == 0:
        return clipped_error_sum
    return torch.softmax(eta * clipped_error_sum.float(), dim=0) * clipped_error_sum.numel()


def residual_kd_loss(
    log_probs: torch.Tensor,
    teacher_probs: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    gold_weight: float = 0.0,
) -> torch.Tensor:
    """Per-token ``w [(1 - beta) KL(q || p_k) + beta NLL(y | p_k)]`` (N,), ``log_probs = log p_k``."""
    loss = kl_to_teacher(teacher_probs, log_probs)
    if gold_weight:
        nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = (1.0 - gold_weight) * loss + gold_weight * nll
    return weights * loss


def weighted_edge(weights: torch.Tensor, prev_error: torch.Tensor, new_error: torch.Tensor) -> float:
    """``1 - sum w e_k / sum w e_{k-1}``: the fraction of the prefix's weighted error member k removes."""
    prev = float((weights * prev_error).sum())
    if prev <= 0.0:
        return 0.0
    return 1.0 - float((weights * new_error).sum()) / prev


@dataclass
class Acceptance:
    """The acceptance rule's inputs and verdict for one candidate member."""

    edge: float  #: weighted edge (see :func:`weighted_edge`)
    kl: float  #: unweighted mean KL(q || p_k) with the candidate
    prefix_kl: float  #: unweighted mean KL(q || p_{k-1}) without it
    gamma: float
    accepted: bool


def accept(edge: float, kl: float, prefix_kl: float, gamma: float, tolerance: float = 0.0) -> Acceptance:
    """Accept iff ``edge >= gamma`` and ``kl <= prefix_kl + tolerance``."""
    ok = edge >= gamma and kl <= prefix_kl + tolerance
    return Acceptance(edge=edge, kl=kl, prefix_kl=prefix_kl, gamma=gamma, accepted=bool(ok))
