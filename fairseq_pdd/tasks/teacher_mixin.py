"""Teacher-ensemble options and per-step statistics, shared by the MT and ASR distillation tasks.

A task that mixes this in loads ``--ensemble-paths`` when it builds a criterion that needs them
(so ``fairseq-generate`` on a student never touches the teachers), and before every train and valid
step attaches, at the sample's non-padding target positions, what the criterion reads: the
ensemble's statistics as ``sample["ensemble_stats"]``, or, for a criterion with
``teacher_log_predictive = True`` (self-distillation), only the log of the teachers' mean
distribution as ``sample["teacher_log_probs"]`` (one (N, V) buffer).

With ``--teacher-cache DIR`` no teacher is loaded: every loaded subset is wrapped by
:mod:`fairseq_pdd.teachers.cache_dataset` (refused if ``DIR/{subset}`` was built for other data, dictionaries
or, when ``--ensemble-paths`` names them, other teachers), and the statistics are rebuilt on the
step's device from the cached top-k (:func:`fairseq_pdd.distill.topk_stats.expand`), so the criteria run
unchanged (a self-distillation criterion gets the log of the rebuilt mean).
"""
import logging
from dataclasses import dataclass, field

import torch

from fairseq_pdd.teachers import cache_dataset
from fairseq_pdd.teachers.cache_format import teacher_fingerprint
from fairseq_pdd.criterions.distillation import STATS_KEY
from fairseq_pdd.criterions.self_distillation import TEACHER_LOG_PROBS_KEY
from fairseq_pdd.teachers.ensemble import TeacherEnsemble, TeacherError, split_paths
from fairseq_pdd.distill.topk_stats import expand

logger = logging.getLogger(__name__)


@dataclass
class TeacherEnsembleConfig:
    ensemble_paths: str = field(
        default="",
        metadata={"help": "teacher checkpoints, colon- or comma-separated (a.pt:b.pt or a.pt,b.pt); "
                  "with --teacher-cache only hashed, to check that the cache comes from them"},
    )
    fp16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in float16"})
    bf16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in bfloat16"})
    teacher_cache: str = field(
        default="",
        metadata={"help": "train from the offline teacher cache in this directory (one folder per "
                  "subset, built by python -m fairseq_pdd.teachers.build_cache); no teacher is loaded"},
    )
    teacher_cache_skip_checksums: bool = field(
        default=False, metadata={"help": "check only the sizes of the cache's arrays, not their sha256"}
    )


class TeacherEnsembleMixin:
    """Mixed into a FairseqTask whose options (``cfg``, or ``args`` for a legacy task such as
    ``speech_to_text``) carry :class:`TeacherEnsembleConfig`'s fields."""

    teachers = None

    @property
    def teacher_options(self):
        return self.cfg if getattr(self, "cfg", None) is not None else self.args

    def teacher_dtype(self) -> torch.dtype:
        if self.teacher_options.fp16_ensemble and self.teacher_options.bf16_ensemble:
            raise ValueError("--fp16-ensemble and --bf16-ensemble are exclusive")
        if self.teacher_options.fp16_ensemble:
            return torch.float16
        return torch.bfloat16 if self.teacher_options.bf16_ensemble else torch.float32

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if not self.teacher_options.teacher_cache:
            return
        if not hasattr(self, "_teacher_caches"):
            self._teacher_caches = {}
            self._teacher_fingerprint = teacher_fingerprint(split_paths(self.teacher_options.ensemble_paths))
        wrapped = cache_dataset.wrap(
            self.datasets[split],
            self.teacher_options.teacher_cache,
            split,
            self,
            self._teacher_fingerprint,
            not self.teacher_options.teacher_cache_skip_checksums,
            self._teacher_caches.get(split),
        )
        if split not in self._teacher_caches:
            header = wrapped.cache.header
            logger.info(
                "subset %s: teacher cache %s (%d teachers %s, k=%d, %s, remaining mass mean %.3g)",
                split, wrapped.cache.directory, header["num_models"],
                [t["path"] for t in header["teachers"]], header["k"], header["dtype"], header["rest_mass"]["mean"],
            )
        self._teacher_caches[split] = wrapped.cache
        self.datasets[split] = wrapped

    def build_criterion(self, cfg, *args, **kwargs):
        criterion = super().build_criterion(cfg, *args, **kwargs)
        options = self.teacher_options
        if getattr(criterion, "needs_ensemble", False) and self.teachers is None and not options.teacher_cache:
            paths = split_paths(self.teacher_options.ensemble_paths)
            if not paths:
                raise TeacherError(
                    f"criterion '{cfg._name}' distils an ensemble but --ensemble-paths is empty (and no --teacher-cache)"
                )
            self.teachers = TeacherEnsemble.load(paths, self, self.teacher_dtype())
        return criterion

    def attach_ensemble_statistics(self, sample, criterion) -> None:
        if not getattr(criterion, "needs_ensemble", False):
            return
        target = sample["target"]
        mask = target.ne(self.target_dictionary.pad())
        log_predictive = getattr(criterion, "teacher_log_predictive", False)
        topk = sample.get(cache_dataset.TOPK_KEY)
        if topk is not None:
            topk = topk.to(target.device, non_blocking=True)
            reads_log_probs = getattr(criterion, "reads_mean_log_probs", False)
            stats = expand(topk, len(self.target_dictionary), reads_log_probs)
            if log_predictive:
                sample[TEACHER_LOG_PROBS_KEY] = stats.mean_probs.log()
            else:
                sample[STATS_KEY] = stats
        elif self.teachers is not None:
            if log_predictive:
                sample[TEACHER_LOG_PROBS_KEY] = self.teachers.log_predictive(sample, mask)
            else:
                sample[STATS_KEY] = self.teachers.statistics(sample, mask)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        self.attach_ensemble_statistics(sample, criterion)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    def valid_step(self, sample, model, criterion):
        self.attach_ensemble_statistics(sample, criterion)
        return super().valid_step(sample, model, criterion)
