"""The frozen teacher ensemble: safe loading, dictionary checks, streamed statistics (fairseq glue).

Teachers are loaded from fairseq checkpoints (weights-only, see :mod:`fairseq_pdd.teachers.checkpoints`)
and built against the student task's dictionaries, so their outputs index the same classes. They
live on the student's device in eval mode, never enter the optimizer or the student's checkpoint,
and run under ``torch.inference_mode()``. Statistics are accumulated member by member
(:mod:`fairseq_pdd.distill.ensemble_stats`), so memory grows with M only by the teachers' weights.
"""
import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from fairseq.data import Dictionary, data_utils
from fairseq.models import build_model
from omegaconf import OmegaConf

from fairseq_pdd.teachers.checkpoints import load_checkpoint
from fairseq_pdd.distill.ensemble_stats import EnsembleAccumulator, EnsembleStatistics, smooth_log_probs_

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherError(ValueError):
    """A teacher checkpoint does not fit the task (dictionary, vocabulary) or gives bad outputs."""


def split_paths(paths: Optional[str]) -> List[str]:
    """``a.pt:b.pt`` or ``a.pt,b.pt`` -> ``['a.pt', 'b.pt']``; empty or None -> ``[]``."""
    return [p for p in re.split(r"[:,]", paths or "") if p.strip()]


def _speech_dictionaries(cfg, data_dir: str, path: str) -> Optional[Dict[str, Dictionary]]:
    """A speech_to_text teacher's target dictionary, named by its data's config YAML."""
    from fairseq.data.audio.data_cfg import S2TDataConfig

    config = Path(data_dir) / cfg.task.config_yaml
    vocab = Path(data_dir) / S2TDataConfig(config).vocab_filename if config.is_file() else None
    if vocab is None or not vocab.is_file():
        logger.warning("teacher %s: its vocabulary (%s) is not readable here; checking its size only", path, config)
        return None
    return {"target": Dictionary.load(str(vocab))}


def _teacher_dictionaries(cfg, path: str) -> Optional[Dict[str, Dictionary]]:
    """The teacher's own dictionaries by role (``source``, ``target``) from its data directory, if still there."""
    data = getattr(cfg.task, "data", None)
    data_dir = str(data).split(":")[0] if data else ""
    if getattr(cfg.task, "config_yaml", None):  # speech_to_text: no source dictionary
        return _speech_dictionaries(cfg, data_dir, path)
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
    return dict(zip(("source", "target"), (Dictionary.load(p) for p in paths)))


def _check_feature_dimension(path: str, cfg, task, who: str) -> None:
    """A speech checkpoint must have been trained on features of the data's dimension."""
    data_cfg = getattr(task, "data_cfg", None)
    theirs = getattr(cfg.model, "input_feat_per_channel", None)
    if data_cfg is None or theirs is None:
        return
    ours = data_cfg.input_feat_per_channel
    if int(theirs) != int(ours):
        raise TeacherError(
            f"{who} {path} was trained on {theirs}-dim speech features but the task's data has {ours}-dim "
            "ones (input_feat_per_channel in its config.yaml): prepare the data as for the teachers"
        )


MT_HINT = ("Binarise the student's data with the teachers' dictionaries (fairseq-preprocess "
           "--srcdict/--tgtdict).")
SPEECH_HINT = "Prepare the student's data with the teachers' sentencepiece vocabulary and dictionary."


def _check_dictionary(path: str, role: str, theirs: Dictionary, ours: Dictionary, hint: str, who: str) -> None:
    if theirs.symbols != ours.symbols:
        diff = next(
            (i for i, (a, b) in enumerate(zip(theirs.symbols, ours.symbols)) if a != b),
            min(len(theirs), len(ours)),
        )
        raise TeacherError(
            f"{who} {path} was trained with a different {role} dictionary "
            f"({len(theirs)} symbols vs the data's {len(ours)}; first difference at index {diff}). {hint}"
        )


def _check_embedding_size(path: str, state_dict: dict, key: str, role: str, expected: int, who: str) -> None:
    if key in state_dict and state_dict[key].shape[0] != expected:
        raise TeacherError(
            f"{who} {path} has a {role} vocabulary of {state_dict[key].shape[0]} entries "
            f"but the task's {role} dictionary has {expected}"
        )


def check_checkpoint_dictionaries(path: str, cfg, weights: dict, task, who: str = "teacher") -> None:
    """The checkpoint's own dictionaries (if readable), embedding sizes and speech feature dimension
    must be ``task``'s. ``who`` names the checkpoint's role in the error (``teacher``, ``member 2``, ...).
    """
    ours = {"source": task.source_dictionary, "target": task.target_dictionary}
    ours = {role: d for role, d in ours.items() if d is not None}  # speech: target only
    own = _teacher_dictionaries(cfg, path) or {}
    hint = MT_HINT if "source" in ours else SPEECH_HINT
    for role, dictionary in ours.items():
        if role in own:
            _check_dictionary(path, role, own[role], dictionary, hint, who)
    for role, key in (("source", "encoder.embed_tokens.weight"), ("target", "decoder.embed_tokens.weight")):
        if role in ours:
            _check_embedding_size(path, weights, key, role, len(ours[role]), who)
    _check_feature_dimension(path, cfg, task, who)


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

    def _member_logits(self, sample: dict, mask: torch.Tensor):
        """Each teacher's logits (N, K) at the masked positions, as the model produced them, one at a time."""
        self.to(mask.device)
        for model in self.models:
            yield model(**sample["net_input"])[0][mask]

    def _check_finite(self, finite: List[torch.Tensor], sample: dict) -> None:
        """Raise :class:`TeacherError` naming the teachers whose flag (one per teacher, 0-dim bool) is False
        and the sample ids (one device sync)."""
        finite = torch.stack(finite).tolist()
        if not all(finite):
            bad = [p for p, ok in zip(self.paths, finite) if not ok]
            ids = sample.get("id")
            ids = ids.tolist()[:20] if ids is not None else "unknown"
            raise TeacherError(f"non-finite teacher outputs from {', '.join(bad)} on sample ids {ids}")

    def _member_log_probs(self, sample: dict, mask: torch.Tensor, temperature: float = 1.0, smoothing: float = 0.0):
        """Each teacher's log-probabilities ``log_softmax(z / temperature)`` (N, K), float32, at the
        masked positions, one at a time (the temperature divides one member's logits in place), smoothed
        towards uniform by ``smoothing`` (:func:`~fairseq_pdd.distill.ensemble_stats.smooth_log_probs_`).

        When exhausted, raises :class:`TeacherError` if any teacher's log-probabilities are not finite.
        """
        finite = []
        for logits in self._member_logits(sample, mask):
            if temperature != 1.0:
                logits.div_(temperature)
            log_probs = smooth_log_probs_(torch.log_softmax(logits, dim=-1, dtype=torch.float32), smoothing)
            del logits
            finite.append(torch.isfinite(log_probs).all())
            yield log_probs
            del log_probs  # free this member's (N, K) buffer before the next runs
        self._check_finite(finite, sample)

    @torch.inference_mode()
    def statistics(
        self, sample: dict, mask: torch.Tensor, temperature: float = 1.0, smoothing: float = 0.0
    ) -> EnsembleStatistics:
        """Streamed statistics over the positions where ``mask`` (B, T) is True, in row-major order, of the
        members' distributions at ``temperature`` (``softmax(z_m / T)``), each smoothed towards uniform by
        ``smoothing`` (``(1 - eps) p_m + eps / K``).

        Each teacher's logits go to :meth:`EnsembleAccumulator.add_logits` as the model produced them (the
        Triton path applies the temperature and the log-softmax inside its accumulation kernel). Raises
        :class:`TeacherError` if any teacher's log-probabilities are not finite.
        """
        acc = EnsembleAccumulator()
        finite = []
        for logits in self._member_logits(sample, mask):
            finite.append(acc.add_logits(logits, temperature, smoothing=smoothing).all())
            del logits  # free this member's outputs before the next runs
        self._check_finite(finite, sample)
        return acc.finalize()

    @torch.inference_mode()
    def log_predictive(
        self, sample: dict, mask: torch.Tensor, temperature: float = 1.0, smoothing: float = 0.0
    ) -> torch.Tensor:
        """``log pbar`` (N, K), float32: the log of the teachers' mean distribution at the masked positions
        (of the members' distributions at ``temperature``, smoothed by ``smoothing``).

        One (N, K) buffer whatever M (``log pbar = logsumexp_m log p_m - log M``, accumulated in
        place); for one teacher it is its log-softmax.
        """
        total = None
        for log_probs in self._member_log_probs(sample, mask, temperature, smoothing):
            total = log_probs if total is None else torch.logaddexp(total, log_probs, out=total)
            del log_probs
        if len(self.models) > 1:
            total.sub_(math.log(len(self.models)))
        return total
