"""Which implementation computes the fused losses: the Triton kernels or the torch reference.

The choice is made per call from the environment variable ``FAIRSEQ_PDD_KERNELS``:

* ``auto`` (default): Triton for CUDA tensors in float32 / float16 / bfloat16 when ``triton`` imports,
  torch otherwise (CPU tensors, float64, no triton);
* ``torch``: always the torch reference (:mod:`fairseq_pdd.distill.losses`' chunked kernels);
* ``triton``: the Triton kernels (:mod:`fairseq_pdd.distill.triton_losses`) for every tensor that is
  not float64; an error if triton does not import, or if the tensors are on the CPU without Triton's
  interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which runs them there slowly
  (the tests use it).

float64 always takes the torch path: the kernels compute in float32 (their special functions are
accurate to float32), and float64 is the dtype of the gradient checks.
"""
import functools
import os

import torch

ENV_VAR = "FAIRSEQ_PDD_KERNELS"
CHOICES = ("auto", "torch", "triton")


def choice() -> str:
    """The requested backend, from :data:`ENV_VAR` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernel backend; choose from {CHOICES}")
    return value


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str:
    """Why ``triton`` cannot be used (the import error), or "" when it imports."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # ImportError, or a broken installation
        return f"{type(error).__name__}: {error}"
    return ""


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the loss on ``tensor`` (the student's logits) runs the Triton kernels; see the module doc."""
    requested = choice()
    if requested == "torch" or tensor.dtype == torch.float64:
        return False
    if requested == "auto":
        return tensor.is_cuda and not triton_import_error()
    error = triton_import_error()
    if error:
        raise RuntimeError(f"{ENV_VAR}=triton, but triton does not import ({error})")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton with {tensor.device} tensors: the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 (set before triton is imported) to run them on the CPU with the interpreter"
        )
    return True
