"""Safe checkpoint loading: ``torch.load(weights_only=True)`` with an allow-list for fairseq.

torch >= 2.6 refuses to unpickle arbitrary globals. fairseq checkpoints pickle one class besides
tensors and builtin containers: ``argparse.Namespace`` (the legacy ``args`` / ``cfg.model``), so
that class is allow-listed, and nothing else. A checkpoint that pickles any other global is refused
with an error naming the file and the globals; the protection is never switched off.

:func:`install` is called when the plugin is imported. It allow-lists the classes and wraps
``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (used by fairseq-train's resume,
fairseq-generate and our teacher loading) so that a missing, truncated or unsafe file stops with a
:class:`CheckpointError` naming it.
"""
import argparse
import functools
import os
import pickle
import zipfile

import torch

#: The only non-tensor globals fairseq checkpoints need.
SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or pickles globals outside the allow-list."""


def _unsafe_globals(path: str):
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # an unreadable file: the caller reports the original error
        return []


def explain_load_failure(path: str, error: BaseException) -> CheckpointError:
    """Turn an exception from ``torch.load(path)`` into a :class:`CheckpointError` that names the cause."""
    if not os.path.exists(path):
        return CheckpointError(f"checkpoint not found: {path}")
    if isinstance(error, pickle.UnpicklingError):
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
        extra = sorted(set(_unsafe_globals(path)) - allowed)
        return CheckpointError(
            f"refusing to load {path}: it pickles globals outside the allow-list "
            f"({', '.join(extra) if extra else error}). fairseq_pdd loads checkpoints with "
            "weights_only=True; only load checkpoints whose origin you trust, and convert them "
            "to plain tensors and containers first."
        )
    if isinstance(error, (RuntimeError, EOFError, zipfile.BadZipFile, OSError)):
        return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {error}")
    return CheckpointError(f"cannot load checkpoint {path}: {error}")


def _wrap(load_checkpoint_to_cpu):
    @functools.wraps(load_checkpoint_to_cpu)
    def safe_load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return load_checkpoint_to_cpu(path, *args, **kwargs)
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
            raise explain_load_failure(path, e) from e

    safe_load_checkpoint_to_cpu.fairseq_pdd_wrapped = True
    return safe_load_checkpoint_to_cpu


def install() -> None:
    """Allow-list fairseq's classes for weights-only loading; make load failures name the file."""
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))
    from fairseq import checkpoint_utils

    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "fairseq_pdd_wrapped", False):
        checkpoint_utils.load_checkpoint_to_cpu = _wrap(checkpoint_utils.load_checkpoint_to_cpu)


def load_checkpoint(path: str) -> dict:
    """Load a fairseq checkpoint to CPU, weights-only, upgrading old formats as fairseq does."""
    install()
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return checkpoint_utils.load_checkpoint_to_cpu(path)


def load_raw_checkpoint(path: str) -> dict:
    """The checkpoint's dictionary as saved (no fairseq upgrade), weights-only, on the CPU."""
    install()
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (turned into a CheckpointError naming the cause)
        raise explain_load_failure(path, e) from e
