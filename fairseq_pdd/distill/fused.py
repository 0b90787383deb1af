"""A per-token loss whose gradient is computed in the forward pass, chunk by chunk.

Every distillation loss here is a function of one row of student logits ``z`` (K,) and some
detached per-token targets. Its kernel also returns the log-normaliser of the student's predictive
(``log a0`` for a Dirichlet, ``logsumexp(z)`` for a softmax), so the reference NLL and the precision
are logged without another pass over (N, K). Autograd would keep several (N, K) intermediates alive per loss
(exp, lgamma, digamma, ...). Instead each loss supplies a *kernel* that returns the loss value and
its closed-form gradient ``dL/dz`` for a chunk of rows; only that gradient (N, K) is kept for the
backward pass, and the temporaries live for one chunk at a time. Peak memory is therefore
``logits + gradient + O(chunk * K)`` whatever the loss.

Computation is in float32 (or float64 when the logits are float64, which the gradient checks use);
float16/bfloat16 logits are upcast per chunk.

The autograd node (:func:`token_loss_with_gradient`) is shared with the Triton kernels of
:mod:`fairseq_pdd.distill.triton_losses`, which compute the same four values for all rows at once and
need no chunks (their only (N, K) output is the gradient).
"""
import functools
from typing import Callable, Optional, Tuple

import torch

#: Elements of one (rows x K) chunk; bounds the temporaries of a kernel (16 MiB per fp32 tensor).
CHUNK_ELEMENTS = 1 << 22

Kernel = Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunked_rows(kernel, num_extras, logit_scale, logits, need_grad, *targets):
    """Run ``kernel`` chunk by chunk on ``logit_scale * logits``; (loss (N,), log-normaliser (N,), extras (N, E),
    dL/dz (N, K) or None), the gradient with respect to the unscaled logits."""
    n, k = logits.shape
    dtype = compute_dtype(logits.dtype)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    loss = logits.new_empty(n, dtype=dtype)
    log_norm = logits.new_empty(n, dtype=dtype)
    extras = logits.new_empty(n, num_extras, dtype=dtype)
    grad = logits.new_empty(n, k, dtype=gradient_dtype(logits.dtype)) if need_grad else None
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        chunk_targets = [t[sl].to(dtype) for t in targets]
        z = logits[sl].to(dtype)
        out = kernel(z if logit_scale == 1.0 else z * logit_scale, *chunk_targets, need_grad=need_grad)
        loss[sl] = out[0]
        log_norm[sl] = out[2]
        if num_extras:
            extras[sl] = out[3]
        if need_grad:
            grad[sl] = out[1] if logit_scale == 1.0 else out[1].mul_(logit_scale)
    return loss, log_norm, extras, grad


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the kept gradient: the logits' own, but float32 for float16 logits (fp16 gradients would
    underflow before the loss scale multiplies them)."""
    return torch.float32 if dtype == torch.float16 else dtype


class _TokenLossWithGradient(torch.autograd.Function):
    """A per-token loss whose ``compute`` returns its gradient with the values; backward scales it."""

    @staticmethod
    def forward(ctx, logits, compute, need_grad, *targets):
        loss, log_norm, extras, grad = compute(logits, need_grad, *targets)
        ctx.grad = grad
        ctx.num_targets = len(targets)
        ctx.mark_non_differentiable(log_norm, extras)
        return loss, log_norm, extras

    @staticmethod
    def backward(ctx, grad_loss, _grad_log_norm, _grad_extras):
        grad = ctx.grad
        grad_logits = grad * grad_loss.to(grad.dtype).unsqueeze(-1)
        return (grad_logits, None, None) + (None,) * ctx.num_targets


def token_loss_with_gradient(compute, logits: torch.Tensor, *targets: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The autograd node shared by the torch and the Triton paths: (loss (N,), log-normaliser (N,), extras (N, E)).

    ``compute(logits, need_grad, *targets) -> (loss, log_norm, extras, dL/dz (N, K) or None)`` computes
    everything in the forward pass; only the gradient is kept for backward. Checks the shapes first.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected (N, K) logits, got shape {tuple(logits.shape)}")
    for t in targets:
        if t.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target rows ({t.shape[0]}) do not match logit rows ({logits.shape[0]})"
            )
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    targets = tuple(t.detach() for t in targets)
    return _TokenLossWithGradient.apply(logits, compute, need_grad, *targets)


def chunked_token_loss(
    kernel: Kernel, logits: torch.Tensor, *targets: torch.Tensor, num_extras: int = 0, logit_scale: float = 1.0
) -> Tuple[torch.Tensor, ...]:
    """Apply ``kernel`` row-chunk by row-chunk; return the per-token loss (N,) and log-normaliser (N,).

    Args:
        kernel: ``kernel(z, *targets, need_grad) -> (loss (n,), dL/dz (n, K) or None,
            log-normaliser (n,))``, pure torch, with ``z`` and the targets already in the compute
            dtype (integer targets such as token indices arrive as floats, exact below 2**24).
            With ``num_extras = E > 0`` it returns a fourth value, E per-token diagnostics (n, E),
            and the call returns them too, as a third value (N, E) outside the graph.
        logits: (N, K) student logits; differentiable.
        targets: tensors with leading dimension N (detached teacher statistics).
        logit_scale: s, the loss is that of ``s * logits`` (``s = 1/T`` for a tempered student): each chunk is
            scaled as it is upcast (no (N, K) copy of the logits) and its gradient multiplied by s, so that the
            gradient is with respect to the given logits (``dL/dz = s dL/d(s z)``).
    """
    compute = functools.partial(_chunked_rows, kernel, num_extras, logit_scale)
    loss, log_norm, extras = token_loss_with_gradient(compute, logits, *targets)
    return (loss, log_norm, extras) if num_extras else (loss, log_norm)
