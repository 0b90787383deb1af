"""Teacher-ensemble options and per-step statistics, shared by the MT and ASR distillation tasks.

A task that mixes this in loads ``--ensemble-paths`` when it builds a criterion that needs them
(so ``fairseq-generate`` on a student never touches the teachers), and before every train and valid
step attaches, at the sample's non-padding target positions, what the criterion reads: the
ensemble's statistics as ``sample["ensemble_stats"]``, or, for a criterion with
``teacher_log_predictive = True`` (self-distillation), only the log of the teachers' mean
distribution as ``sample["teacher_log_probs"]`` (one (N, V) buffer).
"""
from dataclasses import dataclass, field

from fairseq_pdd.criterions.distillation import STATS_KEY
from fairseq_pdd.criterions.self_distillation import TEACHER_LOG_PROBS_KEY
from fairseq_pdd.teachers import TeacherEnsemble, TeacherError, split_paths

import torch


@dataclass
class TeacherEnsembleConfig:
    ensemble_paths: str = field(
        default="",
        metadata={"help": "teacher checkpoints, colon- or comma-separated (a.pt:b.pt or a.pt,b.pt)"},
    )
    fp16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in float16"})
    bf16_ensemble: bool = field(default=False, metadata={"help": "run the teachers in bfloat16"})


class TeacherEnsembleMixin:
    """Mixed into a FairseqTask whose cfg carries :class:`TeacherEnsembleConfig`'s fields."""

    teachers = None

    def teacher_dtype(self) -> torch.dtype:
        if self.cfg.fp16_ensemble and self.cfg.bf16_ensemble:
            raise ValueError("--fp16-ensemble and --bf16-ensemble are exclusive")
        if self.cfg.fp16_ensemble:
            return torch.float16
        return torch.bfloat16 if self.cfg.bf16_ensemble else torch.float32

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if getattr(criterion, "needs_ensemble", False) and self.teachers is None:
            paths = split_paths(self.cfg.ensemble_paths)
            if not paths:
                raise TeacherError(
                    f"criterion '{cfg._name}' distils an ensemble but --ensemble-paths is empty"
                )
            self.teachers = TeacherEnsemble.load(paths, self, self.teacher_dtype())
        return criterion

    def attach_ensemble_statistics(self, sample, criterion) -> None:
        if self.teachers is None or not getattr(criterion, "needs_ensemble", False):
            return
        mask = sample["target"].ne(self.target_dictionary.pad())
        if getattr(criterion, "teacher_log_predictive", False):
            sample[TEACHER_LOG_PROBS_KEY] = self.teachers.log_predictive(sample, mask)
        else:
            sample[STATS_KEY] = self.teachers.statistics(sample, mask)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        self.attach_ensemble_statistics(sample, criterion)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    def valid_step(self, sample, model, criterion):
        self.attach_ensemble_statistics(sample, criterion)
        return super().valid_step(sample, model, criterion)
