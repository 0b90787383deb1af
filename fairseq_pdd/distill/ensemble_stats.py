"""Ensemble statistics accumulated member by member (pure torch).

For M members with token distributions ``p_m`` (N, K) the losses and measures need only

    pbar = (1/M) sum_m p_m,   mlog = (1/M) sum_m log p_m,   EH = (1/M) sum_m H[p_m],

so they are accumulated one member at a time: memory is four (N, K) float32 tensors whatever M is
(two sums, a member's probabilities, a scratch), and a B x T x M x V tensor never exists. From them
(all (N,)):

    total uncertainty   H[pbar]
    data uncertainty    EH
    mutual information  MI   = H[pbar] - EH
    EPKL                     = -sum_k pbar_k mlog_k - EH
    MKL                      = sum_k pbar_k (log pbar_k - mlog_k) = -sum_k pbar_k mlog_k - H[pbar]

Given per-row member weights ``w_m`` (N,) (in the beam, the expectation-of-products weights
``softmax_m(log P_m(y_<t))``), the mixture ``q = sum_m w_m p_m`` is accumulated alongside (one more (N, K)
buffer), and the statistics also carry ``H[q]`` and ``-sum_k q_k mlog_k`` (N,).
"""
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch

from fairseq_pdd.distill import backend
from fairseq_pdd.distill.fused import compute_dtype


@dataclass
class EnsembleStatistics:
    """Streamed statistics of an ensemble at N target positions over K classes."""

    mean_probs: torch.Tensor  #: pbar (N, K), float32
    #: mlog (N, K), float32; None when rebuilt from a top-k teacher cache for a criterion that does
    #: not read it (:func:`fairseq_pdd.distill.topk_stats.expand`)
    mean_log_probs: Optional[torch.Tensor]
    expected_entropy: torch.Tensor  #: EH (N,)
    entropy_of_expected: torch.Tensor  #: H[pbar] (N,)
    cross_entropy: torch.Tensor  #: -sum_k pbar_k mlog_k (N,)
    num_models: int
    #: H[q] (N,) of the weighted mixture q = sum_m w_m p_m, when members were added with weights
    mixture_entropy: Optional[torch.Tensor] = None
    #: -sum_k q_k max(mlog_k, lowest finite) (N,) (q_k = 0 adds nothing), with the mixture
    mixture_cross_entropy: Optional[torch.Tensor] = None

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


def entropy_of(probs: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``H[p] = -sum_k p_k log p_k`` over the last dimension, with ``0 log 0 = 0``.

    ``log`` of ``p`` clamped at the dtype's smallest normal number: same values as ``torch.xlogy(p, p)``
    to within ``K * tiny``, at about half its cost on CPU. The one (N, K) temporary is ``scratch`` when
    given (overwritten), and is updated in place: no autograd through it.
    """
    t = torch.clamp(probs, min=torch.finfo(probs.dtype).tiny, out=scratch)
    return t.log_().mul_(probs).sum(-1).neg_()


def dot_rows(a: torch.Tensor, b: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_k a_k b_k`` over the last dimension; the product goes to ``scratch`` when given."""
    return torch.mul(a, b, out=scratch).sum(-1)


def dot_log_rows(p: torch.Tensor, log_q: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_k p_k log_q_k`` over the last dimension with ``0 * log 0 = 0``: a class that every member gives
    probability 0 (``p_k = 0``, ``log_q_k = -inf``) adds nothing, where the plain product is NaN. With
    finite or -inf ``log_q`` a NaN product can only be that case, so it is zeroed in place (no mask tensor);
    ``p_k > 0`` with ``log_q_k = -inf`` still gives -inf."""
    return torch.mul(p, log_q, out=scratch).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)


def mixture_entropies(q: torch.Tensor, mean_log_probs: torch.Tensor, scratch: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``H[q]`` and ``-sum_k q_k max(mlog_k, lowest finite)`` over the last dimension, for a mixture ``q`` of
    the members (same shape as ``mean_log_probs``): ``q_k = 0`` adds nothing even where ``mlog_k = -inf``.
    The (N, K) temporaries go to ``scratch`` when given."""
    entropy = entropy_of(q, scratch)
    clamped = torch.clamp(mean_log_probs, min=torch.finfo(q.dtype).min, out=scratch)
    return entropy, -dot_rows(clamped, q, scratch)


def smooth_log_probs_(log_probs: torch.Tensor, eps: float) -> torch.Tensor:
    """A member's distribution smoothed towards uniform, in log space and in place (N, K):

        log p~_k = log((1 - eps) p_k + eps / K) = logaddexp(log p_k + log(1 - eps), log(eps / K))

    (the EnD2 reference code's ``teacher_prob_smoothing``, applied to each member before the statistics,
    so ``mlog`` is the mean of the smoothed members' logs and is >= log(eps / K)). ``eps`` in [0, 1);
    0 returns ``log_probs`` unchanged.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"teacher smoothing must be in [0, 1), got {eps}")
    if eps == 0.0:
        return log_probs
    floor = log_probs.new_tensor(math.log(eps / log_probs.shape[-1]))
    return torch.logaddexp(log_probs.add_(math.log1p(-eps)), floor, out=log_probs)


class Workspace:
    """Named buffers kept between uses and only grown: :meth:`like` gives an uninitialised tensor over the
    name's storage. On CPU a fresh large tensor costs its page faults, often more than the arithmetic done
    in it (an (N, K) ``exp`` into a new tensor took 10x one into a reused one here); a GPU's caching
    allocator makes reuse free anyway. A buffer is overwritten by the next request of its name.
    """

    def __init__(self) -> None:
        self._storage = {}

    def like(self, name: str, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """An uninitialised tensor of ``tensor``'s shape and device, and its dtype unless ``dtype`` is given,
        over the storage of ``name``."""
        n, dtype = tensor.numel(), dtype or tensor.dtype
        storage = self._storage.get(name)
        if storage is None or storage.numel() < n or storage.dtype != dtype or storage.device != tensor.device:
            storage = self._storage[name] = torch.empty(n, dtype=dtype, device=tensor.device)
        return storage[:n].view(tensor.shape)


class EnsembleAccumulator:
    """Adds members' log-probabilities (N, K) (:meth:`add`), or their logits and a temperature
    (:meth:`add_logits`), one at a time; ``finalize()`` gives the statistics.

    Memory: four (N, K) buffers whatever M is (the sums of probabilities and log-probabilities, a member's
    probabilities, a scratch), five with the weighted mixture (``add(..., weight=)``), from ``workspace``
    when given (e.g. one per decoding run, so that steps re-use them; the statistics' ``mean_probs`` and
    ``mean_log_probs`` are then valid until the next accumulator of that workspace adds a member), else
    fresh; from logits the torch path also writes the member's log-probabilities to one more kept buffer. The
    Triton path needs neither the member's probabilities (unless returned) nor the scratch, nor, from logits,
    its log-probabilities. No autograd: the buffers are written in place.
    """

    def __init__(self, workspace: Optional[Workspace] = None) -> None:
        self._workspace = workspace if workspace is not None else Workspace()
        self._sum_probs: Optional[torch.Tensor] = None
        self._sum_log_probs: Optional[torch.Tensor] = None
        self._sum_entropy: Optional[torch.Tensor] = None
        self._scratch: Optional[torch.Tensor] = None
        self._mixture: Optional[torch.Tensor] = None  #: sum_m w_m p_m (N, K), when weights are given
        self._count = 0
        self._finalized = False
        self._triton = False  #: whether the Triton kernels accumulate (decided by the first member)

    def add(self, log_probs: torch.Tensor, return_probs: bool = True, weight: Optional[torch.Tensor] = None
            ) -> Optional[torch.Tensor]:
        """Add one member's log-probabilities (N, K); half precision is upcast to float32.

        ``weight`` (N,): the member's weight in the mixture ``q = sum_m w_m p_m`` (given for every member
        or for none). Returns the member's probabilities (N, K), valid until the next ``add`` (which may
        update them in place); None if not ``return_probs`` (the Triton path then does not write them).
        """
        self._admit(log_probs, weight, "log-probabilities")
        if self._triton:
            return self._add_triton(log_probs, return_probs, weight)
        return self._add_torch(log_probs.to(compute_dtype(log_probs.dtype)), return_probs, weight)

    def add_logits(self, logits: torch.Tensor, temperature: float = 1.0, weight: Optional[torch.Tensor] = None,
                   smoothing: float = 0.0) -> torch.Tensor:
        """Add one member given by its raw logits ``z`` (N, K) (float32 / float16 / bfloat16 as the model
        produced them, or float64), i.e. the log-probabilities ``log_softmax(z / temperature)``, computed in
        float32 (float64 for float64 logits), smoothed towards uniform by ``smoothing``
        (:func:`smooth_log_probs_`; 0: not smoothed). ``weight`` as in :meth:`add`.

        Returns (N,) bool: whether the row's log-probabilities are all finite (False where ``z`` has a NaN or
        an inf, or ``z / T`` overflows). Unsmoothed, the Triton path computes the row's logsumexp and the
        member's terms in one kernel from the logits (no (N, K) log-probabilities are written); the torch
        path (and any smoothed member) writes them into a kept buffer and adds them as :meth:`add` does.
        """
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self._admit(logits, weight, "logits", allow_triton=not smoothing)
        if self._triton:
            return self._add_triton(logits, False, weight, temperature)
        log_probs = self._workspace.like("log_probs", logits, compute_dtype(logits.dtype))
        if temperature != 1.0:
            log_probs.copy_(logits).div_(temperature)  # upcast first: the division in float32
            torch.log_softmax(log_probs, -1, out=log_probs)
        else:
            torch.log_softmax(logits, -1, dtype=log_probs.dtype, out=log_probs)
        smooth_log_probs_(log_probs, smoothing)
        finite = torch.isfinite(log_probs).all(-1)
        self._add_torch(log_probs, False, weight)
        return finite

    def _admit(self, member: torch.Tensor, weight: Optional[torch.Tensor], what: str, allow_triton: bool = True
               ) -> None:
        """Check a member (N, K) and its weight against the first; the first member chooses the backend
        (the torch path where ``allow_triton`` is False)."""
        if self._finalized:
            raise RuntimeError("EnsembleAccumulator.add() after finalize(); start a new accumulator")
        if self._count == 0:
            self._triton = allow_triton and backend.use_triton(member)
        elif member.shape != self._sum_probs.shape:
            raise ValueError(
                f"ensemble member {self._count} gives {what} of shape "
                f"{tuple(member.shape)}, the first gave {tuple(self._sum_probs.shape)}"
            )
        if self._count and (weight is not None) != (self._mixture is not None):
            raise ValueError(f"ensemble member {self._count} is added {'with' if weight is not None else 'without'} "
                             "a mixture weight, unlike the first: give weights for every member or for none")
        if weight is not None and tuple(weight.shape) != tuple(member.shape[:-1]):
            raise ValueError(f"mixture weight of shape {tuple(weight.shape)} for {what} of shape "
                             f"{tuple(member.shape)}: expected {tuple(member.shape[:-1])}")

    def _add_torch(self, log_probs: torch.Tensor, return_probs: bool, weight: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
        if self._count == 0:
            self._sum_probs, self._sum_log_probs, self._scratch = (
                self._workspace.like(name, log_probs) for name in ("sum_probs", "sum_log_probs", "scratch"))
            probs = torch.exp(log_probs, out=self._sum_probs)
            self._sum_log_probs.copy_(log_probs)
        else:
            probs = torch.exp(log_probs, out=self._workspace.like("probs", log_probs))
            self._sum_probs += probs
            self._sum_log_probs += log_probs
        if weight is not None:
            weight = weight.to(log_probs.dtype).unsqueeze(-1)
            if self._count == 0:
                self._mixture = torch.mul(probs, weight, out=self._workspace.like("mixture", log_probs))
            else:
                self._mixture.addcmul_(probs, weight)
        # 0 * log 0 = 0: a class with probability 0 (log-probability -inf) adds no entropy.
        clamped = torch.clamp(log_probs, min=torch.finfo(log_probs.dtype).min, out=self._scratch)
        entropy = -dot_rows(clamped, probs, self._scratch)
        self._sum_entropy = entropy if self._count == 0 else self._sum_entropy.add_(entropy)
        self._count += 1
        return probs if return_probs else None

    def _add_triton(self, member: torch.Tensor, return_probs: bool, weight: Optional[torch.Tensor],
                    temperature: Optional[float] = None):
        """The member's log-probabilities, or with ``temperature`` its logits, through the accumulate kernel;
        returns its probabilities (or None), or from logits the rows' finiteness."""
        from fairseq_pdd.distill import triton_stats  # imports triton: only when the backend chose it

        dtype, k = compute_dtype(member.dtype), member.shape[-1]
        rows = member.reshape(-1, k)
        if self._count == 0:
            self._sum_probs, self._sum_log_probs = (
                self._workspace.like(name, member, dtype) for name in ("sum_probs", "sum_log_probs"))
            self._sum_entropy = member.new_empty(member.shape[:-1], dtype=dtype)
            if weight is not None:
                self._mixture = self._workspace.like("mixture", member, dtype)
            probs = self._sum_probs
        else:
            probs = self._workspace.like("probs", member, dtype) if return_probs else None
        mixture = None if weight is None else (self._mixture.view(-1, k), weight.reshape(-1))
        finite = triton_stats.accumulate(rows, self._sum_probs.view(-1, k), self._sum_log_probs.view(-1, k),
                                         self._sum_entropy.view(-1), first=self._count == 0,
                                         probs=None if self._count == 0 or probs is None else probs.view(-1, k),
                                         mixture=mixture, temperature=temperature)
        self._count += 1
        if temperature is not None:
            return finite.view(member.shape[:-1])
        return probs if return_probs else None

    def finalize(self) -> EnsembleStatistics:
        if self._count == 0:
            raise ValueError("no ensemble member was added")
        m = self._count
        self._finalized = True
        if self._triton:
            from fairseq_pdd.distill import triton_stats

            k, lead = self._sum_probs.shape[-1], self._sum_probs.shape[:-1]
            sums = triton_stats.finalize(self._sum_probs.view(-1, k), self._sum_log_probs.view(-1, k), m,
                                         None if self._mixture is None else self._mixture.view(-1, k))
            stats = EnsembleStatistics(self._sum_probs, self._sum_log_probs, self._sum_entropy / m,
                                       *(value.view(lead) for value in sums[:2]), m,
                                       *(value.view(lead) for value in sums[2:]))
            self._sum_probs = self._sum_log_probs = self._mixture = None
            return stats
        mean_probs = self._sum_probs.div_(m)
        mean_log_probs = self._sum_log_probs.div_(m)
        stats = EnsembleStatistics(
            mean_probs=mean_probs,
            mean_log_probs=mean_log_probs,
            expected_entropy=self._sum_entropy / m,
            entropy_of_expected=entropy_of(mean_probs, self._scratch),
            cross_entropy=-dot_log_rows(mean_probs, mean_log_probs, self._scratch),
            num_models=m,
        )
        if self._mixture is not None:
            stats.mixture_entropy, stats.mixture_cross_entropy = mixture_entropies(
                self._mixture, mean_log_probs, self._scratch)
        self._sum_probs = self._sum_log_probs = self._mixture = None
        return stats


def ensemble_statistics(member_log_probs: Iterable[torch.Tensor]) -> EnsembleStatistics:
    """Statistics of an iterable of members' log-probabilities (each (N, K)), streamed."""
    acc = EnsembleAccumulator()
    for log_probs in member_log_probs:
        acc.add(log_probs, return_probs=False)
    return acc.finalize()
