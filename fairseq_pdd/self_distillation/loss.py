"""Self-distillation with ground-truth mixing (Borup & Andersen, 2021) at token level: the loss (pure torch).

A student ``p = softmax(z)`` (N, V) at the N non-padding target positions is trained against the
mixed target

    m = a * e(y) + (1 - a) * q,     e(y) = (1 - eps) * onehot(y) + eps / V,     q = softmax(log pbar / tau)

* ``a`` in [0, 1] is the weight of the **ground truth** (the paper's convention): ``a = 1`` is plain
  supervised training, ``a = 0`` pure self-distillation;
* ``pbar`` (N, V) is the frozen teacher's predictive (the previous generation; for several teachers
  their mean), given as ``log pbar``;
* ``tau`` softens (> 1) or sharpens (< 1) the teacher's target only; for one teacher with logits
  ``z_T``, ``softmax(log pbar / tau) = softmax(z_T / tau)``. The student is trained and evaluated at
  temperature 1, so ``m`` is a distribution and the identity below is exact;
* ``eps`` is label smoothing of the ground truth.

Losses per token (``loss="ce"``, the default, or ``"brier"``)::

    CE:     L = -sum_v m_v log p_v = a * NLL_eps + (1 - a) * CE(q, p),
            NLL_eps = (1 - eps) * (-log p_y) + eps * (-(1/V) sum_v log p_v),      dL/dz = p - m
    Brier:  L = ||p - m||^2                                                         dL/dz = p * (d - <p, d>), d = 2 (p - m)

(the Brier form is the paper's squared error on softmax outputs; the mixed target equals its
``a * ||p - e||^2 + (1 - a) * ||p - q||^2`` up to a constant in ``z``). Neither builds ``m`` or the
one-hot as an (N, V) tensor outside a chunk: the values and closed-form gradients are computed chunk
by chunk by :func:`fairseq_pdd.distill.fused.chunked_token_loss` (float32; float64 stays float64), which
keeps only the (N, V) gradient for the backward pass.

Per-token diagnostics (N, 5), columns :data:`DIAGNOSTICS`: gold NLL ``-log p_y`` (no smoothing),
``CE(q, p)``, ``KL(q || p)``, student entropy ``H[p]`` and teacher entropy ``H[q]``, in nats.
"""
from functools import partial
from typing import Tuple

import torch

from fairseq_pdd.distill.fused import chunked_token_loss

LOSSES = ("ce", "brier")
DIAGNOSTICS = ("nll", "teacher_ce", "teacher_kl", "student_entropy", "teacher_entropy")


def _entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` (n,), with ``0 * log 0 = 0``."""
    return -(probs * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)


def _mixed_target_kernel(z, log_pbar, target, *, gt_weight, label_smoothing, temperature, loss, need_grad):
    a, eps = gt_weight, label_smoothing
    num_classes = z.shape[-1]
    log_norm = torch.logsumexp(z, -1)
    log_p = z - log_norm.unsqueeze(-1)
    log_q = log_pbar if temperature == 1.0 else torch.log_softmax(log_pbar / temperature, -1)
    q = log_q.exp()
    index = target.long().unsqueeze(-1)
    nll = -log_p.gather(-1, index).squeeze(-1)
    teacher_ce = -(q * log_p).sum(-1)
    teacher_entropy = _entropy(q, log_q)
    p = log_p.exp()
    extras = torch.stack(
        [nll, teacher_ce, teacher_ce - teacher_entropy, _entropy(p, log_p), teacher_entropy], -1
    )
    if loss == "ce":
        gold = nll if eps == 0.0 else (1.0 - eps) * nll - eps * log_p.mean(-1)
        value = a * gold + (1.0 - a) * teacher_ce
        if not need_grad:
            return value, None, log_norm, extras
        grad = p.sub_(q, alpha=1.0 - a)  # p - m, in place of p
        if eps:
            grad.sub_(a * eps / num_classes)
        return value, grad.scatter_add_(-1, index, grad.new_full(index.shape, -a * (1.0 - eps))), log_norm, extras
    target_mix = q.mul_(1.0 - a).add_(a * eps / num_classes)
    target_mix.scatter_add_(-1, index, target_mix.new_full(index.shape, a * (1.0 - eps)))
    diff = p - target_mix
    value = diff.square().sum(-1)
    if not need_grad:
        return value, None, log_norm, extras
    d = diff.mul_(2.0)
    return value, p.mul_(d - (p * d).sum(-1, keepdim=True)), log_norm, extras


def check_options(gt_weight: float, label_smoothing: float = 0.0, temperature: float = 1.0, loss: str = "ce") -> None:
    """Raise ``ValueError`` naming the option that is out of range."""
    if not 0.0 <= gt_weight <= 1.0:
        raise ValueError(f"--gt-weight must lie in [0, 1] (1 = supervised), got {gt_weight}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must lie in [0, 1), got {label_smoothing}")
    if not temperature > 0.0:
        raise ValueError(f"--sd-temperature must be > 0, got {temperature}")
    if loss not in LOSSES:
        raise ValueError(f"--sd-loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def mixed_target_loss(
    z: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    target: torch.Tensor,
    gt_weight: float,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    loss: str = "ce",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss (N,), ``logsumexp(z)`` (N,) and the diagnostics (N, 5) against the mixed target.

    Args:
        z: (N, V) student logits; differentiable.
        teacher_log_probs: (N, V) ``log pbar`` of the teacher(s) at temperature 1 (a target, detached).
        target: (N,) reference token indices.
        gt_weight: ``a``, the weight of the ground truth (1 = supervised).
    """
    check_options(gt_weight, label_smoothing, temperature, loss)
    if teacher_log_probs.shape != z.shape:
        raise ValueError(
            f"teacher log-probabilities {tuple(teacher_log_probs.shape)} do not match the student's "
            f"logits {tuple(z.shape)} (tokens x classes)"
        )
    if target.shape != z.shape[:1]:
        raise ValueError(f"target {tuple(target.shape)} does not match the student's {z.shape[0]} tokens")
    kernel = partial(
        _mixed_target_kernel,
        gt_weight=float(gt_weight),
        label_smoothing=float(label_smoothing),
        temperature=float(temperature),
        loss=loss,
    )
    return chunked_token_loss(kernel, z, teacher_log_probs, target, num_extras=len(DIAGNOSTICS))
