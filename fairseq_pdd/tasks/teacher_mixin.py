"""Teacher-ensemble options and per-step statistics, shared by the MT and ASR distillation tasks.

A task that mixes this in loads ``--ensemble-paths`` when it builds a criterion that needs them
(so ``fairseq-generate`` on a student never touches the teachers), and before every train and valid
step attaches the ensemble's statistics at the sample's non-padding target positions as
``sample["ensemble_stats"]``.
"""
from dataclasses import dataclass, field

from fairseq_pdd.criterions.distillation import STATS_KEY
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
    """Mixed into a FairseqTask whose options (``cfg``, or ``args`` for a legacy task such as
    ``speech_to_text``) carry :class:`TeacherEnsembleConfig`'s fields."""

    teachers = None

    @property
    def teacher_options(self):
        return self.cfg if getattr(self, "cfg", None) is not None else self.args

    def teacher_dtype(self) -> torch.dtype:
        options = self.teacher_options
        if options.fp16_ensemble and options.bf16_ensemble:
            raise ValueError("--fp16-ensemble and --bf16-ensemble are exclusive")
        if options.fp16_ensemble:
            return torch.float16
        return torch.bfloat16 if options.bf16_ensemble else torch.float32

    def build_criterion(self, cfg, *args, **kwargs):
        criterion = super().build_criterion(cfg, *args, **kwargs)
        if getattr(criterion, "needs_ensemble", False) and self.teachers is None:
            paths = split_paths(self.teacher_options.ensemble_paths)
            if not paths:
                raise TeacherError(
                    f"criterion '{cfg._name}' distils an ensemble but --ensemble-paths is empty"
                )
            self.teachers = TeacherEnsemble.load(paths, self, self.teacher_dtype())
        return criterion

    def attach_ensemble_statistics(self, sample, criterion) -> None:
        if self.teachers is None or not getattr(criterion, "needs_ensemble", False):
            return
        target = sample["target"]
        sample[STATS_KEY] = self.teachers.statistics(sample, target.ne(self.target_dictionary.pad()))

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        self.attach_ensemble_statistics(sample, criterion)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    def valid_step(self, sample, model, criterion):
        self.attach_ensemble_statistics(sample, criterion)
        return super().valid_step(sample, model, criterion)
