"""The frozen teacher ensemble: safe loading, dictionary checks, streamed statistics (fairseq glue).

Teachers are loaded from fairseq checkpoints (weights-only, see :mod:`fairseq_pdd.checkpoints`)
and built against the student task's dictionaries, so their outputs index the same classes. They
live on the student's device in eval mode, never enter the optimizer or the student's checkpoint,
and run under ``torch.inference_mode()``. Statistics are accumulated member by member
(:mod:`fairseq_pdd.ensemble_stats`), so memory grows with M only by the teachers' weights.
"""
import logging
import os
import re
from typing import List, Optional, Sequence

import torch
from fairseq.data import Dictionary, data_utils
from fairseq.models import build_model
from omegaconf import OmegaConf

from fairseq_pdd.checkpoints import load_checkpoint
from fairseq_pdd.ensemble_stats import EnsembleAccumulator, EnsembleStatistics

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherError(ValueError):
    """A teacher checkpoint does not fit the task (dictionary, vocabulary) or gives bad outputs."""


def split_paths(paths: Optional[str]) -> List[str]:
    """``a.pt:b.pt`` or ``a.pt,b.pt`` -> ``['a.pt', 'b.pt']``; empty or None -> ``[]``."""
    return [p for p in re.split(r"[:,]", paths or "") if p.strip()]


def _teacher_dictionaries(cfg, path: str):
    """The teacher's own ``(source, target)`` dictionaries from its data directory, if still there."""
    data = getattr(cfg.task, "data", None)
    data_dir = str(data).split(":")[0] if data else ""
    src, tgt = getattr(cfg.task, "source_lang", None), getattr(cfg.task, "target_lang", None)
    if os.path.isdir(data_dir) and (src is None or tgt is None):
        src, tgt = data_utils.infer_language_pair(data_dir)
    paths = [os.path.join(data_dir, f"dict.{lang}.txt") for lang in (src, tgt)]
    if src is None or not all(os.path.isfile(p) for p in paths):
        logger.warning(
            "teacher %s: its dictionaries in %r are not readable here; checking vocabulary sizes only",
            path,
            data_dir,
        )
        return None
    return tuple(Dictionary.load(p) for p in paths)


def _check_dictionary(path: str, role: str, theirs: Dictionary, ours: Dictionary, who: str = "teacher") -> None:
    if theirs.symbols != ours.symbols:
        diff = next(
            (i for i, (a, b) in enumerate(zip(theirs.symbols, ours.symbols)) if a != b),
            min(len(theirs), len(ours)),
        )
        raise TeacherError(
            f"{who} {path} was trained with a different {role} dictionary "
            f"({len(theirs)} symbols vs the data's {len(ours)}; first difference at index {diff}). "
            "Binarise the student's data with the teachers' dictionaries (fairseq-preprocess "
            "--srcdict/--tgtdict)."
        )


def _check_embedding_size(path: str, state_dict: dict, key: str, role: str, expected: int, who: str) -> None:
    if key in state_dict and state_dict[key].shape[0] != expected:
        raise TeacherError(
            f"{who} {path} has a {role} vocabulary of {state_dict[key].shape[0]} entries "
            f"but the task's {role} dictionary has {expected}"
        )


def check_checkpoint_dictionaries(path: str, cfg, weights: dict, task, who: str = "teacher") -> None:
    """The checkpoint's own dictionaries (if readable) and embedding sizes must be ``task``'s.

    ``who`` names the checkpoint's role in the error (``teacher``, ``member 2``, ...).
    """
    own = _teacher_dictionaries(cfg, path)
    ours = (task.source_dictionary, task.target_dictionary)
    for role, key, theirs, mine in zip(
        ("source", "target"), ("encoder", "decoder"), own or (None, None), ours
    ):
        if mine is None:  # e.g. speech: the encoder reads features, not tokens
            continue
        if theirs is not None:
            _check_dictionary(path, role, theirs, mine, who)
        _check_embedding_size(path, weights, f"{key}.embed_tokens.weight", role, len(mine), who)


def load_teacher(path: str, task):
    """Build one teacher from ``path`` against ``task``'s dictionaries, weights-only, in eval mode."""
    state = load_checkpoint(path)
    cfg = state.get("cfg")
    if cfg is None:
        raise TeacherError(f"teacher {path} has no 'cfg' (a checkpoint from a very old fairseq?)")
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    weights = state["model"]
    check_checkpoint_dictionaries(path, cfg, weights, task)
    model = build_model(cfg.model, task)
    try:
        model.load_state_dict(weights, strict=True, model_cfg=cfg.model)
    except RuntimeError as e:
        raise TeacherError(f"teacher {path} does not fit its architecture: {e}") from e
    model.eval()
    model.requires_grad_(False)
    return model


class TeacherEnsemble:
    """M frozen teachers that give :class:`EnsembleStatistics` at a batch's target positions."""

    def __init__(self, models: Sequence[torch.nn.Module], paths: Sequence[str], dtype: torch.dtype):
        self.models = list(models)
        self.paths = list(paths)
        self.dtype = dtype
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, paths: Sequence[str], task, dtype: torch.dtype = torch.float32) -> "TeacherEnsemble":
        if not paths:
            raise TeacherError("no teacher checkpoints given (--ensemble-paths is empty)")
        models = [load_teacher(p, task).to(dtype) for p in paths]
        logger.info("loaded %d teachers (%s): %s", len(models), dtype, ", ".join(paths))
        return cls(models, paths, dtype)

    def to(self, device: torch.device) -> "TeacherEnsemble":
        if device != self.device:
            self.models = [m.to(device) for m in self.models]
            self.device = device
        return self

    @torch.inference_mode()
    def statistics(self, sample: dict, mask: torch.Tensor) -> EnsembleStatistics:
        """Streamed statistics over the positions where ``mask`` (B, T) is True, in row-major order.

        Raises :class:`TeacherError` naming the teacher and the sample ids if any teacher's
        log-probabilities are not finite (one device sync per batch).
        """
        self.to(mask.device)
        acc = EnsembleAccumulator()
        finite = []
        for model in self.models:
            logits = model(**sample["net_input"])[0][mask]
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            finite.append(torch.isfinite(log_probs).all())
            acc.add(log_probs)
            del logits, log_probs  # free this member's (N, K) buffers before the next runs
        finite = torch.stack(finite).tolist()
        if not all(finite):
            bad = [p for p, ok in zip(self.paths, finite) if not ok]
            ids = sample.get("id")
            ids = ids.tolist()[:20] if ids is not None else "unknown"
            raise TeacherError(f"non-finite teacher outputs from {', '.join(bad)} on sample ids {ids}")
        return acc.finalize()
